"""bf16 weights laid out for decode on the CPU: what `generate` and the engine stream each step.

A decode step multiplies a handful of rows by every weight it touches, so its speed is how fast
the weights stream from memory. Plain bf16 `F.linear` streams a (32000, 512) head at about 17 GB/s
for 8 rows; the same weight reordered once into oneDNN's blocked layout streams at about 33
(benchmarks/bench_decode.py measures the whole step). So `for_decode`:

- casts the model to bf16 (the latent cache follows the weights' dtype: half the bytes too);
- keeps each linear (the output head, attention's projections, dense and shared MLPs) as a
  `PackedLinear`: the blocked copy, beside the plain weight that a tied embedding and MLA's
  absorbed attention still read;
- gives each plain routed-expert stack a `DenseDecodeExperts`. Where moray's expert kernel builds
  (`moray.model.cpu_kernels`: AVX-512 BF16, compiled on first use), it reads only the hit
  experts, each once, from the bf16 stacks themselves. Elsewhere, the E experts as two blocked
  matrices, so that once the step's tokens hit many experts the whole layer is two products over
  every expert (the unrouted ones weighted zero) instead of two small products per hit expert,
  whose per-call cost dominates at decode sizes (3x at 8 tokens x top-6 of 64).

Inference only: the blocked copies are not parameters, and training or autograd never sees them.
They are a snapshot of the weights when `for_decode` ran (load new weights into the model first),
and they sit beside the bf16 weights, so the whole takes about the memory of fp32 weights.
"""

from __future__ import annotations

import copy
import ctypes
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from moray.model import cpu_kernels
from moray.model.experts import RoutedExperts


def onednn_bf16() -> bool:
    """Whether this CPU build runs oneDNN's bf16 kernels on native instructions."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _blocked(weight: torch.Tensor, rows_hint: int = 8) -> torch.Tensor:
    """weight (out, in) bf16 reordered into oneDNN's layout for products with about rows_hint rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def _blocked_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ the blocked weight's (out, in).T (+ bias): (..., out)."""
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), blocked, bias, "none", [], "")
    return out.view(*x.shape[:-1], -1)


class PackedLinear(nn.Module):
    """A bf16 linear with a blocked copy of its weight for CPU inference; autograd and other
    devices use the plain weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters (a tied head stays tied)
        self.blocked = _blocked(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if self.bias is None and cpu_kernels.linear_usable(x, self.weight):
            return cpu_kernels.few_rows_linear(x, self.weight)  # few rows, a small weight: moray's kernel
        return _blocked_linear(x.to(torch.bfloat16), self.blocked, self.bias)


class DenseDecodeExperts:
    """Routed experts (E, 2I, H) and (E, H, I) as two blocked matrices over all of them:
    gate_up (E·2I, H) and down (H, E·I). For N tokens with top-k experts each:

        h   = x @ gate_up.T                         (N, E, 2I)  every expert on every token
        a   = silu(h[..., :I]) * h[..., I:] * w     (N, E, I)   w: the combine weight, 0 if unrouted
        out = a.flatten(1) @ down.T                 (N, H)      the weighted sum over experts
    """

    def __init__(self, experts: RoutedExperts):
        E, two_i, H = experts.gate_up_proj.shape
        self.n_experts, self.width = E, two_i // 2
        # Where moray's expert kernel builds, it reads only the hit experts, from the bf16 stacks
        # themselves (moray.model.cpu_kernels): faster at every decode size, and no blocked copy.
        self.stacks = None
        if cpu_kernels.usable(experts.gate_up_proj, experts.down_proj):
            self.stacks = (experts.gate_up_proj, experts.down_proj)
            return
        self.gate_up = _blocked(experts.gate_up_proj.detach().reshape(E * two_i, H))
        self.down = _blocked(experts.down_proj.detach().permute(1, 0, 2).reshape(H, E * self.width))

    def worth_it(self, pairs: int) -> bool:
        """Streaming every expert beats the per-expert loop once the pairs could hit half of them;
        the kernel beats it at any number."""
        return self.stacks is not None or 2 * pairs >= self.n_experts

    def __call__(
        self,
        x: torch.Tensor,  # (N, H)
        experts: torch.Tensor,  # (N, k)
        weights: torch.Tensor,  # (N, k)
        keep: torch.Tensor | None,  # (N, k) bool
    ) -> torch.Tensor:
        if self.stacks is not None:
            return cpu_kernels.hit_experts_ffn(x, experts, weights, keep, *self.stacks)
        N, I = x.shape[0], self.width  # noqa: E741
        x = x.to(torch.bfloat16)
        if keep is not None:
            weights = weights * keep
        w = x.new_zeros(N, self.n_experts).scatter_(1, experts, weights.to(x.dtype))  # (N, E)
        h = _blocked_linear(x, self.gate_up, None).view(N, self.n_experts, 2 * I)
        a = F.silu(h[..., :I]) * h[..., I:] * w[..., None]  # (N, E, I)
        return _blocked_linear(a.flatten(1), self.down, None)  # (N, H)


HUGE_PAGE = 2 << 20


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor in memory that Linux backs with 2 MB pages (transparent huge pages,
    asked for with madvise before the first touch), or `t` itself where that is not available.

    A decode step streams every weight it touches once; with 4 KB pages each 4 KB of it is a TLB
    miss and a page walk. In 2 MB pages the routed experts' layer at 8 tokens took 1.21 ms against
    1.40 and the small preset's bf16 step 8.9 ms against 10.0 (this round's Intel Xeon). PyTorch can
    do this for every allocation (THP_MEM_ALLOC_ENABLE=1), but only when set before its first one."""
    madv = getattr(mmap, "MADV_HUGEPAGE", None)
    if madv is None or t.device.type != "cpu" or t.nbytes < HUGE_PAGE:
        return t
    size = -(-t.nbytes // HUGE_PAGE) * HUGE_PAGE
    # private and anonymous (a shared mapping is shmem, which THP leaves alone); 4 KB aligned, so one
    # spare huge page to start on a 2 MB boundary
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE
    region.madvise(madv, start, size)
    out = torch.frombuffer(region, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)
    return out.copy_(t)  # the tensor keeps the mapping alive


@torch.no_grad()
def for_decode(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model (a copy unless inplace) in bf16 with its head and routed experts laid out for CPU
    decode, its weights in huge pages. Without native bf16 (oneDNN), only the cast."""
    model = (model if inplace else copy.deepcopy(model)).to(torch.bfloat16)
    if not onednn_bf16():
        return model
    for param in model.parameters():
        param.data = in_huge_pages(param.data)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
    for module in model.modules():
        plain = type(module) is RoutedExperts and module.beta is None and module.activation_scale is None
        if plain and module.gate_up_proj.device.type == "cpu":
            module.dense_decode = DenseDecodeExperts(module)
    return model
