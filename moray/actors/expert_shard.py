"""Routed experts in Ray actors: data-parallel attention + expert parallelism for serving.

A serving replica keeps attention, the routers, the shared experts and its own latent cache; the
routed experts of every MoE layer live in `ExpertShard` actors, each holding the subset an
`ExpertPlacement` gives it (hot experts on several shards). At each MoE layer the replica's
`RemoteExperts` (a drop-in for `RoutedExperts`, installed from outside the model by
`use_expert_shards`) sends each token-expert pair to one copy of its expert and adds up the
weighted answers:

    replica                                   shard s (for each layer's held experts)
    sort pairs by expert, pick a copy  ---->  rows (n_s, H), local expert, weight
    out.index_add_(token, answer)      <----  weight * expert(row)   (n_s, H)

The traffic goes over a gloo `Link` per (replica, shard); Ray starts, places and restarts the
shards. Several replicas can attach to the same shards: each attachment is served by a thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import ray
import torch
from torch import nn

from moray.actors.group import start_group, stop_group, wait_alive
from moray.actors.link import Link, LinkBroken, Rendezvous
from moray.actors.placement import ExpertPlacement, PlacementError, RouteTable
from moray.model.config import ModelConfig
from moray.model.experts import RoutedExperts, sort_pairs

RUN, STOP = 1, 0
log = logging.getLogger(__name__)


def check_shardable(config: ModelConfig, placement: ExpertPlacement) -> None:
    """Refuse, before anything starts, a model the shards cannot serve with this placement."""
    if config.swiglu_learned_beta or config.expert_activation_scale:
        raise PlacementError("expert shards serve plain SwiGLU experts: this model has learned per-expert "
                             "beta or activation scales (swiglu_learned_beta / expert_activation_scale)")  # fmt: skip
    if placement.n_experts != config.n_routed_experts:
        raise PlacementError(f"the placement is for {placement.n_experts} experts, the model has "
                             f"{config.n_routed_experts}")  # fmt: skip
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    if placement.layers != moe_layers:
        raise PlacementError(
            f"the placement covers layers {placement.layers}, the model's MoE layers are {moe_layers}"
        )


@ray.remote
class ExpertShard:
    """Holds its share of every MoE layer's routed experts and answers the replicas attached to it."""

    def __init__(
        self, model: str, shard: int, placement_json: str, threads: int = 1, dtype: str = "float32",
        tracking: str | None = None,
    ):  # fmt: skip
        from moray.jobs.serve.loading import resolve_model
        from moray.model.hf import load_routed_experts

        self.num_threads = max(1, threads)
        torch.set_num_threads(self.num_threads)
        self.busy_s, self.rows_served = 0.0, 0
        path = resolve_model(model, tracking)  # a registered model: downloaded on this node
        self.config = ModelConfig.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))
        placement = ExpertPlacement.from_json(placement_json)
        check_shardable(self.config, placement)
        self.shard, self.held = shard, {layer: placement.shards[layer][shard] for layer in placement.layers}
        self.experts: dict[int, RoutedExperts] = {}
        for layer, (gate_up, down) in load_routed_experts(path, self.held, getattr(torch, dtype)).items():
            module = RoutedExperts(len(self.held[layer]), self.config.hidden_size,
                                   self.config.moe_intermediate_size, False, False)  # fmt: skip
            module.gate_up_proj, module.down_proj = nn.Parameter(gate_up, False), nn.Parameter(down, False)
            self.experts[layer] = module.eval()
        self.threads: list[threading.Thread] = []

    def held_experts(self) -> dict[int, tuple[int, ...]]:
        return self.held

    def attach(self, address: tuple[str, int], name: str) -> bool:
        """Join a replica's rendezvous and serve it from a thread of this actor."""
        link = Link.connect(address, name)
        thread = threading.Thread(target=self._serve, args=(link,), name=f"serve-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)
        return True

    def _serve(self, link: Link) -> None:
        H = self.config.hidden_size
        torch.set_num_threads(self.num_threads)  # a new thread starts with OpenMP's default team size
        try:
            with torch.inference_mode():
                while True:
                    op, layer, rows = link.recv_header()
                    if op == STOP:
                        break
                    payload = link.recv((rows, H + 2))  # rows, local expert, weight
                    t = time.perf_counter()
                    module = self.experts[layer]
                    x = payload[:, :H].to(module.down_proj.dtype)
                    local, weight = payload[:, H : H + 1].long(), payload[:, H + 1 :].to(x.dtype)
                    answer = module(x, local, weight).float()  # (rows, H) weight * expert(row)
                    self.busy_s += time.perf_counter() - t
                    self.rows_served += rows
                    link.send(answer)
        except LinkBroken:  # the replica went away: this attachment ends, the others go on
            pass
        finally:
            link.close()

    def ping(self) -> int:
        return self.shard

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict:
        """Seconds spent computing expert rows, and rows served, since the shard started."""
        return {"busy_s": self.busy_s, "rows": self.rows_served}


REPAIR_TIMEOUT_S = 120.0


def _link_all(shards: list, name: str) -> list[Link]:
    links = []
    for s, shard in enumerate(shards):
        rendezvous = Rendezvous()
        joined = shard.attach.remote(rendezvous.address, f"{name}/{s}")
        links.append(Link(rendezvous.store, 0, f"{name}/{s}"))
        ray.get(joined)
    return links


class PoolClient(Protocol):
    """Where a replica's ShardSet learns the current placement and reports the load it routed: the
    Serve app's ExpertPool deployment, or a ShardPool actor."""

    def fetch(self) -> tuple[int, str, list]: ...  # (version, placement JSON, shard handles)

    def version(self) -> int: ...

    def report(self, loads: dict[int, list[int]], replica: str, version: int) -> None: ...  # not waited for


@dataclass
class ShardSet:
    """The replica's side: its links to every shard (in shard order), the routing tables, and the
    tokens it sent to each expert since it last reported them to the pool."""

    placement: ExpertPlacement
    shards: list  # ExpertShard handles
    links: list[Link]
    name: str
    pool: PoolClient | None = None
    version: int = 0  # the pool's placement version these links are for
    generation: int = 0  # bumped by each repair or switch
    sync_every_s: float = 2.0
    routes: dict[int, RouteTable] = field(default_factory=dict)
    loads: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_calls: int = (
        0  # MoE layers sent to the shards, and the wall time they took (shards' compute included)
    )
    layer_s: float = 0.0
    _synced: float = 0.0

    def __post_init__(self) -> None:
        self.routes = {layer: self.placement.route(layer) for layer in self.placement.layers}

    @classmethod
    def attach(
        cls,
        placement: ExpertPlacement,
        shards: list,
        name: str,
        pool: PoolClient | None = None,
        version: int = 0,
    ) -> ShardSet:
        return cls(placement, shards, _link_all(shards, f"{name}.0"), name, pool, version)

    @classmethod
    def from_pool(cls, pool: PoolClient, name: str) -> ShardSet:
        version, placement_json, shards = pool.fetch()
        return cls.attach(ExpertPlacement.from_json(placement_json), shards, name, pool, version)

    def count(self, layer: int, tokens_per_expert: torch.Tensor) -> None:
        self.loads[layer] = self.loads.get(layer, 0) + tokens_per_expert

    def sync(self) -> None:
        """The engine's before-step hook, every `sync_every_s`: report the routed load, and move to
        the pool's new placement when there is one. Between steps, so no request notices."""
        if self.pool is None or time.monotonic() - self._synced < self.sync_every_s:
            return
        self._synced = time.monotonic()
        try:
            if self.loads:
                self.pool.report(
                    {layer: t.tolist() for layer, t in self.loads.items()}, self.name, self.version
                )
                self.loads = {}
            if self.pool.version() != self.version:
                self._switch()
        except (ray.exceptions.RayError, LinkBroken) as e:  # the pool is busy or restarting: next time
            log.warning("expert pool sync failed, serving on: %s", e)

    def _switch(self) -> None:
        version, placement_json, shards = self.pool.fetch()
        placement = ExpertPlacement.from_json(placement_json)
        self.generation += 1
        links = _link_all(shards, f"{self.name}.{self.generation}")
        self.close()
        self.placement, self.shards, self.links, self.version = placement, shards, links, version
        self.routes = {layer: placement.route(layer) for layer in placement.layers}

    def repair(self, error: BaseException) -> bool:
        """The engine's repair hook: after a broken link, drop every link (the healthy shards' serving
        threads end); move to the pool's newer placement if there is one, else wait for Ray to
        restart the lost shard and link to all of them again. False for any other error; raises
        when a shard does not come back."""
        if not isinstance(error, LinkBroken):
            return False
        for link in self.links:
            link.close()
        if self.pool is not None and self.pool.version() != self.version:
            self._switch()
            return True
        deadline = time.monotonic() + REPAIR_TIMEOUT_S
        for shard in self.shards:
            if not wait_alive(shard, deadline):
                raise LinkBroken(f"an expert shard did not come back within {REPAIR_TIMEOUT_S:.0f} s")
        self.generation += 1
        self.links = _link_all(self.shards, f"{self.name}.{self.generation}")
        return True

    def stats(self) -> dict:
        return {
            "expert_layer_calls": self.layer_calls,
            "expert_layer_ms": 1e3 * self.layer_s / max(self.layer_calls, 1),
        }

    def close(self) -> None:
        for link in self.links:
            try:
                link.send_header(STOP)
            except LinkBroken:
                pass
            link.close()


def start_expert_shards(
    model: str,
    placement: ExpertPlacement,
    cpus_per_shard: float = 1.0,
    threads_per_shard: int = 1,
    dtype: str = "float32",
    strategy: str = "PACK",
    tracking: str | None = None,
):
    """One ExpertShard actor per shard of the placement, in one placement group: (shards, group)."""
    text = placement.to_json()
    args = [(model, s, text, threads_per_shard, dtype, tracking) for s in range(placement.num_shards)]
    return start_group(ExpertShard, args, cpus_per_shard, strategy)


stop_expert_shards = stop_group


RETIRE_AFTER_S = 60.0


class ShardPool:
    """The shards of one application and their placement, re-planned from the load the replicas
    report. A re-plan starts a new set of shards and bumps the version; replicas move to it between
    steps (ShardSet.sync); the old set is retired RETIRE_AFTER_S later, so no request is dropped."""

    def __init__(self, model: str, plan: Callable[[dict | None], ExpertPlacement], cpus: float = 1.0,
                 threads: int = 1, strategy: str = "PACK", tracking: str | None = None):  # fmt: skip
        self.model, self.plan, self.tracking = model, plan, tracking
        self.cpus, self.threads, self.strategy = cpus, threads, strategy
        self.placement = plan(None)
        self.shards, self.group = self._start(self.placement)
        self.version = 0
        self.loads: dict[int, torch.Tensor] = {}
        self.replica_versions: dict[str, int] = {}  # the placement version each replica last reported from
        self.retiring: list[tuple[float, list, object]] = []

    def _start(self, placement: ExpertPlacement):
        return start_expert_shards(self.model, placement, self.cpus, self.threads, strategy=self.strategy,
                                   tracking=self.tracking)  # fmt: skip

    def fetch(self) -> tuple[int, str, list]:
        return self.version, self.placement.to_json(), self.shards

    def report(self, loads: dict[int, list[int]], replica: str = "", version: int = 0) -> None:
        self.replica_versions[replica] = version
        for layer, counts in loads.items():
            t = torch.tensor(counts, dtype=torch.float64)
            self.loads[int(layer)] = self.loads.get(int(layer), 0) + t

    def replan(self) -> bool:
        """A placement from the load reported so far; a new shard set if it differs (True)."""
        self.retire()
        placement = self.plan(self.loads or None)
        if placement == self.placement:
            return False
        shards, group = self._start(placement)
        self.retiring.append((time.monotonic(), self.shards, self.group))
        self.placement, self.shards, self.group = placement, shards, group
        self.version += 1
        return True

    def status(self) -> dict:
        return {
            "version": self.version,
            "placement": self.placement.to_json(),
            "loads": {layer: t.tolist() for layer, t in self.loads.items()},
            "replica_versions": dict(self.replica_versions),
            "retiring": len(self.retiring),
        }

    def retire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        keep = []
        for since, shards, group in self.retiring:
            if now - since < RETIRE_AFTER_S:
                keep.append((since, shards, group))
                continue
            stop_expert_shards(shards, group)
        self.retiring = keep

    def shutdown(self) -> None:
        self.retire(now=float("inf"))
        stop_expert_shards(self.shards, self.group)


class RemoteExperts(nn.Module):
    """Drop-in for one layer's RoutedExperts whose experts live in the shards."""

    def __init__(self, layer: int, n_experts: int, shard_set: ShardSet):
        super().__init__()
        self.layer, self.n_experts, self.shard_set = layer, n_experts, shard_set

    def forward(
        self,
        x: torch.Tensor,  # (N, H)
        experts: torch.Tensor,  # (N, k)
        weights: torch.Tensor,  # (N, k)
        keep: torch.Tensor | None = None,  # (N, k) bool
    ) -> torch.Tensor:
        start = time.perf_counter()
        pairs = sort_pairs(experts, weights, keep, self.n_experts)
        self.shard_set.count(self.layer, pairs.counts)
        route = self.shard_set.routes[self.layer]  # the current placement's (it may change between steps)
        shard_of_row, local = route.assign(pairs.expert_of_row, pairs.counts)  # (P,) each
        payload = torch.cat([x.index_select(0, pairs.token_of_row).float(), local[:, None].float(),
                             pairs.weights[:, None].float()], dim=1)  # (P, H + 2)  # fmt: skip
        sent, pending = [], []
        for s, link in enumerate(self.shard_set.links):
            rows = (shard_of_row == s).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            header = torch.tensor([RUN, self.layer, len(rows), 0], dtype=torch.int64)
            part = payload.index_select(0, rows)
            sent.append((link, link.send_async(header, part), header, part))
            answer, work = link.recv_async((len(rows), x.shape[1]))
            pending.append((link, work, rows, answer))
        for link, works, *_ in sent:
            link.wait(works)
        out = torch.zeros_like(x)
        for link, work, rows, answer in pending:
            link.wait([work])
            out.index_add_(0, pairs.token_of_row.index_select(0, rows), answer.to(x.dtype))
        self.shard_set.layer_calls += 1
        self.shard_set.layer_s += time.perf_counter() - start
        return out


def use_expert_shards(model, shard_set: ShardSet) -> None:
    """Replace every MoE layer's routed experts with RemoteExperts over `shard_set` (from outside
    the model, which stays single-device code)."""
    for layer, moe in model.moe_layers():
        moe.experts = RemoteExperts(layer, model.config.n_routed_experts, shard_set)
