"""Expert parallelism, applied from outside the model (torchtitan's ExpertParallel).

Two pieces, installed on every MoE layer from outside (moray/jobs/pretrain/parallel.py):

GlobalTokens    (`install_global_tokens`) capacity and the balance losses decided over the whole batch, every data-parallel
                rank's tokens, as one process would decide them (model/router.py, LocalTokens).
ExpertShard     (`apply_expert_parallel`) the layer's routed experts split over the `ep` ranks, E/ep each, as DTensors
                (Shard(0) on the "ep" mesh dimension, so checkpoints and the HF export see whole
                tensors). Token-expert pairs travel to the rank that holds their expert and back
                with `all_to_all_single` (uneven splits, differentiable); shared experts, the router
                and attention stay local. The combine weights are applied where the token lives.

Expert-parallel ranks are data-parallel ranks: each has its own batch slice. Gradients: the loss
each rank backpropagates is its own tokens' mean, so an expert's gradient arrives summed over the
ranks of its ep group; divided by dp (and summed over the dp/ep groups that hold the same expert)
it is the one-process gradient of the global mean; `fully_shard` is told so with
`set_gradient_divide_factor(dp)`.

Shapes: N tokens here, k experts per token, P pairs sent, R pairs received, E experts, H hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from moray.model.experts import (
    RoutedExperts,
    SortedPairs,
    SwiGLUExperts,
    experts_ffn,
    padded_for_bmm,
    sort_pairs,
)


class GlobalTokens:
    """Every rank of `group`'s tokens, rank after rank (see moray.model.router.LocalTokens)."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @torch.no_grad()
    def gather(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        sizes = torch.zeros(self.world, dtype=torch.long, device=t.device)
        sizes[self.rank] = len(t)
        dist.all_reduce(sizes, group=self.group)  # ranks may hold different numbers of real tokens
        sizes = sizes.tolist()
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[: self.rank])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(t, "sum", self.group)


@dataclass
class AllToAllStats:
    """What this process's expert dispatch sent to other ranks (forward and backward), since reset."""

    bytes_sent: int = 0
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent, self.seconds, self.calls = 0, 0.0, 0


ALL_TO_ALL = AllToAllStats()


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows of x, in_splits[r] of them to rank r; out_splits[r] rows from rank r (blocking)."""
    t0 = time.perf_counter()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    me = dist.get_rank(group)
    ALL_TO_ALL.bytes_sent += (sum(in_splits) - in_splits[me]) * x[:1].numel() * x.element_size()
    ALL_TO_ALL.seconds += time.perf_counter() - t0
    ALL_TO_ALL.calls += 1
    return out


class _AllToAll(torch.autograd.Function):
    """`_exchange`, whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows of x, in_splits[r] of them to rank r; out_splits[r] rows from rank r. Differentiable;
    counted in ALL_TO_ALL."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertShard(nn.Module):
    """This rank's E/ep routed experts of one MoE layer; a drop-in for RoutedExperts.

    The parameters keep RoutedExperts' names and whole shapes as DTensors sharded on the experts
    dimension, so state dicts, checkpoints and exports do not change with the layout."""

    def __init__(self, experts: RoutedExperts, ep_mesh):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        self.n_experts = experts.n_experts
        self.ep = ep_mesh.size()
        if self.n_experts % self.ep:
            raise ValueError(f"{self.n_experts} routed experts do not split over ep={self.ep} ranks")
        self.n_local = self.n_experts // self.ep
        self.group = ep_mesh.get_group()
        first = ep_mesh.get_local_rank() * self.n_local
        for name, param in experts.named_parameters(recurse=False):
            local = param.detach()[first : first + self.n_local].clone()
            shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            self.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
        for name in ("beta", "activation_scale"):
            if not hasattr(self, name):
                setattr(self, name, None)

    def _local(self, name: str) -> torch.Tensor | None:
        p = getattr(self, name)
        return None if p is None else p.to_local()

    def forward(
        self,
        x: torch.Tensor,  # (N, H)
        experts: torch.Tensor,  # (N, k)
        weights: torch.Tensor,  # (N, k)
        keep: torch.Tensor | None = None,  # (N, k) bool: pairs that fit in capacity
    ) -> torch.Tensor:
        pairs = sort_pairs(experts, weights, keep, self.n_experts)  # by expert, so by destination rank
        token_of_row, counts = pairs.token_of_row, pairs.counts

        # How many rows each rank sends us for each of our experts: (ep, E/ep), source-major.
        from_rank = torch.empty_like(counts)
        dist.all_to_all_single(from_rank, counts, group=self.group)
        from_rank = from_rank.view(self.ep, self.n_local)
        send = counts.view(self.ep, self.n_local).sum(1).tolist()
        recv = from_rank.sum(1).tolist()
        rows = _all_to_all(x.index_select(0, token_of_row), recv, send, self.group)  # (R, H)

        # Received rows come source-major; the grouped GEMM wants them expert-major.
        local_expert = torch.repeat_interleave(
            torch.arange(self.n_local, device=x.device).repeat(self.ep), from_rank.reshape(-1)
        )  # (R,)
        by_expert = torch.argsort(local_expert, stable=True)
        out = self._ffn(rows, by_expert, local_expert[by_expert], from_rank.sum(0))  # (R, H), rows' order

        back = _all_to_all(out, send, recv, self.group)  # (P, H), this rank's pairs
        row_weights = pairs.weights.to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_row, back * row_weights[:, None])  # (N, H)

    def _ffn(self, rows, by_expert, expert_of_sorted, local_counts) -> torch.Tensor:
        """Each received row through its expert, unweighted, in the order received."""
        gate_up, down = self._local("gate_up_proj"), self._local("down_proj")
        if self.beta is None and self.activation_scale is None:
            # The fused forward/backward: gathers rows by expert and scatters the results back.
            pairs = padded_for_bmm(
                SortedPairs(by_expert, expert_of_sorted, rows.new_ones(len(rows)), local_counts), rows
            )
            return SwiGLUExperts.apply(rows, gate_up, down, pairs.weights, pairs.token_of_row, pairs.counts)
        out_sorted = experts_ffn(rows.index_select(0, by_expert), expert_of_sorted, local_counts, gate_up, down,
                                 self._local("beta"), self._local("activation_scale"))  # fmt: skip
        return torch.zeros_like(rows).index_add_(0, by_expert, out_sorted)


def install_global_tokens(model: nn.Module, group) -> None:
    """Decide capacity and balance over every rank of `group` (the data-parallel ranks)."""
    tokens = GlobalTokens(group)
    for _, moe in model.moe_layers():
        moe.tokens = tokens


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    """Split every MoE layer's routed experts over the ranks of `ep_mesh`."""
    for _, moe in model.moe_layers():
        moe.experts = ExpertShard(moe.experts, ep_mesh)
