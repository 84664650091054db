"""DeepSeekMoE routing: scores, top-k selection, and the balance losses of DeepSeek-V2.

Scoring is softmax (V2) or sigmoid with a per-expert score-correction bias that only steers
*selection* and is moved toward balance from observed load, without a loss (auxiliary-loss-free
balancing, DeepSeek-V3). Selection is greedy top-k, or group-limited: pick `topk_group` of
`n_group` expert groups first (by their best score, or for `noaux_tc` by the sum of their
top-2 biased scores), then top-k inside them.

Shapes: N tokens, E routed experts, k experts per token, D devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.config import ModelConfig
from moray.model.precision import full_precision


@dataclass
class Routing:
    experts: torch.Tensor  # (N, k) long: chosen experts
    weights: torch.Tensor  # (N, k) combine weights (normalized if asked, times routed_scaling_factor)
    affinity: torch.Tensor  # (N, k) unscaled scores of the chosen experts: the drop priority
    scores: torch.Tensor  # (N, E) unbiased probabilities, for the balance losses
    logits: torch.Tensor  # (N, E) raw router logits, for the z-loss


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))  # HF: mlp.gate.weight
        if config.scoring_func == "sigmoid":
            # HF / DeepSeek-V3 name; a buffer: it is set from load statistics, not by gradients.
            self.register_buffer("e_score_correction_bias", torch.zeros(E))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.config
        with full_precision(x.device.type):  # router math in fp32, under autocast too
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        if cfg.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if cfg.topk_method != "greedy":
            choice = self._mask_groups(choice)
        experts = torch.topk(choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False).indices  # (N, k)
        affinity = scores.gather(1, experts)
        weights = affinity
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        if cfg.scoring_func == "sigmoid":  # probabilities for the balance losses
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return Routing(
            experts=experts, weights=weights.type_as(x), affinity=affinity, scores=scores, logits=logits
        )

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        N, E = choice.shape
        grouped = choice.view(N, cfg.n_group, E // cfg.n_group)  # (N, G, E/G)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        else:
            group_scores = grouped.max(dim=-1).values
        keep_groups = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
        # Masked experts get -inf, so they can never be chosen: with noaux_tc the biased scores can be
        # negative and a 0 fill (HF's) would let experts of dropped groups win. Softmax scores are > 0,
        # so for group_limited_greedy this picks exactly what the published reference picks.
        return grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the rest.
        `tokens_per_expert` (E,) should be summed over data-parallel ranks by the caller."""
        if self.e_score_correction_bias is None:
            return
        load = tokens_per_expert.float()
        self.e_score_correction_bias += self.config.bias_update_speed * torch.sign(load.mean() - load)


def contiguous_device_map(n_experts: int, n_devices: int) -> torch.Tensor:
    """Expert e lives on device e // (E / D): the default expert-parallel placement."""
    return torch.arange(n_experts) // (n_experts // n_devices)


class LocalTokens:
    """The tokens that routing decisions are taken over: this process's, the default.

    Capacity (which pairs are dropped) and the balance losses are functions of a whole batch. When
    the batch is split over data- or expert-parallel ranks, a group over all ranks' tokens is
    installed from outside (moray.platform.expert_parallel.GlobalTokens), so every rank takes the
    decision one process would take on the whole batch."""

    def gather(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every rank's rows of `t` (n, ...), rank after rank, (n_all, ...), and where this rank's
        rows start among them. No gradient."""
        return t, 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks; differentiable."""
        return t


LOCAL_TOKENS = LocalTokens()


def balance_losses(
    routing: Routing,
    device_of_expert: torch.Tensor,  # (E,) long
    n_devices: int,
    max_devices_per_token: int,
    tokens: LocalTokens = LOCAL_TOKENS,
) -> dict[str, torch.Tensor]:
    """The unweighted balance losses of DeepSeek-V2 (eqs. 12-20) and the router z-loss, over the
    tokens of `tokens` (this process's, or every rank's: one sum over ranks, differentiable).

    expert_balance = sum_i f_i P_i,        f_i = E/(k N) * #tokens choosing expert i, P_i = mean score
    device_balance = sum_d f'_d P'_d,      f'_d = mean of f over d's experts, P'_d = sum of P over them
    comm_balance   = sum_d f''_d P'_d,     f''_d = D/(M N) * #tokens sending to device d
    z_loss         = mean_t logsumexp(logits_t)^2
    """
    scores, experts = routing.scores, routing.experts
    E, k = scores.shape[1], experts.shape[1]
    device_of_expert = device_of_expert.to(scores.device)
    token_devices = device_of_expert[experts]  # (n, k)
    sent = torch.zeros(len(experts), n_devices, device=scores.device).scatter_(
        1, token_devices, 1.0
    )  # (n, D)
    # Every per-token sum in one vector, so a data-parallel run reduces it with one collective.
    local = torch.cat([
        torch.bincount(experts.reshape(-1), minlength=E).to(scores.dtype),  # (E,) pairs per expert
        scores.sum(dim=0),  # (E,)
        sent.sum(dim=0).to(scores.dtype),  # (D,) tokens sending to each device
        torch.logsumexp(routing.logits, dim=-1).pow(2).sum()[None].to(scores.dtype),
        scores.new_tensor([len(experts)]),  # N
    ])  # fmt: skip
    counts, score_sum, sent_sum, z_sum, N = tokens.sum(local).split([E, E, n_devices, 1, 1])
    counts, sent_sum, N = counts.detach(), sent_sum.detach(), N.detach().clamp_min(1)  # counts: no gradient
    f = counts * E / (k * N)
    P = score_sum / N  # (E,)
    expert_balance = (f * P).sum()

    # (D,); a device without experts (a sparse placement) has f' = 0, not 0/0.
    experts_per_device = torch.bincount(device_of_expert, minlength=n_devices).float().clamp_min(1)
    f_dev = (
        torch.zeros(n_devices, device=scores.device).index_add_(0, device_of_expert, f) / experts_per_device
    )
    P_dev = torch.zeros(n_devices, device=scores.device, dtype=P.dtype).index_add_(0, device_of_expert, P)
    device_balance = (f_dev * P_dev).sum()

    f_comm = sent_sum * n_devices / (max_devices_per_token * N)
    comm_balance = (f_comm * P_dev).sum()

    z_loss = (z_sum / N).squeeze(0)
    return {
        "expert_balance": expert_balance,
        "device_balance": device_balance,
        "comm_balance": comm_balance,
        "router_z_loss": z_loss,
    }


def load_entropy(tokens_per_expert: torch.Tensor) -> float:
    """Entropy of the load distribution over experts, normalized to [0, 1] (1 = perfectly even)."""
    total = tokens_per_expert.sum()
    if total <= 0 or tokens_per_expert.numel() < 2:
        return 1.0
    p = tokens_per_expert.float() / total
    h = -(p * p.clamp_min(1e-30).log()).sum()
    return float(h / math.log(tokens_per_expert.numel()))
