"""Actors started together in one Ray placement group, restarted by Ray when their process dies,
and ended together (the group's CPUs go back to the cluster): expert shards and pipeline stages."""

from __future__ import annotations

import ray

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def start_group(actor_class, args: list[tuple], cpus: float = 1.0, strategy: str = "PACK"):
    """One actor per entry of `args` (its constructor arguments), each on its own bundle of `cpus`
    CPUs; SPREAD puts them on different nodes where there are several. Returns (actors, group)
    once every actor answers `ping`."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    group = placement_group([{"CPU": cpus}] * len(args), strategy=strategy)
    ray.get(group.ready())
    actors = [
        actor_class.options(
            num_cpus=cpus,
            max_restarts=-1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote(*a)
        for i, a in enumerate(args)
    ]
    try:
        ray.get([a.ping.remote() for a in actors])
    except BaseException:
        stop_group(actors, group)
        raise
    return actors, group


def stop_group(actors: list, group) -> None:
    """End the actors and give their placement group's CPUs back to the cluster."""
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        ray.kill(a)
    remove_placement_group(group)


def wait_alive(actor, deadline: float) -> bool:
    """Until the actor answers `ping` (Ray restarts a dead one: its constructor runs again), or
    False at `deadline` (time.monotonic())."""
    import time

    from ray.exceptions import GetTimeoutError, RayActorError

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            ray.get(actor.ping.remote(), timeout=left)
            return True
        except (RayActorError, GetTimeoutError):
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
