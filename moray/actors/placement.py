"""Which expert shard holds which routed experts, per MoE layer, from measured expert load.

DeepSeek's expert-parallel load balancer (EPLB), per layer: the R spare slots go one at a time to
the expert with the highest load per copy, so the hottest experts get copies on several shards;
then the copies, heaviest first, go to the least-loaded shard that has a free slot and does not
hold that expert yet. Tokens of a replicated expert are split evenly among its copies
(`ExpertPlacement.route`), so a shard's expected load is what the plan balanced.

    plan = plan_placement(loads, num_shards=2, redundant_experts=2)   # loads: {layer: (E,) counts}
    plan.shards[layer][s]   # the experts shard s holds in that layer, ascending

Loads come from the serving engine's `moray_expert_tokens_total{layer,expert}` or from a training
run's expert-load heatmap; with none, every expert weighs the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


class PlacementError(ValueError):
    """A placement that cannot serve the model: refused before anything starts."""


@dataclass(frozen=True)
class ExpertPlacement:
    n_experts: int
    shards: dict[int, tuple[tuple[int, ...], ...]]  # MoE layer -> per shard, the experts it holds

    def __post_init__(self) -> None:
        counts = {len(per_shard) for per_shard in self.shards.values()}
        if len(counts) != 1:
            raise PlacementError(f"every MoE layer needs the same number of shards, got {sorted(counts)}")
        for layer, per_shard in self.shards.items():
            held = [e for experts in per_shard for e in experts]
            unserved = sorted(set(range(self.n_experts)) - set(held))
            if unserved:
                raise PlacementError(
                    f"layer {layer}: experts {unserved} are on no shard (every expert must be served)"
                )
            unknown = sorted({e for e in held if not 0 <= e < self.n_experts})
            if unknown:
                raise PlacementError(
                    f"layer {layer}: experts {unknown} do not exist (the model has {self.n_experts})"
                )
            for s, experts in enumerate(per_shard):
                if len(set(experts)) != len(experts):
                    raise PlacementError(f"layer {layer}: shard {s} holds an expert twice: {list(experts)}")

    @property
    def num_shards(self) -> int:
        return len(next(iter(self.shards.values())))

    @property
    def layers(self) -> list[int]:
        return sorted(self.shards)

    def replicas(self, layer: int) -> dict[int, list[int]]:
        """expert -> the shards that hold it, ascending."""
        out: dict[int, list[int]] = {e: [] for e in range(self.n_experts)}
        for s, experts in enumerate(self.shards[layer]):
            for e in experts:
                out[e].append(s)
        return out

    def route(self, layer: int) -> RouteTable:
        return RouteTable.build(self, layer)

    def to_json(self) -> str:
        return json.dumps(
            {"n_experts": self.n_experts, "shards": {str(k): v for k, v in self.shards.items()}}
        )

    @classmethod
    def from_json(cls, text: str) -> ExpertPlacement:
        data = json.loads(text)
        shards = {int(k): tuple(tuple(int(e) for e in s) for s in v) for k, v in data["shards"].items()}
        return cls(int(data["n_experts"]), shards)


@dataclass(frozen=True)
class RouteTable:
    """Tensors that send a token-expert pair to one copy of its expert: for expert e's i-th pair (in
    the order pairs are sorted), copy i mod copies[e], held by shard[e, copy] as local[e, copy]."""

    copies: torch.Tensor  # (E,) int64
    shard: torch.Tensor  # (E, max copies) int64
    local: torch.Tensor  # (E, max copies) int64: the expert's index among that shard's experts

    @classmethod
    def build(cls, placement: ExpertPlacement, layer: int) -> RouteTable:
        holders = placement.replicas(layer)
        width = max(len(h) for h in holders.values())
        shard = torch.zeros(placement.n_experts, width, dtype=torch.long)
        local = torch.zeros_like(shard)
        for e, on in holders.items():
            for i, s in enumerate(on):
                shard[e, i], local[e, i] = s, placement.shards[layer][s].index(e)
        copies = torch.tensor([len(holders[e]) for e in range(placement.n_experts)], dtype=torch.long)
        return cls(copies, shard, local)

    def assign(self, expert_of_row: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """expert_of_row (P,) ascending, counts (E,): each row's (shard, local expert index)."""
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        position = torch.arange(len(expert_of_row)) - starts[expert_of_row]  # (P,) i-th pair of its expert
        copy = position % self.copies[expert_of_row]
        return self.shard[expert_of_row, copy], self.local[expert_of_row, copy]


def plan_placement(
    loads: dict[int, torch.Tensor] | None,
    n_experts: int,
    num_shards: int,
    layers: list[int],
    redundant_experts: int = 0,
) -> ExpertPlacement:
    """EPLB per layer over E + R slots, (E + R) / S per shard. loads: {layer: (E,) tokens}, or None."""
    if num_shards < 1:
        raise PlacementError(f"num_shards={num_shards}: at least 1")
    if num_shards > n_experts:
        raise PlacementError(f"{num_shards} shards for {n_experts} routed experts: a shard would hold none")
    slots = n_experts + redundant_experts
    if redundant_experts < 0 or slots % num_shards:
        raise PlacementError(
            f"redundant_experts={redundant_experts}: experts + redundant ({slots}) must divide evenly "
            f"over {num_shards} shards"
        )
    if redundant_experts > n_experts * (num_shards - 1):
        raise PlacementError(
            f"redundant_experts={redundant_experts}: an expert has at most one copy per shard"
        )
    per_shard = slots // num_shards
    shards = {}
    for layer in layers:
        load = torch.ones(n_experts, dtype=torch.float64)
        if loads is not None and layer in loads:
            load = loads[layer].to(torch.float64).clamp_min(0) + 1e-9  # ties (and zeros) by expert id
        copies = torch.ones(n_experts, dtype=torch.long)
        for _ in range(redundant_experts):
            per_copy = torch.where(
                copies < num_shards, load / copies, torch.tensor(-1.0, dtype=torch.float64)
            )
            copies[int(torch.argmax(per_copy))] += 1
        held = _pack(load, copies, num_shards, per_shard, balance=True)
        if held is None:  # the balancing order painted itself into a corner: place for feasibility
            held = _pack(load, copies, num_shards, per_shard, balance=False)
        shards[layer] = tuple(tuple(sorted(h)) for h in held)
    return ExpertPlacement(n_experts, shards)


def _pack(load, copies, num_shards: int, per_shard: int, balance: bool) -> list[list[int]] | None:
    """Experts with the most copies first (then the heaviest per copy), each copy on a different
    shard with a free slot: the least loaded one (balance), or the one with the most free slots,
    which always finds room. None when balancing found no room."""
    order = sorted(range(len(load)), key=lambda e: (-int(copies[e]), -float(load[e] / copies[e]), e))
    held: list[list[int]] = [[] for _ in range(num_shards)]
    weight = [0.0] * num_shards
    for e in order:
        w = float(load[e] / copies[e])
        for _ in range(int(copies[e])):
            free = [s for s in range(num_shards) if len(held[s]) < per_shard and e not in held[s]]
            if not free:
                return None
            key = (lambda s: (weight[s], s)) if balance else (lambda s: (len(held[s]), weight[s], s))
            s = min(free, key=key)
            held[s].append(e)
            weight[s] += w
    return held


def shard_loads(placement: ExpertPlacement, loads: dict[int, torch.Tensor]) -> dict[int, list[float]]:
    """The share of each layer's tokens each shard would get (copies split their expert's evenly)."""
    out = {}
    for layer in placement.layers:
        load = loads[layer].to(torch.float64)
        holders = placement.replicas(layer)
        per = [0.0] * placement.num_shards
        for e, on in holders.items():
            for s in on:
                per[s] += float(load[e]) / len(on)
        total = sum(per) or 1.0
        out[layer] = [p / total for p in per]
    return out
