"""The expert placement plan: EPLB's replication of hot experts, balanced shards, refusals."""

import pytest
import torch

from moray.actors.placement import ExpertPlacement, PlacementError, plan_placement, shard_loads


def test_without_loads_every_expert_once_and_shards_even():
    plan = plan_placement(None, n_experts=8, num_shards=2, layers=[1, 2])
    for layer in (1, 2):
        held = plan.shards[layer]
        assert [len(h) for h in held] == [4, 4]
        assert sorted(e for h in held for e in h) == list(range(8))


def test_hot_experts_get_copies_on_several_shards_and_balance_the_load():
    loads = {1: torch.tensor([800, 100, 100, 100, 100, 100, 50, 50])}  # expert 0 takes half the tokens
    plain = plan_placement(loads, 8, 2, [1])
    replicated = plan_placement(loads, 8, 2, [1], redundant_experts=2)
    assert replicated.replicas(1)[0] == [0, 1]  # the hottest expert is on both shards
    assert sum(len(s) for s in replicated.replicas(1).values()) == 10
    worst = max(shard_loads(plain, loads)[1])
    best = max(shard_loads(replicated, loads)[1])
    assert best < worst and best == pytest.approx(0.5, abs=0.03)  # 2 shards: a half each is ideal


def test_route_splits_a_replicated_experts_rows_evenly_over_its_copies():
    loads = {1: torch.tensor([800, 100, 100, 100, 100, 100, 50, 50])}
    plan = plan_placement(loads, 8, 2, [1], redundant_experts=2)
    table = plan.route(1)
    expert_of_row = torch.tensor([0] * 6 + [3, 3])
    counts = torch.bincount(expert_of_row, minlength=8)
    shard, local = table.assign(expert_of_row, counts)
    assert shard[:6].tolist() == [0, 1, 0, 1, 0, 1]
    for s, e_local, e in zip(shard.tolist(), local.tolist(), expert_of_row.tolist()):
        assert plan.shards[1][s][e_local] == e  # the local index names the right expert on that shard


def test_the_plan_round_trips_through_json():
    plan = plan_placement({1: torch.arange(8.0)}, 8, 4, [1, 2], redundant_experts=4)
    assert ExpertPlacement.from_json(plan.to_json()) == plan


def test_bad_placements_are_refused():
    with pytest.raises(PlacementError, match="9 shards for 8 routed experts"):
        plan_placement(None, 8, 9, [1])
    with pytest.raises(PlacementError, match="divide evenly"):
        plan_placement(None, 8, 3, [1])
    with pytest.raises(PlacementError, match="at most one copy per shard"):
        plan_placement(None, 4, 2, [1], redundant_experts=6)
    with pytest.raises(PlacementError, match=r"experts \[7\] are on no shard"):
        ExpertPlacement(8, {1: ((0, 1, 2, 3), (4, 5, 6))})
    with pytest.raises(PlacementError, match="holds an expert twice"):
        ExpertPlacement(2, {1: ((0, 0), (1,))})


@pytest.mark.parametrize("seed", range(20))
def test_any_load_and_replication_gives_a_valid_plan(seed):
    g = torch.Generator().manual_seed(seed)
    E, S = 16, 4
    R = int(torch.randint(0, 3, (1,), generator=g)) * S
    loads = {1: torch.rand(E, generator=g) ** 4 * 1000}
    plan = plan_placement(loads, E, S, [1], redundant_experts=R)  # __post_init__ checks coverage
    assert all(len(h) == (E + R) // S for h in plan.shards[1])
