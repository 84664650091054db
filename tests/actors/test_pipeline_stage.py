"""Serving with the decoder layers in PipelineStage actors: the same greedy tokens and logprobs as
the single-process engine, micro-batches in flight; a killed stage is restarted and the requests
finish unchanged."""

import pytest
import torch

from moray.actors.engine import Engine
from moray.model import load_pretrained
from tests.fixtures.greedy import assert_same, greedy
from tests.fixtures.resources import cpus_come_back


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return greedy(Engine(load_pretrained(tiny_model_dir)))


def _pipelined_engine(model_dir, microbatches: int):
    from moray.actors.engine import EngineConfig
    from moray.actors.engine.block_cache import BlockPool
    from moray.actors.pipeline_stage import PipelineRunner, start_pipeline_stages

    ends = load_pretrained(model_dir, layers=(), ends=True)  # embedding, norm and head only
    config = EngineConfig()
    blocks = BlockPool.blocks_in_budget(ends.config, config.kv_cache_bytes, config.block_size)
    stages, group = start_pipeline_stages(
        str(model_dir), ends.config, 2, blocks, config.block_size, cpus=0.25
    )
    runner = PipelineRunner(ends, stages, group, microbatches)
    engine = Engine(ends, config=config, runner=runner)
    engine.repair = runner.repair
    return engine, runner


@pytest.mark.parametrize("microbatches", [1, 2], ids=["one-microbatch", "two-in-flight"])
def test_stages_give_the_single_engines_tokens_and_logprobs(
    ray_local, tiny_model_dir, reference, microbatches
):
    cpus = ray_local.available_resources().get("CPU", 0)
    engine, runner = _pipelined_engine(tiny_model_dir, microbatches)
    try:
        ranges = ray_local.get([s.ping.remote() for s in runner.stages])
        got = greedy(engine)
    finally:
        runner.close()
    cpus_come_back(ray_local, cpus)
    layers = engine.model_config.num_hidden_layers
    assert ranges[0][0] == 0 and ranges[-1][1] == layers and ranges[0][1] == ranges[1][0]  # contiguous
    assert_same(got, reference)
    # the replica holds no layer and stores no cache entry: the stages do
    assert engine.pool.data.numel() == 0
    assert all(p.device.type == "meta" for p in engine.runner.model.layers.parameters())


def test_router_statistics_come_back_from_the_stages(ray_local, tiny_model_dir):
    """The tokens each expert got, per layer (moray_expert_tokens_total), counted in the stages."""
    from moray.actors.engine.metrics import EngineMetrics

    engine, runner = _pipelined_engine(tiny_model_dir, 2)
    whole = Engine(load_pretrained(tiny_model_dir))
    try:
        for e in (engine, whole):
            e.metrics = EngineMetrics("pipeline-test", flush_every_s=1e9)
            greedy(e)
    finally:
        runner.close()
    pipelined, single = engine.metrics._experts, whole.metrics._experts
    assert pipelined.keys() == single.keys() and pipelined
    for layer in single:
        assert torch.equal(pipelined[layer], single[layer])


def test_a_killed_stage_is_restarted_and_the_requests_finish_unchanged(ray_local, tiny_model_dir, reference):
    cpus = ray_local.available_resources().get("CPU", 0)
    engine, runner = _pipelined_engine(tiny_model_dir, 2)
    try:
        got = greedy(engine, at_step={4: lambda: ray_local.kill(runner.stages[1], no_restart=False)})
    finally:
        runner.close()
    cpus_come_back(ray_local, cpus)
    assert engine.num_repairs >= 1
    assert_same(got, reference)


def test_more_stages_than_layers_is_refused(tiny_model_dir):
    from moray.actors.pipeline_stage import stage_layers
    from moray.model.config import ModelConfig

    config = load_pretrained(tiny_model_dir, layers=(), ends=False).config
    assert isinstance(config, ModelConfig)
    with pytest.raises(ValueError, match=f"the model has {config.num_hidden_layers} layers"):
        stage_layers(config, config.num_hidden_layers + 1)
