"""The optimizer step of replicas that share one machine, split between them (ZeRO-1 in shared
memory): one copy of the fp32 weights, of AdamW's moments and of the bf16 working copies, in /dev/shm
files every replica maps, each replica updating its 1/W of the elements.

Replicated bf16 training on the CPU (WorkingWeights with a group) otherwise runs the whole update on
every replica, on its one thread: the mean of every gradient (each rank averages its part, then
copies the other ranks' averaged parts back), the whole model's gradient norm, and AdamW over every
weight. On the small preset at 2 ranks on 2 cores that was 78 + 28 + 124 ms of a 630 ms step,
against 14 + 63 ms for one process on both cores: each replica did the work one process does, at
half its threads.

Here the weights, moments and copies are already where every replica reads them, so nothing is
gathered after the update. After the backward each rank sums its part of the gradient over every
rank's buffer (`BufferMean.sum_part_`); the norm is the sum of the parts' squares, all-reduced; each
rank's AdamW kernel (moray.model.cpu_kernels.adamw_step_) updates its part of the weights and
moments and rounds its part of the copies; a barrier closes the step. The sum stands for the mean:
the kernel divides the gradients by W on the way (times the clip's factor): for a power of two W,
bit for bit the arithmetic of averaging first.

What else sees the state sees torch's: each parameter is a view of the shared weights, and its
AdamW state (`exp_avg`, `exp_avg_sq`) views of the shared moments, complete on every rank after the
step's barrier, so checkpoints save and load as before. A load that replaces a state tensor (or a
parameter's storage) is taken back into shared memory at the next step, each rank copying its part.
A parameter's `.grad` is the mean nowhere: within this rank's part it holds the sum over the ranks,
outside it this rank's own gradient. Clipping per layer or per expert, which needs whole mean
gradients, is refused (keep those on the full mean: WorkingWeights(shard_optimizer=False)).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from moray.model import cpu_kernels
from moray.platform.buffer_mean import BufferMean, shared_tensor


class SharedUpdate:
    """`params`: the parameters whose gradients `mean` holds, in its order; `copied`: those with
    bf16 working copies (`copies`, in their order). Build with `create`."""

    # elements: every shared tensor starts on a 64-byte boundary, as an allocator's would (packed
    # end to end, a scalar parameter would shift the later ones off the 16-byte alignment that
    # F.grouped_mm's CPU kernel takes, moray.model.experts._has_grouped_mm)
    ALIGN = 32

    def __init__(self, params: list[nn.Parameter], copied: list[nn.Parameter], mean: BufferMean,
                 optimizer, weights: torch.Tensor, moments: torch.Tensor, copies: torch.Tensor):  # fmt: skip
        self.mean, self.optimizer, self.group = mean, optimizer, mean.group
        self.lo, self.hi = mean.bounds[mean.rank], mean.bounds[mean.rank + 1]  # this rank's elements
        # a parameter's first element in the gradients' flat layout (this rank's part is [lo, hi))
        self.start = dict(zip(params, itertools.accumulate((p.numel() for p in params), initial=0)))
        owned = _owned(optimizer, params)  # the ones the optimizer updates: weights and moments shared
        at, _ = _aligned_offsets(owned, self.ALIGN)
        self.weights = {p: weights[at[p] : at[p] + p.numel()].view_as(p) for p in owned}
        self.exp_avg = {p: moments[0, at[p] : at[p] + p.numel()].view_as(p) for p in owned}
        self.exp_avg_sq = {p: moments[1, at[p] : at[p] + p.numel()].view_as(p) for p in owned}
        at, _ = _aligned_offsets(copied, self.ALIGN)
        self.copies = {p: copies[at[p] : at[p] + p.numel()].view_as(p) for p in copied}
        with torch.no_grad():
            if mean.rank == 0:  # rank 0's weights (and any state) for every replica, as DDP broadcasts them
                for p in owned:
                    self.weights[p].copy_(p.data)
                    for key, shared in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                        if key in optimizer.state.get(p, {}):
                            shared[p].copy_(optimizer.state[p][key])
            dist.barrier(group=self.group)
            for p in owned:
                p.data = self.weights[p]
                state = optimizer.state[p]  # AdamW's, as torch initializes it, on the shared moments
                state.setdefault("step", torch.tensor(0.0))
                state["exp_avg"], state["exp_avg_sq"] = self.exp_avg[p], self.exp_avg_sq[p]

    @classmethod
    def create(cls, params: list[nn.Parameter], copied: list[nn.Parameter], mean: BufferMean,
               optimizer) -> SharedUpdate | None:  # fmt: skip
        """The shared update, or None on every rank where it cannot run on one: gradients not in
        shared memory, an optimizer other than moray's AdamW in its plain form, no AdamW kernel,
        /dev/shm too small. A collective."""
        ok = mean.slots is not None and hasattr(optimizer, "shared_update") and optimizer.plain()
        ok = ok and bool(params) and cpu_kernels.adamw_usable(*params)
        agreed = torch.tensor([int(ok)])  # (one rank's kernel build can fail)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=mean.group)
        if not agreed:
            return None
        _, numel = _aligned_offsets(_owned(optimizer, params), cls.ALIGN)
        weights = shared_tensor((numel,), torch.float32, mean.group)
        moments = shared_tensor((2, numel), torch.float32, mean.group) if weights is not None else None
        _, n_copies = _aligned_offsets(copied, cls.ALIGN)
        copies = shared_tensor((n_copies,), torch.bfloat16, mean.group) if moments is not None else None
        if copies is None:
            return None
        return cls(params, copied, mean, optimizer, weights, moments, copies)

    def mine(self, p: nn.Parameter) -> slice | None:
        """This rank's elements of p (of its flattened view), or None."""
        a = self.start[p]
        lo, hi = max(self.lo, a), min(self.hi, a + p.numel())
        return slice(lo - a, hi - a) if lo < hi else None

    def reduce_gradients(self) -> None:
        """This rank's part of the gradients, summed over the ranks (after the backward). The other
        ranks read this rank's buffer until they have summed their parts: no rank writes its buffer
        again before the step's closing barrier and the next step's opening one (WorkingWeights)."""
        self.mean.sum_part_()

    def grad_norm(self) -> float:
        """The 2-norm of the mean gradient: every rank's part's, all-reduced."""
        part = self.mean.part(self.mean.rank, self.mean.buffer)
        # BLAS's dot in pieces, summed in double (one dot over 40M values accumulates in fp32)
        squares = torch.tensor(sum(float(torch.dot(c, c)) for c in part.split(1 << 20)), dtype=torch.float64)
        dist.all_reduce(squares, group=self.group)
        return float(squares.sqrt()) / self.mean.world

    def step(self, grad_scale: float | None) -> None:
        """AdamW on this rank's part; then every rank's part is done (a barrier)."""
        opt = self.optimizer
        if not opt.plain():
            raise ValueError("the shared update runs plain AdamW: a loaded state dict turned on amsgrad, "
                             "maximize, capturable or differentiable")  # fmt: skip
        scale = self.mean.world * (1.0 if grad_scale is None else float(grad_scale))
        for group in opt.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, copies, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p not in self.weights:
                    continue
                state = opt.state[p]
                state.setdefault("step", torch.tensor(0.0))  # (a loaded state dict may lack it)
                state["step"] += 1
                part = self.mine(p)
                self._take_back(p, state, part)
                if part is None:
                    continue
                params.append(p.data.reshape(-1)[part])
                grads.append(p.grad.reshape(-1)[part])
                exp_avgs.append(state["exp_avg"].reshape(-1)[part])
                exp_avg_sqs.append(state["exp_avg_sq"].reshape(-1)[part])
                copies.append(self.copies[p].reshape(-1)[part] if p in self.copies else None)
                steps.append(float(state["step"]))
            cpu_kernels.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, copies, steps, float(group["lr"]),
                                    *group["betas"], group["weight_decay"], group["eps"], scale)  # fmt: skip
        dist.barrier(group=self.group)  # the new weights and copies, whole, before anyone reads them

    def _take_back(self, p: nn.Parameter, state: dict, part: slice | None) -> None:
        """A parameter or state tensor a load replaced (every rank loaded the same): this rank's
        part of it into shared memory (the others copy theirs), and the shared view back in its
        place; a moment the load lacked starts at zero, as torch's would."""
        for key, shared in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            if key not in state or state[key].data_ptr() != shared[p].data_ptr():
                if part is not None:
                    mine = shared[p].reshape(-1)[part]
                    if key in state:
                        mine.copy_(state[key].reshape(-1)[part])
                    else:
                        mine.zero_()
                state[key] = shared[p]
        if p.data.data_ptr() != self.weights[p].data_ptr():
            if part is not None:
                self.weights[p].reshape(-1)[part].copy_(p.data.reshape(-1)[part])
            p.data = self.weights[p]


def _owned(optimizer, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Those of `params` in one of the optimizer's groups, in their order."""
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [p for p in params if id(p) in ids]


def _aligned_offsets(params: list[nn.Parameter], align: int) -> tuple[dict, int]:
    """Each parameter's first element in a flat buffer where every one starts at a multiple of
    `align`, and the buffer's size."""
    offsets, at = {}, 0
    for p in params:
        offsets[p] = at
        at += -(-p.numel() // align) * align
    return offsets, at
