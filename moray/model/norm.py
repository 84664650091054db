"""RMSNorm and the SwiGLU feed-forward used by dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moray.model import cpu_kernels
from moray.model.linear import SmallBatchLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.norm_usable(x, self.weight):  # bf16 CPU inference: one call
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if torch.is_grad_enabled() and cpu_kernels.norm_train_usable(x, self.weight):  # CPU training
            return TrainingRMSNorm.apply(x, self.weight, self.eps)
        if x.dtype == self.weight.dtype:
            # PyTorch's fused form, computed in fp32: bit-identical to the form below in fp32 (in bf16
            # it rounds once, after the weight) and fewer ops: decode runs 13 norms a step.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()  # HF's form; a bf16 activation with fp32 weights (autocast) comes out fp32
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class TrainingRMSNorm(torch.autograd.Function):
    """RMSNorm.forward's two PyTorch forms (an fp32 weight; fp32 or bf16 rows) as one kernel call each
    way (cpu_kernels.rms_norm_train): fp32 out = w * round_to_x_dtype(x * rsqrt(mean(x^2) + eps)).
    The backward rounds the gradient of the rounded product to x's dtype, as autograd's does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out, r = cpu_kernels.rms_norm_train(x, weight, eps)  # (..., D) fp32, (N,)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        grad_x, grad_weight = cpu_kernels.rms_norm_train_backward(grad_out, x, r, weight)
        return grad_x, grad_weight, None


def swish(x: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """Swish(x) = x * sigmoid(beta * x); beta None is SiLU (beta = 1), the published model."""
    return F.silu(x) if beta is None else x * torch.sigmoid(beta * x)


class SwiGLU(nn.Module):
    """down(swish(gate(x)) * up(x)), optionally with a learned beta in the swish."""

    def __init__(self, hidden_size: int, intermediate_size: int, learned_beta: bool = False):
        super().__init__()
        self.gate_proj = SmallBatchLinear(hidden_size, intermediate_size, bias=False)
        self.up_proj = SmallBatchLinear(hidden_size, intermediate_size, bias=False)
        self.down_proj = SmallBatchLinear(intermediate_size, hidden_size, bias=False)
        self.beta = nn.Parameter(torch.ones(())) if learned_beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swish(self.gate_proj(x), self.beta) * self.up_proj(x))
