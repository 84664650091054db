"""Weight-only int8 quantization with per-output-channel scales.

Every nn.Linear (attention, dense MLPs, shared experts; the output head optionally) and every
routed expert's stacked weights are stored as int8 plus one fp32 scale per output channel
(symmetric, scale = max|w| / 127). Activations stay in floating point; memory drops to about a
quarter of fp32. `quantization_report` measures the logit error against the original model.

How the int8 weights are multiplied:
- decode on the CPU (a handful of rows, no autograd): `torch._weight_int8pack_mm`, the fused
  weight-only kernel, reads the int8 weight once per product with bf16 activations; the routed
  experts run it per hit expert (`int8_experts_few_rows`), never expanding a stack;
- anything else (prefill, autograd, other devices): the weight is dequantized for the product,
  so the model code is unchanged: modules expose `.weight` (or the experts' `gate_up_proj` /
  `down_proj`) as dequantized tensors.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.experts import RoutedExperts, cpu_inference


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) -> int8 (..., out, in), scale (..., out): w ~= q * scale[..., None]."""
    scale = w.detach().abs().amax(dim=-1).float().clamp_min(1e-12) / 127.0
    q = torch.round(w.detach().float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) * scale[..., None].to(dtype)).contiguous()


# Up to this many rows, a CPU product without autograd runs the fused int8 kernel (its time grows with
# the rows: 0.36 ms for a (32000, 512) head at 1 row, 1.6 at 8, 6.7 at 32, where dequantizing the
# weight for an fp32 product takes 54-68 ms). Past it (prefill) the product is compute-bound:
# dequantize and run the GEMM.
FUSED_MAX_ROWS = 64


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """x (..., in) times the int8 weight q (out, in) with per-row scales (out,), fused: the weight
    is read as int8 and never expanded. Activations go in as bf16 (the kernel's fast dtype on this
    CPU; fp32 takes 10-20x longer), the result comes back in x's dtype: (..., out)."""
    out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), q, scale_bf16)
    return out.view(*x.shape[:-1], -1).to(x.dtype)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_inference(x) and x.numel() <= FUSED_MAX_ROWS * x.shape[-1]:
            out = int8_linear(x, self.qweight, self.scale_bf16)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


def int8_experts_few_rows(
    x: torch.Tensor,  # (N, H)
    token_of_row: torch.Tensor,  # (P,) pairs sorted by expert
    experts: Int8RoutedExperts,
    counts: torch.Tensor,  # (E,)
) -> torch.Tensor:
    """down_e(silu(gate_e(x)) * up_e(x)) for each pair's row through the fused int8 kernel, one
    pair of products per hit expert (decode): (P, H), unweighted, in x's dtype."""
    I = experts.q_down_proj.shape[-1]  # noqa: E741
    rows = x.index_select(0, token_of_row).to(torch.bfloat16)  # (P, H)
    out = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        h = int8_linear(
            rows[start : start + n], experts.q_gate_up_proj[e], experts.bf16_scale_gate_up_proj[e]
        )
        act = F.silu(h[:, :I]) * h[:, I:]  # (n, I)
        out[start : start + n] = int8_linear(act, experts.q_down_proj[e], experts.bf16_scale_down_proj[e])
        start += n
    return out.to(x.dtype)


class Int8RoutedExperts(RoutedExperts):
    """RoutedExperts whose stacked weights live in int8. Decode on the CPU runs the fused kernel
    per hit expert (few_rows_ffn); anything else runs on the dequantized stacks."""

    def __init__(self, experts: RoutedExperts):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: no fp32 weights are allocated
        for k, v in vars(experts).items():
            if not k.startswith("_"):
                setattr(self, k, v)
        self.beta, self.activation_scale = experts.beta, experts.activation_scale
        self.dtype = experts.gate_up_proj.dtype
        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize_per_channel(getattr(experts, name))
            self.register_buffer(f"q_{name}", q)
            self.register_buffer(f"scale_{name}", scale)
            self.register_buffer(f"bf16_scale_{name}", scale.to(torch.bfloat16), persistent=False)

    @property
    def gate_up_proj(self) -> torch.Tensor:  # (E, 2I, H)
        return dequantize(self.q_gate_up_proj, self.scale_gate_up_proj, self.dtype)

    @property
    def down_proj(self) -> torch.Tensor:  # (E, H, I)
        return dequantize(self.q_down_proj, self.scale_down_proj, self.dtype)

    def few_rows_ffn(self, x, token_of_row, counts):  # decode: the fused kernel per hit expert
        return int8_experts_few_rows(x, token_of_row, self, counts)


def quantize_int8(model: nn.Module, include_head: bool = False, inplace: bool = False) -> nn.Module:
    """Return the model with int8 weights (a copy unless inplace)."""
    model = model if inplace else copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedExperts) and not isinstance(child, Int8RoutedExperts):
                setattr(parent, name, Int8RoutedExperts(child))
            elif isinstance(child, nn.Linear) and (include_head or name != "lm_head"):
                setattr(parent, name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (what a checkpoint or replica holds)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantization_report(model: nn.Module, input_ids: torch.Tensor, include_head: bool = False) -> dict:
    """Logit error and memory saved by int8 weights on `input_ids` (B, T)."""
    model = model.eval()
    quantized = quantize_int8(model, include_head=include_head).eval()
    ref = model(input_ids).logits.float()
    got = quantized(input_ids).logits.float()
    err = (got - ref).abs()
    before, after = weight_bytes(model), weight_bytes(quantized)
    return {
        "max_abs_logit_error": float(err.max()),
        "mean_abs_logit_error": float(err.mean()),
        "relative_logit_error": float(err.norm() / ref.norm()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "bytes_before": before,
        "bytes_after": after,
        "memory_saved_fraction": 1 - after / before,
    }
