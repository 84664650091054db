"""Routed experts computed as grouped matmuls: no Python loop over tokens.

Token-expert pairs are sorted by expert so each expert's rows are contiguous, then one grouped
GEMM does every expert's gate+up projection and another the down projection. Weights are
stacked as HF's fused layout: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I).

The published model (SiLU, no per-expert scales) runs gather -> FFN -> weighted combine as one
autograd Function with a hand-written backward. Autograd's own graph for the same computation
adds an accumulating index_put for the gather's backward (~7% of a training step on the small
preset) and weight gradients in the transposed layout, copied back into the parameters'.
The extras (learned beta, activation scale) keep the plain autograd path. CPU inference with a
handful of rows per expert (decode) loops over the hit experts instead: see
swiglu_experts_few_rows.

Shapes: N tokens, k experts per token, P kept pairs (<= N*k), E experts, H hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moray.model import cpu_kernels
from moray.model.cpu_kernels import OuterSegment
from moray.model.norm import swish
from moray.model.precision import autocast_dtype


def cpu_inference(x: torch.Tensor) -> bool:
    """The decode paths' condition: CPU tensors and no autograd graph to keep."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and all(s == 1 or s * t.element_size() % 16 == 0 for s in t.stride())


def _has_grouped_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Can F.grouped_mm take these operands? Its CPU kernel runs fp32/bf16 with 16-byte aligned
    strides; CUDA's wants bf16. Anything else (fp32 on GPUs, fp64 for gradcheck) loops instead."""
    if not hasattr(F, "grouped_mm"):
        return False
    if a.device.type == "cpu":
        return a.dtype in (torch.float32, torch.bfloat16) and _aligned(a) and _aligned(b)
    return a.dtype == torch.bfloat16


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of a (P, K), grouped by `counts` (E,), each times its group's b (E, K, M): (P, M)."""
    C = _uniform(a, counts)
    if C is not None:
        return torch.bmm(a.view(len(counts), C, -1), b).flatten(0, 1)
    if _has_grouped_mm(a, b):
        return F.grouped_mm(a, b, offs=counts.cumsum(0).to(torch.int32))
    # Fallback: unbind's backward is one stack, not E scatters.
    return torch.cat([ai @ bi for ai, bi in zip(a.split(counts.tolist()), b.unbind(0))], dim=0)


def grouped_outer(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per group e, a_e.T @ b_e for rows a (P, K), b (P, M) grouped by `counts`: (E, K, M).
    This is the weight gradient of a grouped matmul; an empty group gives zeros."""
    C = _uniform(a, counts)
    if C is not None:
        E = len(counts)
        return torch.bmm(a.view(E, C, -1).transpose(1, 2), b.view(E, C, -1))
    if _has_grouped_mm(a, b):
        return F.grouped_mm(a.t(), b, offs=counts.cumsum(0).to(torch.int32))
    return torch.stack([ai.t() @ bi for ai, bi in zip(a.split(counts.tolist()), b.split(counts.tolist()))])


def _uniform(a: torch.Tensor, counts: torch.Tensor) -> int | None:
    """C when every group has the same C > 0 rows (padded pairs): one bmm over (E, C, K) views."""
    E, P = len(counts), a.shape[0]
    C = P // E if E else 0
    return C if C > 0 and C * E == P and bool((counts == C).all()) else None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (P, in), grouped by `counts` (E,), each times its group's weight (E, out, in).T."""
    return grouped_matmul(x, weight.transpose(-1, -2), counts)


def gathered_linear(
    x: torch.Tensor, token_of_row: torch.Tensor | None, weight: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """grouped_linear of the rows x[token_of_row] (None: x's rows as they are), without autograd:
    (P, out). Where the CPU has AMX, moray's kernel reads the rows in place and the weights in their
    own layout (oneDNN's bmm reorders the transposed weights on every call: 3.1 against 4.2 ms for
    a 64 x 512 x 512 stack at 60 rows per expert, the gather included) up to a training micro-batch's
    rows per expert (cpu_kernels.ROWS_LINEAR_ROWS_PER_EXPERT); prefill's thousands keep the bmm."""
    rows = x.shape[0] if token_of_row is None else token_of_row.shape[0]
    if cpu_kernels.rows_linear_usable(x, weight, rows):
        return cpu_kernels.grouped_rows_linear(x, token_of_row, weight, counts)
    return grouped_linear(x if token_of_row is None else x.index_select(0, token_of_row), weight, counts)


class SwiGLUExperts(torch.autograd.Function):
    """out = sum over pairs p of token t: w_p * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = p's expert.

    Pairs come sorted by expert (`counts` per expert). Saves x, the pre-activation (P, 2I) and
    the routing; the gathered rows and the activation are recomputed in backward (a gather and
    an elementwise pass, cheap next to holding another (P, H) and (P, I) per layer).

    `weight_grads` (RoutedExperts.weight_grads), where given, may take a weight's gradient as the
    operands of its product (`defer(name, segment)` returns True for a cpu_kernels.OuterSegment): the
    weight then gets no gradient from autograd and the sink accumulates the product itself. The
    segment skips a padded grid's padding rows (`unpadded`: the real pairs' grid rows and their counts
    per expert) and reads x's rows in place.
    """

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, row_weights, token_of_row, counts, weight_grads=None,
                unpadded=None):  # fmt: skip
        h = gathered_linear(x, token_of_row, gate_up_proj, counts)  # (P, 2I)
        act = swiglu(h)  # (P, I)
        out_rows = gathered_linear(act, None, down_proj, counts)  # (P, H)
        ctx.save_for_backward(x, gate_up_proj, down_proj, row_weights, token_of_row, counts, h)
        ctx.weight_grads, ctx.unpadded = weight_grads, unpadded
        return combine(out_rows, row_weights, token_of_row, x)  # (N, H)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N, H)
        x, gate_up_proj, down_proj, row_weights, token_of_row, counts, h = ctx.saved_tensors
        need_x, need_gate_up, need_down, need_weights = ctx.needs_input_grad[:4]
        grad_rows = grad_out.index_select(0, token_of_row)  # (P, H)
        grad_act = grouped_matmul(grad_rows, down_proj, counts)  # (P, I) before the routing weight
        grad_h, act_w, grad_weights = swiglu_backward(grad_act, h, row_weights)
        # the weight gradients' rows: every row, or a padded grid's real ones (for a sink only)
        real, real_counts = ctx.unpadded if ctx.unpadded is not None else (None, counts)
        tokens = token_of_row if real is None or ctx.weight_grads is None else token_of_row[real]
        grad_down = _weight_grad(
            ctx.weight_grads, "down_proj", OuterSegment(grad_rows, act_w, real_counts, real, real),
            lambda: grouped_outer(grad_rows, act_w, counts), need_down,
        )  # fmt: skip
        grad_gate_up = _weight_grad(
            ctx.weight_grads, "gate_up_proj", OuterSegment(grad_h, x, real_counts, real, tokens),
            lambda: grouped_outer(grad_h, x.index_select(0, token_of_row), counts), need_gate_up,
        )  # (E, 2I, H)  # fmt: skip
        grad_x = None
        if need_x:
            grad_x = combine(grouped_matmul(grad_h, gate_up_proj, counts), None, token_of_row, x)  # (N, H)
        grad_weights = grad_weights if need_weights else None
        return grad_x, grad_gate_up, grad_down, grad_weights, None, None, None, None


def _weight_grad(sink, name: str, segment: OuterSegment, dense, needed: bool):
    """The gradient of weight `name`, per expert the segment's a rows .T @ b rows (E, M, N): None where
    it is not needed or the sink took the segment, else `dense()`, the same product from the padded
    operands as they are."""
    if not needed or (sink is not None and sink.defer(name, segment)):
        return None
    return dense()


def combine(rows: torch.Tensor, weights: torch.Tensor | None, token_of_row: torch.Tensor, like: torch.Tensor):
    """Each token's rows (P, H), weighted (P,) or not, summed: (N, H) like `like`."""
    if cpu_kernels.combine_usable(rows) and like.dtype == rows.dtype:
        return cpu_kernels.combine_rows(rows, weights, token_of_row, like.shape[0])
    if weights is not None:
        rows = rows * weights[:, None]
    return torch.zeros_like(like).index_add_(0, token_of_row, rows)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] (P, 2I): (P, I)."""
    if cpu_kernels.swiglu_usable(h):
        return cpu_kernels.swiglu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(
    grad_act: torch.Tensor,  # (P, I) d out through the down projection, before the routing weights
    h: torch.Tensor,  # (P, 2I) [gate | up]
    row_weights: torch.Tensor,  # (P,) w in out = w * down(act)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d h (P, 2I) = [d gate | d up], act * w (P, I), d w (P,)). d w is <grad_act, act>: out_p =
    w_p * down(act_p) and <grad, down(act)> = <down^T grad, act>."""
    if cpu_kernels.swiglu_usable(h):
        return cpu_kernels.swiglu_backward(grad_act, h, row_weights)
    gate, up = h.chunk(2, dim=-1)
    silu = F.silu(gate)
    act = silu * up  # (P, I)
    grad_weights = (grad_act * act).sum(-1)  # (P,)
    grad_act = grad_act * row_weights[:, None]
    grad_h = torch.empty_like(h)
    I = up.shape[-1]  # noqa: E741
    torch.mul(grad_act, silu, out=grad_h[:, I:])
    grad_h[:, :I] = torch.ops.aten.silu_backward(grad_act * up, gate)
    return grad_h, act * row_weights[:, None], grad_weights


def swiglu_experts_few_rows(
    x: torch.Tensor,  # (N, H)
    token_of_row: torch.Tensor,  # (P,) pairs sorted by expert
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    down_proj: torch.Tensor,  # (E, H, I)
    counts: torch.Tensor,  # (E,)
) -> torch.Tensor:
    """down_e(silu(gate_e(x)) * up_e(x)) for each pair's row, when experts get a handful of rows each
    (decode): (P, H), unweighted.

    Then the cost is streaming each hit expert's weights once, and MKL streams them several times
    faster as W (out, in) @ x.T (in, n) than as x @ W.T (what F.linear and grouped_mm run), or than
    its matrix-vector path for n = 1. So a lone row is read together with the next one (a spare
    row at the end makes that always possible) and the extra output column is dropped.
    Inference only: no autograd graph is kept through the per-expert slices.
    """
    I = down_proj.shape[-1]  # noqa: E741
    spare = token_of_row[-1:]
    rows = x.index_select(0, torch.cat([token_of_row, spare]))  # (P + 1, H)
    out = torch.empty_like(rows[:-1])  # (P, H)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        x_t = rows[start : start + max(n, 2)].t()  # (H, n')
        h_t = gate_up_proj[e] @ x_t  # (2I, n')
        act_t = F.silu(h_t[:I]) * h_t[I:]  # (I, n')
        out[start : start + n] = (down_proj[e] @ act_t)[:, :n].t()
        start += n
    return out


class RoutedExperts(nn.Module):
    # Up to this many rows per expert on average, CPU inference takes the per-expert W @ x.T loop
    # (swiglu_experts_few_rows): decode, small batches. Beyond it the grouped GEMM wins.
    FEW_ROWS_PER_EXPERT = 4
    # bf16 decode weights over all experts (moray.model.decode_weights.for_decode sets them)
    dense_decode = None
    # where the weights' gradients may go instead of autograd (SwiGLUExperts; moray.jobs.pretrain.
    # working_weights sets it: fp32 accumulation of every micro-batch's products at once)
    weight_grads = None

    def __init__(self, n_experts: int, hidden: int, width: int, learned_beta: bool, activation_scale: bool):
        super().__init__()
        self.n_experts, self.width = n_experts, width
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, width))
        self.beta = nn.Parameter(torch.ones(n_experts)) if learned_beta else None
        self.activation_scale = nn.Parameter(torch.ones(n_experts)) if activation_scale else None

    def few_rows_ffn(
        self,
        x: torch.Tensor,  # (N, H)
        token_of_row: torch.Tensor,  # (P,) pairs sorted by expert
        counts: torch.Tensor,  # (E,)
    ) -> torch.Tensor:
        """Each pair's row through its expert when experts get a handful of rows each, in
        inference on the CPU: (P, H), unweighted. Subclasses with other weight storage (quantized)
        override this and keep the rest of forward."""
        dtype = autocast_dtype(x.device.type) or x.dtype
        gate_up, down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        return swiglu_experts_few_rows(x.to(dtype), token_of_row, gate_up, down, counts)

    def forward(
        self,
        x: torch.Tensor,  # (N, H)
        experts: torch.Tensor,  # (N, k)
        weights: torch.Tensor,  # (N, k)
        keep: torch.Tensor | None = None,  # (N, k) bool: pairs that fit in capacity
    ) -> torch.Tensor:
        if self.dense_decode is not None and cpu_inference(x):
            routed = experts.numel() if keep is None else int(keep.sum())
            few_rows = routed <= self.FEW_ROWS_PER_EXPERT * self.n_experts
            if few_rows and self.dense_decode.worth_it(routed):  # it needs the pairs in no order: no sort
                return self.dense_decode(x, experts, weights, keep).to(x.dtype)
        pairs = sort_pairs(experts, weights, keep, self.n_experts)
        token_of_row, counts = pairs.token_of_row, pairs.counts

        if self.beta is None and self.activation_scale is None:
            few_rows = len(token_of_row) <= self.FEW_ROWS_PER_EXPERT * self.n_experts
            if few_rows and cpu_inference(x):
                out_rows = self.few_rows_ffn(x, token_of_row, counts)  # (P, H)
                row_weights = pairs.weights.to(out_rows.dtype)[:, None]
                out = out_rows.new_zeros(x.shape).index_add_(0, token_of_row, out_rows * row_weights)
                return out.to(x.dtype)
            # autocast does not reach into the Function: its operands are cast as a linear's would be
            # (the casts' backward brings the weights' gradients back to fp32); no-ops otherwise
            dtype = autocast_dtype(x.device.type) or x.dtype
            xc, gate_up, down = x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
            padded = padded_for_bmm(pairs, xc)
            unpadded = None if padded.grid_rows is None else (padded.grid_rows, pairs.counts)
            out = SwiGLUExperts.apply(
                xc, gate_up, down, padded.weights.to(dtype), padded.token_of_row, padded.counts, self.weight_grads,
                unpadded,
            )  # fmt: skip
            return out.to(x.dtype)
        pairs = padded_for_bmm(pairs, x)
        out_rows = experts_ffn(
            x[pairs.token_of_row], pairs.expert_of_row, pairs.counts, self.gate_up_proj, self.down_proj, self.beta,
            self.activation_scale,
        )  # fmt: skip
        row_weights = pairs.weights.to(x.dtype)[:, None]  # (P, 1)
        return torch.zeros_like(x).index_add_(0, pairs.token_of_row, out_rows * row_weights)  # (N, H)


@dataclass
class SortedPairs:
    """The kept token-expert pairs, sorted by expert (P of them)."""

    token_of_row: torch.Tensor  # (P,) the token each row comes from
    expert_of_row: torch.Tensor  # (P,) ascending
    weights: torch.Tensor  # (P,) combine weights
    counts: torch.Tensor  # (E,) rows per expert
    grid_rows: torch.Tensor | None = None  # padded_for_bmm's grid: the row of each real pair, in order


def sort_pairs(
    experts: torch.Tensor,  # (N, k)
    weights: torch.Tensor,  # (N, k)
    keep: torch.Tensor | None,  # (N, k) bool, or None: every pair
    n_experts: int,
) -> SortedPairs:
    N, k = experts.shape
    flat_experts, flat_weights = experts.reshape(-1), weights.reshape(-1)  # (N*k,)
    pair_token = torch.arange(N * k, device=experts.device) // k
    if keep is not None:
        kept = keep.reshape(-1).nonzero().squeeze(1)
        flat_experts, flat_weights, pair_token = flat_experts[kept], flat_weights[kept], pair_token[kept]
    order = torch.argsort(flat_experts, stable=True)
    expert_of_row = flat_experts[order]
    counts = torch.bincount(expert_of_row, minlength=n_experts)
    return SortedPairs(pair_token[order], expert_of_row, flat_weights[order], counts)


def padded_for_bmm(pairs: SortedPairs, like: torch.Tensor) -> SortedPairs:
    """For bf16 on the CPU (`like` is the rows' tensor): the pairs laid out as an (E, C) grid of
    groups padded to the largest, C, so that every grouped product is one bmm over views.

    F.grouped_mm's CPU kernel runs one GEMM per group; at the few dozen to few hundred rows per
    expert of a training micro-batch one padded bmm is 2-3x faster in bf16, and slower in fp32
    (benchmarks/bench_moe.py). Padding the pairs once, and not each product's operands, saves the
    zero-filling, copying in and copying out around every product (a quarter of a bf16 MoE step).
    A padding slot repeats token 0 with combine weight 0: it adds nothing to the output or to any
    gradient. Elsewhere, or where padding would more than double the rows, the pairs are returned
    as they are. The weights' padding is differentiable (router gradients flow back to the pairs).
    """
    counts = pairs.counts
    P, E = len(pairs.token_of_row), len(counts)
    if like.device.type != "cpu" or like.dtype != torch.bfloat16 or E < 2 or P == 0:
        return pairs  # (no rows: every pair dropped, or a pipeline stage's shape probe)
    C = int(counts.max())
    if C * E > 2 * P:
        return pairs
    first = counts.cumsum(0) - counts  # (E,) each group's first row
    slots = (
        pairs.expert_of_row * C + torch.arange(P, device=counts.device) - first[pairs.expert_of_row]
    )  # (P,)

    def spread(v: torch.Tensor) -> torch.Tensor:  # (P,) -> (E*C,), zeros in the padding
        return v.new_zeros(E * C).index_copy(0, slots, v)

    expert_of_slot = torch.arange(E, device=counts.device).repeat_interleave(C)
    return SortedPairs(
        spread(pairs.token_of_row), expert_of_slot, spread(pairs.weights), torch.full_like(counts, C), slots
    )


def experts_ffn(
    rows: torch.Tensor,  # (P, H) sorted by expert
    expert_of_row: torch.Tensor,  # (P,)
    counts: torch.Tensor,  # (E,)
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    down_proj: torch.Tensor,  # (E, H, I)
    beta: torch.Tensor | None = None,  # (E,) learned Swish beta
    activation_scale: torch.Tensor | None = None,  # (E,)
) -> torch.Tensor:
    """Each row through its expert, unweighted, with autograd's own backward (the extras' path):
    (P, H)."""
    gate, up = grouped_linear(rows, gate_up_proj, counts).chunk(2, dim=-1)  # (P, I) each
    act = swish(gate, None if beta is None else beta[expert_of_row, None]) * up
    if activation_scale is not None:
        act = act * activation_scale[expert_of_row, None]
    return grouped_linear(act, down_proj, counts)
