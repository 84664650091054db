"""Routed experts computed as grouped matmuls: no Python loop over tokens (nor over experts).

Token-expert pairs are sorted by expert so each expert's rows are contiguous, then one grouped
GEMM does every expert's gate+up projection and another the down projection. Weights are
stacked as HF's fused layout: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I).

Shapes: N tokens, k experts per token, P kept pairs (<= N*k), E experts, H hidden, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.norm import swish


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (P, in), grouped by `counts` (E,), each times its group's weight (E, out, in).T."""
    if hasattr(F, "grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        offs = counts.cumsum(0).to(torch.int32)
        return F.grouped_mm(x, weight.transpose(-1, -2), offs=offs)
    # Fallback (fp32 on CUDA, older torch): unbind's backward is one stack, not E scatters.
    chunks = x.split(counts.tolist())
    return torch.cat([xi @ wi.T for xi, wi in zip(chunks, weight.unbind(0))], dim=0)


class RoutedExperts(nn.Module):
    def __init__(self, n_experts: int, hidden: int, width: int, learned_beta: bool, activation_scale: bool):
        super().__init__()
        self.n_experts, self.width = n_experts, width
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, width))
        self.beta = nn.Parameter(torch.ones(n_experts)) if learned_beta else None
        self.activation_scale = nn.Parameter(torch.ones(n_experts)) if activation_scale else None

    def forward(
        self,
        x: torch.Tensor,  # (N, H)
        experts: torch.Tensor,  # (N, k)
        weights: torch.Tensor,  # (N, k)
        keep: torch.Tensor | None = None,  # (N, k) bool: pairs that fit in capacity
    ) -> torch.Tensor:
        N, k = experts.shape
        flat_experts = experts.reshape(-1)  # (N*k,)
        flat_weights = weights.reshape(-1)
        pair_token = torch.arange(N * k, device=x.device) // k
        if keep is not None:
            kept = keep.reshape(-1).nonzero().squeeze(1)
            flat_experts, flat_weights, pair_token = flat_experts[kept], flat_weights[kept], pair_token[kept]
        order = torch.argsort(flat_experts, stable=True)
        expert_of_row = flat_experts[order]  # (P,) sorted
        token_of_row = pair_token[order]
        counts = torch.bincount(expert_of_row, minlength=self.n_experts)  # (E,)

        rows = x[token_of_row]  # (P, H)
        gate, up = grouped_linear(rows, self.gate_up_proj, counts).chunk(2, dim=-1)  # (P, I) each
        beta = None if self.beta is None else self.beta[expert_of_row, None]
        act = swish(gate, beta) * up
        if self.activation_scale is not None:
            act = act * self.activation_scale[expert_of_row, None]
        out_rows = grouped_linear(act, self.down_proj, counts)  # (P, H)
        out_rows = out_rows * flat_weights[order, None].to(out_rows.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_row, out_rows)  # (N, H)
