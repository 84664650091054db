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

Only the weights autocast would cast are swapped (linear layers and the routed experts' stacks):
embeddings, norms and the router's weight stay fp32, and autocast still runs around the forward for
the activations. Models whose parameters are DTensors (FSDP, tensor parallelism) or pipeline stages
take FSDP's policy or autocast instead.
"""

from __future__ import annotations

import torch
from torch import nn

from moray.model.experts import RoutedExperts


class WorkingWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        matmul = [m for m in model.modules() if isinstance(m, nn.Linear | RoutedExperts)]
        # a weight also used elsewhere (an output head tied to the embedding) stays fp32
        elsewhere = {id(p) for m in model.modules() if m not in matmul for p in m.parameters(recurse=False)}
        self.params: list[nn.Parameter] = []
        for module in matmul:
            for p in module.parameters(recurse=False):
                if p.requires_grad and p.dim() >= 2 and type(p) is nn.Parameter and id(p) not in elsewhere:
                    self.params.append(p)
        self.working = [torch.empty_like(p, dtype=dtype) for p in self.params]
        self.grads = [torch.empty_like(p) for p in self.params]  # fp32, like the masters
        # one fp32 staging buffer for the largest weight: converting there and adding fp32 to fp32
        # is 4x faster than a mixed-dtype add_ (13 vs 54 ms for a 64 x 512 x 512 stack)
        largest = max(self.params, key=torch.numel, default=torch.empty(0))
        self.staging = torch.empty(largest.numel(), device=largest.device)
        self.masters: list[torch.Tensor] = []
        self.fresh = [False] * len(self.params)  # no gradient yet this step
        self.index = {id(p): i for i, p in enumerate(self.params)}
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._accumulate)

    @classmethod
    def for_layout(cls, model: nn.Module, layout) -> WorkingWeights | None:
        """Working copies where they apply: bf16 compute on one process's plain parameters."""
        if layout.compute_dtype == torch.float32 or layout.world_size > 1:
            return None
        return cls(model, layout.compute_dtype)

    def __enter__(self) -> WorkingWeights:
        self.masters = [p.data for p in self.params]
        with torch.no_grad():
            for p, w in zip(self.params, self.working):
                w.copy_(p.data)
                p.data = w
        self.fresh = [True] * len(self.params)
        return self

    def _accumulate(self, p: nn.Parameter) -> None:
        if not self.masters:  # outside a step: an ordinary fp32 parameter
            return
        i = self.index[id(p)]
        if self.fresh[i]:
            self.grads[i].copy_(p.grad)
            self.fresh[i] = False
        else:
            staged = self.staging[: p.numel()].view_as(p.grad)
            self.grads[i].add_(staged.copy_(p.grad))
        p.grad = None  # the bf16 gradient is spent: the next micro-batch starts a new one

    def __exit__(self, *exc) -> None:
        for i, (p, master) in enumerate(zip(self.params, self.masters)):
            p.data = master
            p.grad = None if self.fresh[i] else self.grads[i]
        self.masters = []
