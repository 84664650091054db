"""Weight-only int8 quantization with per-output-channel scales.

Every nn.Linear (attention, dense MLPs, shared experts; the output head optionally) and every
routed expert's stacked weights are stored as int8 plus one fp32 scale per output channel
(symmetric, scale = max|w| / 127). Activations stay in floating point: weights are dequantized
on the fly, so the model code is unchanged — modules expose `.weight` (or the experts'
`gate_up_proj` / `down_proj`) as dequantized tensors. Memory drops to about a quarter of fp32;
`quantization_report` measures the logit error against the original model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.experts import RoutedExperts


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) -> int8 (..., out, in), scale (..., out): w ~= q * scale[..., None]."""
    scale = w.detach().abs().amax(dim=-1).float().clamp_min(1e-12) / 127.0
    q = torch.round(w.detach().float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) * scale[..., None].to(dtype)).contiguous()


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8RoutedExperts(RoutedExperts):
    """RoutedExperts whose stacked weights live in int8; `forward` is inherited unchanged."""

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

    @property
    def gate_up_proj(self) -> torch.Tensor:  # (E, 2I, H)
        return dequantize(self.q_gate_up_proj, self.scale_gate_up_proj, self.dtype)

    @property
    def down_proj(self) -> torch.Tensor:  # (E, H, I)
        return dequantize(self.q_down_proj, self.scale_down_proj, self.dtype)


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
