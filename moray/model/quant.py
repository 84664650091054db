"""Weight-only quantization: int8 with per-output-channel scales, and group-wise int4.

Every nn.Linear (attention, dense MLPs, shared experts; the output head optionally) and every
routed expert's stacked weights are stored quantized; activations stay in floating point.
`quantization_report` measures the logit error and the memory saved against the original model.

- **int8** (`INT8`): symmetric, one fp32 scale per output channel (scale = max|w| / 127); about
  a quarter of fp32's bytes.
- **int4** (`INT4`): asymmetric, one bf16 scale and zero per group of 32 inputs of each output
  channel, two weights packed in a byte (the layout of `torch._weight_int4pack_mm_for_cpu`);
  about an eighth of fp32's bytes plus the groups' scales. The kernel wants output channels in
  multiples of 16 and inputs in multiples of the group: a linear of other shapes stays as it is.

How the quantized weights are multiplied:
- on the CPU without autograd, through each format's fused weight-only kernel, which reads the
  quantized weight as it multiplies, with bf16 activations: int8 up to FUSED_MAX_ROWS rows
  (`torch._weight_int8pack_mm`, whose time grows with the rows), int4 at any size
  (`torch._weight_int4pack_mm_for_cpu`, which is blocked for many rows too). The routed experts run
  it once per hit expert and never expand a stack (int4 in prefill as well);
- anything else (autograd, other devices, int8 prefill): the weight is dequantized for the product,
  so the model code is unchanged: modules expose `.weight` (or the experts' `gate_up_proj` /
  `down_proj`) as dequantized tensors.
"""

from __future__ import annotations

import copy
import math

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


class Int8Format:
    """Symmetric int8, a scale per output channel. Buffers: qweight (out, in) int8, scale (out,)
    fp32; scale_bf16 is the kernel's copy (not saved)."""

    name = "int8"
    few_rows_per_expert = RoutedExperts.FEW_ROWS_PER_EXPERT  # prefill: the grouped GEMM on dequantized stacks

    def fits(self, weight: torch.Tensor) -> bool:
        return True

    def pack(self, w: torch.Tensor) -> dict[str, torch.Tensor]:  # w (..., out, in)
        q, scale = quantize_per_channel(w)
        return {"qweight": q, "scale": scale}

    def derived(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"scale_bf16": packed["scale"].to(torch.bfloat16)}

    def dequantize(self, b: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(b["qweight"], b["scale"], dtype)

    def fused(self, x: torch.Tensor) -> bool:
        return cpu_inference(x) and x.numel() <= FUSED_MAX_ROWS * x.shape[-1]

    def matmul(self, x: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return int8_linear(x, b["qweight"], b["scale_bf16"])


class Int4Format:
    """Asymmetric int4 in groups of GROUP inputs: w ~= (q - 8) * scale + zero, q in [0, 15].
    Buffers: qweight (out, in / 2) uint8, two weights a byte in the CPU kernel's layout, and
    scales_and_zeros (in / GROUP, out, 2) bf16 (the kernel's layout too). Nothing else is kept."""

    name = "int4"
    GROUP = 32
    few_rows_per_expert = math.inf  # the kernel is blocked for many rows: every routed pass is per expert

    def fits(self, weight: torch.Tensor) -> bool:
        out, inp = weight.shape[-2:]
        return out % 16 == 0 and inp % self.GROUP == 0

    def pack(self, w: torch.Tensor) -> dict[str, torch.Tensor]:  # w (..., out, in)
        if w.dim() > 2:  # a stack: each expert on its own, stacked
            parts = [self.pack(wi) for wi in w.detach().unbind(0)]
            return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
        if w.device.type != "cpu":
            raise ValueError(f"int4 weights run on the CPU's kernel only; this weight is on {w.device}")
        out, inp = w.shape
        groups = w.detach().float().view(out, inp // self.GROUP, self.GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)  # (out, in / GROUP)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        zero = lo + 8 * scale  # the kernel's form: (q - 8) * scale + zero
        return {
            "qweight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out, inp), 1),
            "scales_and_zeros": torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous(),
        }

    def derived(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def dequantize(self, b: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The kernel's product with the identity is the weight's transpose, exactly (in bf16)."""
        if b["qweight"].dim() > 2:
            return torch.stack(
                [self.dequantize({k: v[e] for k, v in b.items()}, dtype) for e in range(len(b["qweight"]))]
            )
        inp = b["scales_and_zeros"].shape[0] * self.GROUP
        eye = torch.eye(inp, dtype=torch.bfloat16, device=b["qweight"].device)
        return self.matmul(eye, b).t().to(dtype).contiguous()  # (out, in)

    def fused(self, x: torch.Tensor) -> bool:
        return cpu_inference(x)

    def matmul(self, x: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """x (..., in) times the int4 weight: (..., out) in x's dtype."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, b["qweight"], self.GROUP, b["scales_and_zeros"]
        )
        return out.view(*x.shape[:-1], -1).to(x.dtype)


INT8, INT4 = Int8Format(), Int4Format()
FORMATS = {f.name: f for f in (INT8, INT4)}


def _register(module: nn.Module, prefix: str, fmt, w: torch.Tensor) -> None:
    packed = fmt.pack(w)
    for k, v in packed.items():
        module.register_buffer(prefix + k, v)
    for k, v in fmt.derived(packed).items():
        module.register_buffer(prefix + k, v, persistent=False)


def _buffers(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in module.named_buffers(recurse=False) if k.startswith(prefix)}


class QuantizedLinear(nn.Module):
    """An nn.Linear whose weight is stored in `fmt` (bias as it was)."""

    def __init__(self, linear: nn.Linear, fmt=INT8):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        _register(self, "", fmt, linear.weight)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.fmt.dequantize(_buffers(self, ""), self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt.fused(x):
            out = self.fmt.matmul(x, _buffers(self, ""))
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


class QuantizedRoutedExperts(RoutedExperts):
    """RoutedExperts whose stacked weights are stored in `fmt`. On the CPU without autograd the
    format's kernel runs once per hit expert (few_rows_ffn; int4 at any size); anything else runs
    on the dequantized stacks."""

    def __init__(self, experts: RoutedExperts, fmt=INT8):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: no float weights are allocated
        for k, v in vars(experts).items():
            if not k.startswith("_"):
                setattr(self, k, v)
        self.beta, self.activation_scale = experts.beta, experts.activation_scale
        self.fmt, self.dtype = fmt, experts.gate_up_proj.dtype
        self.FEW_ROWS_PER_EXPERT = fmt.few_rows_per_expert
        for name in ("gate_up_proj", "down_proj"):
            _register(self, f"{name}_", fmt, getattr(experts, name))

    @property
    def gate_up_proj(self) -> torch.Tensor:  # (E, 2I, H)
        return self.fmt.dequantize(_buffers(self, "gate_up_proj_"), self.dtype)

    @property
    def down_proj(self) -> torch.Tensor:  # (E, H, I)
        return self.fmt.dequantize(_buffers(self, "down_proj_"), self.dtype)

    def few_rows_ffn(
        self,
        x: torch.Tensor,  # (N, H)
        token_of_row: torch.Tensor,  # (P,) pairs sorted by expert
        counts: torch.Tensor,  # (E,)
    ) -> torch.Tensor:
        """down_e(silu(gate_e(x)) * up_e(x)) for each pair's row through the format's fused kernel,
        one pair of products per hit expert: (P, H), unweighted, in x's dtype."""
        gate_up, down = _buffers(self, "gate_up_proj_"), _buffers(self, "down_proj_")
        I = self.width  # noqa: E741
        rows = x.index_select(0, token_of_row).to(torch.bfloat16)  # (P, H)
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            h = self.fmt.matmul(rows[start : start + n], {k: v[e] for k, v in gate_up.items()})  # (n, 2I)
            act = F.silu(h[:, :I]) * h[:, I:]  # (n, I)
            out[start : start + n] = self.fmt.matmul(act, {k: v[e] for k, v in down.items()})
            start += n
        return out.to(x.dtype)


def quantize(
    model: nn.Module, fmt: str = "int8", include_head: bool = False, inplace: bool = False
) -> nn.Module:
    """Return the model with its weights in `fmt` ("int8" or "int4"; a copy unless inplace).
    Weights the format cannot hold (int4: shapes the kernel does not take) stay as they are."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize={fmt!r}: one of {', '.join(FORMATS)}")
    f = FORMATS[fmt]
    model = model if inplace else copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedExperts) and not isinstance(child, QuantizedRoutedExperts):
                if f.fits(child.gate_up_proj) and f.fits(child.down_proj):
                    setattr(parent, name, QuantizedRoutedExperts(child, f))
            elif (
                isinstance(child, nn.Linear) and (include_head or name != "lm_head") and f.fits(child.weight)
            ):
                setattr(parent, name, QuantizedLinear(child, f))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (what a checkpoint or replica holds)."""
    seen, total = set(), 0
    persistent = {id(b) for b in model.state_dict(keep_vars=True).values()}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or id(t) not in persistent:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantization_report(
    model: nn.Module, input_ids: torch.Tensor, fmt: str = "int8", include_head: bool = False
) -> dict:
    """Logit error and memory saved by `fmt` weights on `input_ids` (B, T)."""
    model = model.eval()
    quantized = quantize(model, fmt, include_head=include_head).eval()
    ref = model(input_ids).logits.float()
    got = quantized(input_ids).logits.float()
    err = (got - ref).abs()
    before, after = weight_bytes(model), weight_bytes(quantized)
    return {
        "format": fmt,
        "max_abs_logit_error": float(err.max()),
        "mean_abs_logit_error": float(err.mean()),
        "relative_logit_error": float(err.norm() / ref.norm()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "bytes_before": before,
        "bytes_after": after,
        "memory_saved_fraction": 1 - after / before,
    }
