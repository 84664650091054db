"""Pipeline mode: each replica's decoder layers in PipelineStage actors, micro-batches in flight.
It answers HTTP, streaming and gRPC exactly as the vertical app (greedy tokens identical, logprobs
within 1e-5), and a stage killed under load loses no request."""

import pytest

from tests.fixtures.resources import cpus_come_back
from tests.fixtures.serving import (
    completions_equal_the_vertical_apps,
    grpc_equals_the_vertical_apps,
    streaming_equals_the_vertical_apps,
    survives_a_kill_under_load,
)


@pytest.fixture(scope="module")
def pipeline(serve_app, ray_local, tiny_model_dir):
    """The same model as `serve_app`, in pipeline mode under /p: 2 stages, 2 micro-batches."""
    from ray import serve

    from moray.jobs.serve.app import build_app

    settings = {
        "model": str(tiny_model_dir), "served_model_name": "tiny", "api_keys": [serve_app.api_key],
        "engine": {"max_num_seqs": 8, "max_waiting": 16}, "torch_threads": 1, "mode": "pipeline", "cpus": 0.5,
        "pipeline": {"num_stages": 2, "microbatches": 2, "cpus": 0.25},
    }  # fmt: skip
    cpus = ray_local.available_resources().get("CPU", 0)
    serve.run(build_app(settings), name="moray-p", route_prefix="/p")
    try:
        yield serve_app.root.rsplit("/", 1)[0] + "/p"
    finally:
        serve.delete("moray-p")
        cpus_come_back(ray_local, cpus)  # the replica's stages went with it


def _stages() -> list:
    from ray import serve

    return serve.get_deployment_handle("MorayServer", app_name="moray-p").pipeline_stages.remote().result()


def test_the_replica_holds_its_layers_in_stages(pipeline, ray_local, tiny_model_dir):
    from moray.jobs.serve.loading import model_config

    stages = _stages()
    ranges = ray_local.get([s.ping.remote() for s in stages])
    assert len(stages) == 2 and ranges[0][0] == 0 and ranges[0][1] == ranges[1][0]
    assert ranges[1][1] == model_config(str(tiny_model_dir)).num_hidden_layers


def test_completions_and_logprobs_equal_the_vertical_apps(pipeline, serve_app):
    completions_equal_the_vertical_apps(pipeline, serve_app)


def test_streaming_equals_the_vertical_apps(pipeline, serve_app):
    streaming_equals_the_vertical_apps(pipeline, serve_app)


def test_grpc_token_ids_equal_the_vertical_apps(pipeline, serve_app):
    grpc_equals_the_vertical_apps(serve_app, "moray-p")


def test_killing_a_stage_under_load_loses_no_request(pipeline, serve_app):
    import ray

    stage = _stages()[1]
    survives_a_kill_under_load(pipeline, serve_app, lambda: ray.kill(stage, no_restart=False))
