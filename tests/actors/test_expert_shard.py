"""Serving with the routed experts in ExpertShard actors: the same greedy tokens and logprobs as
the single-process engine, with and without hot-expert replication."""

import pytest
import torch

from moray.actors.engine import Engine
from moray.actors.placement import PlacementError, plan_placement
from moray.model import load_pretrained
from tests.fixtures.greedy import assert_same, greedy
from tests.fixtures.resources import cpus_come_back


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return greedy(Engine(load_pretrained(tiny_model_dir)))


@pytest.mark.parametrize("redundant", [0, 4], ids=["plain", "hot-experts-replicated"])
def test_sharded_experts_give_the_single_engines_tokens_and_logprobs(
    ray_local, tiny_model_dir, reference, redundant
):
    from moray.actors.expert_shard import ShardSet, start_expert_shards, stop_expert_shards, use_expert_shards

    model = load_pretrained(tiny_model_dir, routed_experts=False)
    layers = [i for i, _ in model.moe_layers()]
    E = model.config.n_routed_experts
    loads = {layer: torch.arange(E, 0, -1.0) ** 3 for layer in layers}  # expert 0 hottest
    placement = plan_placement(loads, E, num_shards=2, layers=layers, redundant_experts=redundant)
    if redundant:
        assert all(len(placement.replicas(layer)[0]) == 2 for layer in layers)
    cpus = ray_local.available_resources().get("CPU", 0)
    shards, group = start_expert_shards(str(tiny_model_dir), placement, cpus_per_shard=0.25)
    shard_set = ShardSet.attach(placement, shards, f"test-{redundant}")
    try:
        use_expert_shards(model, shard_set)
        got = greedy(Engine(model))
    finally:
        shard_set.close()
        stop_expert_shards(shards, group)
    cpus_come_back(ray_local, cpus)
    assert_same(got, reference)
    # the model never held the routed experts' weights itself
    assert all(p.device.type != "meta" for p in model.parameters())


def test_a_model_with_per_expert_extras_is_refused(tiny_model_dir):
    import json

    from moray.actors.expert_shard import check_shardable
    from moray.model.config import ModelConfig

    config = ModelConfig.from_hf_dict(json.loads((tiny_model_dir / "config.json").read_text()))
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    placement = plan_placement(None, config.n_routed_experts, 2, layers)
    check_shardable(config, placement)
    with pytest.raises(PlacementError, match="learned per-expert"):
        check_shardable(config.replace(swiglu_learned_beta=True), placement)
    with pytest.raises(PlacementError, match="covers layers"):
        check_shardable(config, plan_placement(None, config.n_routed_experts, 2, layers[:1]))


def test_a_killed_shard_is_restarted_and_the_requests_finish_unchanged(ray_local, tiny_model_dir, reference):
    """Mid-generation a shard's process dies: the step fails, Ray restarts the shard, the replica
    re-links and the running requests recompute their caches; every request still ends with the
    single engine's tokens."""
    from moray.actors.expert_shard import ShardSet, start_expert_shards, stop_expert_shards, use_expert_shards

    model = load_pretrained(tiny_model_dir, routed_experts=False)
    layers = [i for i, _ in model.moe_layers()]
    placement = plan_placement(None, model.config.n_routed_experts, 2, layers)
    cpus = ray_local.available_resources().get("CPU", 0)
    shards, group = start_expert_shards(str(tiny_model_dir), placement, cpus_per_shard=0.25)
    shard_set = ShardSet.attach(placement, shards, "kill")
    use_expert_shards(model, shard_set)
    engine = Engine(model)
    engine.repair = shard_set.repair
    try:
        got = greedy(engine, at_step={4: lambda: ray_local.kill(shards[1], no_restart=False)})
    finally:
        shard_set.close()
        stop_expert_shards(shards, group)
    cpus_come_back(ray_local, cpus)
    assert engine.num_repairs >= 1 and shard_set.generation >= 1
    assert_same(got, reference)
