"""Serving modes behind one API: the horizontal application (routed experts in ExpertShard actors,
the hottest ones replicated) answers HTTP, streaming and gRPC exactly as the package's vertical one
(greedy tokens identical, logprobs within 1e-5); the hybrid one sends each request to one of its two
sides by the policy and answers the same."""

import json

import openai
import pytest

from tests.fixtures.resources import cpus_come_back
from tests.fixtures.serving import (
    PROMPTS,
    client,
    completions_equal_the_vertical_apps,
    grpc_equals_the_vertical_apps,
    streaming_equals_the_vertical_apps,
    survives_a_kill_under_load,
)


@pytest.fixture(scope="module")
def horizontal(serve_app, ray_local, tiny_model_dir, tmp_path_factory):
    """The same model as `serve_app`, in horizontal mode under /h: 2 shards, expert 0 hot and copied."""
    from ray import serve

    from moray.jobs.serve.app import build_app
    from moray.jobs.serve.loading import model_config

    config = model_config(str(tiny_model_dir))
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    loads = tmp_path_factory.mktemp("loads") / "loads.json"
    loads.write_text(
        json.dumps({str(layer): [800] + [100] * (config.n_routed_experts - 1) for layer in layers})
    )
    settings = {
        "model": str(tiny_model_dir), "served_model_name": "tiny", "api_keys": [serve_app.api_key],
        "engine": {"max_num_seqs": 8, "max_waiting": 16}, "torch_threads": 1, "mode": "horizontal", "cpus": 0.5,
        "expert_shards": {"num_shards": 2, "redundant_experts": 2, "loads": str(loads), "cpus": 0.25},
    }  # fmt: skip
    cpus = ray_local.available_resources().get("CPU", 0)
    serve.run(build_app(settings), name="moray-h", route_prefix="/h")
    try:
        yield serve_app.root.rsplit("/", 1)[0] + "/h"
    finally:
        serve.delete("moray-h")
        # every shard set (and the hybrid app's, deleted first) went with its app: no CPUs leak
        cpus_come_back(ray_local, cpus)


def test_the_expert_pool_replicated_the_hot_expert(horizontal):
    from ray import serve

    from moray.actors.placement import ExpertPlacement

    pool = serve.get_deployment_handle("ExpertPool", app_name="moray-h")
    _, placement_json, shards = pool.fetch.remote().result()
    placement = ExpertPlacement.from_json(placement_json)
    assert len(shards) == 2 and all(placement.replicas(layer)[0] == [0, 1] for layer in placement.layers)


def test_completions_and_logprobs_equal_the_vertical_apps(horizontal, serve_app):
    completions_equal_the_vertical_apps(horizontal, serve_app)


def test_streaming_equals_the_vertical_apps(horizontal, serve_app):
    streaming_equals_the_vertical_apps(horizontal, serve_app)


def test_grpc_token_ids_equal_the_vertical_apps(horizontal, serve_app):
    grpc_equals_the_vertical_apps(serve_app, "moray-h")


def test_hybridgrpc_equals_the_vertical_apps(hybrid, serve_app):
    grpc_equals_the_vertical_apps(serve_app, "moray-hy")


def test_killing_an_expert_shard_under_load_loses_no_request(horizontal, serve_app):
    """40 requests, 8 at a time; a shard's process is killed while they run. Ray restarts it, the
    replica re-links and recomputes the running requests' caches: every request completes (the
    issue allows 1% to fail with a 503), none hangs, and the answers are the vertical app's."""
    import ray
    from ray import serve

    _, _, shards = serve.get_deployment_handle("ExpertPool", app_name="moray-h").fetch.remote().result()
    survives_a_kill_under_load(horizontal, serve_app, lambda: ray.kill(shards[0], no_restart=False))


def test_replanning_from_the_measured_load_moves_replicas_without_dropping_requests(horizontal, serve_app):
    """The pool re-plans from the load the replica reported (not the file's guess) while requests
    run: a new shard set starts, the replica moves to it between steps, every request completes
    with the vertical app's answer."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    pool = serve.get_deployment_handle("ExpertPool", app_name="moray-h")
    before = pool.status.remote().result()
    vertical, sharded = client(serve_app.root, serve_app), client(horizontal, serve_app)
    kw = dict(model="tiny", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    prompts = [f"{PROMPTS[i % 3]} again {i}" for i in range(16)]
    with ThreadPoolExecutor(8) as threads:
        futures = [threads.submit(lambda p: sharded.completions.create(prompt=p, **kw).choices[0].text, p)
                   for p in prompts]  # fmt: skip
        futures[3].result(timeout=120)
        time.sleep(2.5)  # the replica reports its load every 2 s
        version = pool.replan.remote().result()
        answers = [f.result(timeout=300) for f in futures]
    after = pool.status.remote().result()
    assert version == before["version"] + 1 and after["placement"] != before["placement"]
    want = [vertical.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert answers == want
    time.sleep(2.5)
    assert sharded.completions.create(prompt="Once more", **kw).choices[0].text  # the replica syncs here
    time.sleep(2.5)
    sharded.completions.create(prompt="And again", **kw)
    assert set(pool.status.remote().result()["replica_versions"].values()) == {version}


@pytest.fixture(scope="module")
def hybrid(horizontal, serve_app, tiny_model_dir):
    """The same model in hybrid mode under /hy: small requests to its vertical side (2 at a time,
    the limit held still), large ones and the overflow to its horizontal side (2 shards)."""
    from ray import serve

    from moray.jobs.serve.app import build_app

    settings = {
        "model": str(tiny_model_dir), "served_model_name": "tiny", "api_keys": [serve_app.api_key],
        "engine": {"max_num_seqs": 8, "max_waiting": 16}, "torch_threads": 1, "mode": "hybrid", "cpus": 0.5,
        "expert_shards": {"num_shards": 2, "cpus": 0.25},
        "hybrid": {"small_tokens": 64, "vertical_limit": 2, "adapt": False},
    }  # fmt: skip
    serve.run(build_app(settings), name="moray-hy", route_prefix="/hy")
    try:
        yield serve_app.root.rsplit("/", 1)[0] + "/hy"
    finally:
        serve.delete("moray-hy")  # torn down before `horizontal`, whose teardown checks the CPUs


def test_hybrid_sends_small_requests_to_the_vertical_side_and_large_ones_to_the_horizontal(hybrid, serve_app):
    vertical, routed = client(serve_app.root, serve_app), client(hybrid, serve_app)
    kw = dict(model="tiny", max_tokens=8, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    long_prompt = " ".join(PROMPTS * 12)  # about 100 tokens by the router's estimate: large
    for prompt, side in (("My lord", "vertical"), (long_prompt, "horizontal")):
        raw = routed.completions.with_raw_response.create(prompt=prompt, **kw)
        got, want = raw.parse(), vertical.completions.create(prompt=prompt, **kw)
        assert raw.headers["x-moray-backend"] == side
        assert got.choices[0].text == want.choices[0].text
        assert got.choices[0].logprobs.token_logprobs == pytest.approx(
            want.choices[0].logprobs.token_logprobs, abs=1e-5
        )
    # a long output is large too
    raw = routed.completions.with_raw_response.create(model="tiny", prompt="My lord", max_tokens=80)
    assert raw.headers["x-moray-backend"] == "horizontal" and raw.parse().choices[0].text
    # the model list, errors and streams come through unchanged
    assert [m.id for m in routed.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        routed.completions.create(model="tiny", prompt="x", max_tokens=-1)
    stream_kw = dict(model="tiny", messages=[{"role": "user", "content": "Speak"}], max_tokens=8, temperature=0,
                     stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    texts = ["".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**stream_kw) if c.choices)
             for client in (vertical, routed)]  # fmt: skip
    assert texts[0] and texts[0] == texts[1]


def test_hybrid_overflows_to_the_horizontal_side_under_concurrency_and_exports_its_decisions(
    hybrid, serve_app, ray_local
):
    from concurrent.futures import ThreadPoolExecutor

    from tests.jobs.serve.test_prometheus import wait_for

    routed = client(hybrid, serve_app)
    kw = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(8) as threads:
        sides = list(threads.map(
            lambda i: routed.completions.with_raw_response.create(prompt=f"Hark {i}", **kw).headers["x-moray-backend"],
            range(8),
        ))  # fmt: skip
    assert sides.count("vertical") >= 2 and sides.count("horizontal") >= 1  # 2 at a time on the vertical side

    def decided(sample):
        return all(sample.get(f"hybrid/{r}", 0) >= 1 for r in ("small", "large", "overflow"))

    sample = wait_for(ray_local.metrics_url, decided)
    assert decided(sample), sample
