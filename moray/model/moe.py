"""DeepSeekMoE layer: shared experts + fine-grained routed experts, with capacity and statistics.

Capacity: with a capacity factor f, each expert takes at most ceil(f * N * k / E) token-expert
pairs per forward; beyond that the pairs with the lowest router affinity are dropped (their
token still gets the shared experts and the residual). No factor, or eval mode: dropless.
N counts the tokens of `self.tokens`: this process's, or, once a data- or expert-parallel run
installs a group over every rank's tokens, the whole batch's, so the drops and the balance losses
are the ones a single process would compute.

After every forward the layer keeps `last_stats` (tokens per expert, drops, load entropy) and,
in training, `last_losses` (the unweighted balance losses, see router.balance_losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moray.model.config import ModelConfig
from moray.model.experts import RoutedExperts
from moray.model.norm import SwiGLU
from moray.model.router import (
    LOCAL_TOKENS,
    Router,
    Routing,
    balance_losses,
    contiguous_device_map,
    load_entropy,
)


@dataclass
class RouterStats:
    tokens_per_expert: torch.Tensor  # (E,) pairs routed to each expert, before dropping
    dropped: int  # pairs dropped for capacity
    pairs: int  # N * k
    capacity: int | None  # per-expert capacity in pairs (None: dropless)

    @property
    def drop_rate(self) -> float:
        return self.dropped / max(self.pairs, 1)

    @property
    def entropy(self) -> float:
        return load_entropy(self.tokens_per_expert)

    @property
    def max_min_ratio(self) -> float:
        t = self.tokens_per_expert.float()
        return float(t.max() / t.min().clamp_min(1))

    def as_dict(self) -> dict:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "dropped": self.dropped,
            "drop_rate": self.drop_rate,
            "load_entropy": self.entropy,
            "max_min_ratio": self.max_min_ratio,
            "capacity": self.capacity,
        }


def capacity_mask(
    experts: torch.Tensor, affinity: torch.Tensor, n_experts: int, capacity: int
) -> torch.Tensor:
    """(N, k) bool: which token-expert pairs fit, keeping each expert's highest-affinity pairs."""
    flat_e, flat_a = experts.reshape(-1), affinity.reshape(-1)
    by_affinity = torch.argsort(flat_a, descending=True, stable=True)
    order = by_affinity[torch.argsort(flat_e[by_affinity], stable=True)]  # expert asc, affinity desc
    expert_sorted = flat_e[order]
    counts = torch.bincount(expert_sorted, minlength=n_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(flat_e.numel(), device=experts.device) - starts[expert_sorted]
    keep = torch.empty_like(flat_e, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep.view_as(experts)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.gate = Router(config)
        self.experts = RoutedExperts(
            E,
            config.hidden_size,
            config.moe_intermediate_size,
            learned_beta=config.swiglu_learned_beta,
            activation_scale=config.expert_activation_scale,
        )
        self.shared_experts = (
            SwiGLU(
                config.hidden_size,
                config.moe_intermediate_size * config.n_shared_experts,
                learned_beta=config.swiglu_learned_beta,
            )  # fmt: skip
            if config.n_shared_experts > 0
            else None
        )
        self.capacity_factor = config.capacity_factor  # moved by the CapacityController
        self.register_buffer("device_of_expert", contiguous_device_map(E, config.ep_size), persistent=False)
        self.tokens = LOCAL_TOKENS  # which tokens capacity and balance are decided over (see router.py)
        self.last_stats: RouterStats | None = None
        self.last_losses: dict[str, torch.Tensor] | None = None

    def set_device_map(self, device_of_expert: torch.Tensor) -> None:
        """Install the expert-parallel placement used by the device/communication losses."""
        self.device_of_expert = device_of_expert.to(self.device_of_expert.device, torch.long)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H). token_mask (...) bool marks the real tokens of a padded batch: padding is not
        routed (it gets the shared experts only), takes no capacity, and stays out of the statistics
        and the balance losses. None: every token is real."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, H)
        routing = self.gate(flat)
        E, (N, k) = self.config.n_routed_experts, routing.experts.shape
        real = None if token_mask is None else token_mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
        counted = routing  # the real tokens' routing: capacity, statistics and losses
        if real is not None:
            rows = real.nonzero().squeeze(1)
            counted = Routing(
                experts=routing.experts[rows],
                weights=routing.weights[rows],
                affinity=routing.affinity[rows],
                scores=routing.scores[rows],
                logits=routing.logits[rows],
            )
        n_real = counted.experts.shape[0]
        keep, kept, capacity = None, None, None
        if self.training and self.capacity_factor is not None:
            # every rank's choices (n_all, 2k), or just ours; expert ids are exact in float64
            pairs = torch.cat([counted.experts.double(), counted.affinity.detach().double()], dim=1)
            pairs, start = self.tokens.gather(pairs)
            all_experts, all_affinity = pairs[:, :k].long(), pairs[:, k:]
            capacity = math.ceil(self.capacity_factor * len(pairs) * k / E)
            kept = capacity_mask(all_experts, all_affinity, E, capacity)[
                start : start + n_real
            ]  # (n_real, k)
            keep = kept if real is None else kept.new_zeros(N, k).index_copy_(0, rows, kept)
        elif real is not None:
            keep = real[:, None].expand(N, k)
        out = self.experts(flat, routing.experts, routing.weights, keep)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)

        with torch.no_grad():
            tokens_per_expert = torch.bincount(counted.experts.reshape(-1), minlength=E)
            dropped = 0 if kept is None else int((~kept).sum())
        self.last_stats = RouterStats(tokens_per_expert, dropped, n_real * k, capacity)
        if self.training and torch.is_grad_enabled() and (n_real > 0 or self.tokens is not LOCAL_TOKENS):
            n_dev = int(self.device_of_expert.max()) + 1
            m = self.config.max_devices_per_token or min(n_dev, k)
            self.last_losses = balance_losses(counted, self.device_of_expert, n_dev, m, self.tokens)
        else:
            self.last_losses = None
        return out.view(shape)
