"""bf16 working copies of the matmul weights, cast once per optimizer step.

Under autocast every micro-batch casts every fp32 weight to bf16 again, into a freshly allocated
tensor, and casts its gradient back to fp32 on the way out. On the CPU that is most of bf16's
gain lost: a 64 x 512 x 512 expert stack takes 20 ms to cast into a new tensor (the allocator maps
and faults in fresh pages) against 7 ms into one that exists.

`WorkingWeights` keeps one bf16 buffer per weight and one fp32 gradient buffer, both for the life
of the run. Around a step's forward and backward passes (`with working:`) each weight's storage is
swapped for its bf16 copy, refreshed from the fp32 master once; each micro-batch's bf16 gradient is
added into the fp32 buffer as soon as autograd has it; on exit the fp32 masters and their fp32
gradients are back, for clipping, the optimizer and checkpoints, which never see bf16. This is what
FSDP2's MixedPrecisionPolicy does for sharded models (dp > 1), and apex's O2 did before it.

Given moray's AdamW (`optimizer`), the refresh is the optimizer's: its fused CPU step writes each
copy from the new weight in the same pass, and the cast on entry is skipped for every weight that
has not changed since (a 29 ms pass over the small preset's 80M working weights).

The routed experts' weight gradients skip the bf16 round trip where the CPU has AMX: their
backward hands the products' operands (a few dozen rows per expert) to the working weights, which
run one product per expert for all of the step's micro-batches at its end, accumulating in fp32
straight into the gradient buffer (moray.model.cpu_kernels.grouped_outer_into). Per micro-batch,
oneDNN's bf16 bmm, widening and adding took 44 ms a step for one 64 x 512 x 512 stack of the small
preset at 2 micro-batches; the deferred product 7. The operands wait at most until they would
outweigh the fp32 gradient itself, then fold into it. The fold also sums the squares of the
gradient it writes (`squares`): the global clip's norm takes them instead of reading the experts'
gradients again (12 of a bf16 step's 400 ms on the small preset).

Only the weights autocast would cast are swapped (linear layers and the routed experts' stacks):
embeddings, norms and the router's weight stay fp32, and autocast still runs around the forward for
the activations. Models whose parameters are DTensors (FSDP, tensor parallelism) or pipeline stages
take FSDP's policy or autocast instead.

Replicated data parallelism on the CPU (dp_mode "replicate") reduces the gradients here too, since
DDP takes only gradients of its parameters' dtype: with a `group`, every parameter's gradient
accumulates into one flat fp32 buffer, averaged over the group at the end of the step
(`BufferMean`: through shared memory when the ranks share this machine). Under DDP and autocast two
ranks in bf16 were slower than in fp32 (682 against 968 tokens/s on a 2-core Xeon); with the
working weights they reach 888-893 against DDP's 649-673 (an alternating A/B on that machine).
Where the buffer is in shared memory and the optimizer is moray's AdamW, the replicas also share
one copy of the weights, AdamW's moments and the working copies, and each updates its part of them
(shared_update.py: ZeRO-1 without the gathers): each rank then sums only its part of the gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moray.jobs.pretrain.shared_update import SharedUpdate
from moray.model import cpu_kernels
from moray.model.experts import RoutedExperts
from moray.platform.buffer_mean import BufferMean


class _ExpertGrads:
    """One RoutedExperts module's `weight_grads`: its stacks' products go to the working weights."""

    def __init__(self, owner: WorkingWeights, module: RoutedExperts):
        self.owner = owner
        self.index = {name: owner.index[id(getattr(module, name))] for name in ("gate_up_proj", "down_proj")}

    def defer(self, name: str, segment: cpu_kernels.OuterSegment) -> bool:
        return self.owner.defer(self.index[name], segment)


class WorkingWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, group=None, optimizer=None,
                 shard_optimizer: bool = True):  # fmt: skip
        matmul = [m for m in model.modules() if isinstance(m, nn.Linear | RoutedExperts)]
        # a weight also used elsewhere (an output head tied to the embedding) stays fp32
        elsewhere = {id(p) for m in model.modules() if m not in matmul for p in m.parameters(recurse=False)}
        self.params: list[nn.Parameter] = []  # swapped for their working copies in a step
        for module in matmul:
            for p in module.parameters(recurse=False):
                if p.requires_grad and p.dim() >= 2 and type(p) is nn.Parameter and id(p) not in elsewhere:
                    self.params.append(p)
        # an optimizer that refreshes the copies in its step (optim.AdamW) spares __enter__ the cast
        self.optimizer = optimizer if hasattr(optimizer, "copies") and dtype == torch.bfloat16 else None
        # the parameters whose gradients accumulate here: the working weights', and, replicated over
        # a group, every parameter's (the group averages one flat buffer)
        self.accumulated = [p for p in model.parameters() if p.requires_grad] if group else list(self.params)
        numel = sum(p.numel() for p in self.accumulated)
        device = self.params[0].device if self.params else "cpu"
        self.mean = BufferMean(numel, group, device=device) if group is not None else None
        # replicas on this machine: one copy of the weights, moments and working copies, each rank
        # updating its part (shared_update.py); else every rank averages and updates everything
        self.shared = None
        if shard_optimizer and self.mean is not None and self.optimizer is not None:
            self.shared = SharedUpdate.create(self.accumulated, self.params, self.mean, self.optimizer)
            self.optimizer.shared_update = self.shared
        if self.shared is not None:
            self.working = [self.shared.copies[p] for p in self.params]
        else:
            self.working = [torch.empty_like(p, dtype=dtype) for p in self.params]
        if self.optimizer is not None:
            self.optimizer.copies.update(zip(self.params, self.working))
        flat = self.mean.buffer if self.mean is not None else torch.empty(numel, device=device)  # fp32
        self.grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in self.accumulated]),
                                                      self.accumulated)]  # fmt: skip
        # one fp32 staging buffer for the largest weight: converting there and adding fp32 to fp32
        # is 4x faster than a mixed-dtype add_ (13 vs 54 ms for a 64 x 512 x 512 stack)
        largest = max(self.params, key=torch.numel, default=torch.empty(0))
        self.staging = torch.empty(largest.numel(), device=largest.device)
        self.masters: list[torch.Tensor] = []
        self.in_step = False
        self.fresh = [False] * len(self.accumulated)  # no gradient yet this step
        self.index = {id(p): i for i, p in enumerate(self.accumulated)}
        for p in self.accumulated:
            p.register_post_accumulate_grad_hook(self._accumulate)
        self.pending: dict[int, list] = {}  # gradient index -> its deferred products' OuterSegments
        # id(parameter) -> the sum of squares of its step's gradient, where the fold computed it as it
        # wrote the gradient (the global clip's norm then skips a pass over it); not over a group,
        # whose mean changes the gradients after
        self.squares: dict[int, float] = {}
        working = {id(p) for p in self.params}
        for m in model.modules():
            if isinstance(m, RoutedExperts) and {id(m.gate_up_proj), id(m.down_proj)} <= working:
                m.weight_grads = _ExpertGrads(self, m)

    @classmethod
    def for_layout(cls, model: nn.Module, layout, group=None, optimizer=None,
                   shard_optimizer: bool = True) -> WorkingWeights | None:  # fmt: skip
        """Working copies where they apply (`layout.working_weights`): bf16 compute on one process's
        plain parameters, or on the CPU's replicas, whose gradients are averaged over `group`."""
        if not layout.working_weights:
            return None
        return cls(model, layout.compute_dtype, group if layout.world_size > 1 else None, optimizer,
                   shard_optimizer)  # fmt: skip

    def __enter__(self) -> WorkingWeights:
        self.masters = [p.data for p in self.params]
        refreshed = self.optimizer.refreshed if self.optimizer is not None else {}
        with torch.no_grad():
            for p, w in zip(self.params, self.working):
                if refreshed.get(p) != (p._version, p.data_ptr()):  # changed since the optimizer's copy
                    if self.shared is None:
                        w.copy_(p.data)
                    elif (part := self.shared.mine(p)) is not None:  # the other ranks cast theirs
                        w.reshape(-1)[part].copy_(p.data.reshape(-1)[part])
                p.data = w
        if self.shared is not None:
            dist.barrier(group=self.mean.group)  # every rank's part cast
        self.fresh = [True] * len(self.accumulated)
        self.squares.clear()
        self.in_step = True
        return self

    def _accumulate(self, p: nn.Parameter) -> None:
        if not self.in_step or p.grad is None:  # outside a step: an ordinary fp32 parameter; or deferred
            return
        i = self.index[id(p)]
        grad, into = p.grad, self.grads[i]
        if self.fresh[i]:
            into.copy_(grad)
            self.fresh[i] = False
        elif grad.dtype == into.dtype:
            into.add_(grad)
        else:
            into.add_(self.staging[: p.numel()].view_as(grad).copy_(grad))
        p.grad = None  # spent: the next micro-batch starts a new one

    def defer(self, i: int, segment: cpu_kernels.OuterSegment) -> bool:
        """Take gradient i's product, a.T @ b per expert over the segment's rows (from the experts'
        backward), to run with the step's others; False where the kernel cannot (outside a step, no
        AMX): autograd's then."""
        if not self.in_step or not cpu_kernels.outer_usable(self.grads[i], segment.a, segment.b):
            return False
        pending = self.pending.setdefault(i, [])
        pending.append(segment)
        if sum(s.nbytes for s in pending) >= self.grads[i].nbytes:
            self._fold(i)
        return True

    def _fold(self, i: int) -> None:
        """Gradient i's deferred products into its fp32 buffer, and its sum of squares as it ends."""
        squares = cpu_kernels.grouped_outer_into(
            self.grads[i], self.pending.pop(i), accumulate=not self.fresh[i]
        )
        self.squares[id(self.accumulated[i])] = squares
        self.fresh[i] = False

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            for i in list(self.pending):
                self._fold(i)
        self.pending.clear()
        self.in_step = False
        for p, master in zip(self.params, self.masters):
            p.data = master
        self.masters = []
        if self.mean is not None or exc_type is not None:
            self.squares.clear()
        if self.mean is not None and exc_type is None:
            for i in range(len(self.accumulated)):
                if self.fresh[i]:  # no gradient on this rank: it adds 0 to the mean
                    self.grads[i].zero_()
            if self.shared is not None:  # each rank its part (of the sum: the optimizer divides)
                self.shared.reduce_gradients()
            else:
                self.mean.mean_()
            self.fresh = [False] * len(self.accumulated)  # every parameter takes part, as under DDP
        for i, p in enumerate(self.accumulated):
            p.grad = None if self.fresh[i] else self.grads[i]
