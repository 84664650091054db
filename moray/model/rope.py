"""Rotary position embedding for MLA's decoupled key, with YaRN and moray's RoPE extras.

DeepSeek-V2 rotates *interleaved* pairs (x[2i], x[2i+1]) (HF does it with complex numbers), and
YaRN multiplies cos/sin by its attention factor mscale(factor, mscale) / mscale(factor, mscale_all_dim).

Extras (off by default): a RoPE base per head, learned wavelengths (inverse frequencies as
parameters, stored in log space), both for the shared rope key of MLA. YaRN applies to them too,
through `yarn_blend`, which works from each frequency's rotations over the original context instead
of its index, so it takes any frequencies (per head, learned); the published path keeps
`yarn_inv_freq`, whose integer-truncated ramp HF's parity needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moray.model import cpu_kernels
from moray.model.config import ModelConfig, yarn_mscale


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)


def yarn_attention_factor(scaling: dict) -> float:
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return float(attention_factor)


def _yarn_betas(scaling: dict) -> tuple[float, float]:
    return scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1


def yarn_inv_freq(dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN's blend of interpolated and extrapolated frequencies, and its attention factor."""
    factor = float(scaling["factor"])
    original_max = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = _yarn_betas(scaling)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):  # HF's option (gpt-oss turns it off); DeepSeek truncates
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = default_inv_freq(dim, base)
    interpolation = extrapolation / factor
    keep_extrapolated = 1 - ramp
    inv_freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    return inv_freq, yarn_attention_factor(scaling)


def yarn_blend(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """YaRN over any inverse frequencies (..., dim/2): a frequency that turns more than beta_fast
    times over the original context keeps its value, one that turns fewer than beta_slow times is
    divided by the factor, and in between the blend moves linearly in log(rotations). For the
    default frequencies this is `yarn_inv_freq` without its integer truncation. Differentiable
    (learned wavelengths keep their gradients)."""
    factor = float(scaling["factor"])
    beta_fast, beta_slow = _yarn_betas(scaling)
    rotations = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
    ramp = ((math.log(beta_fast) - rotations.log()) / (math.log(beta_fast) - math.log(beta_slow))).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; `per_head` says whether they differ across heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, base, H = config.qk_rope_head_dim, config.rope_theta, config.num_attention_heads
        self.per_head = config.rope_per_head_base
        self.attention_scaling = 1.0
        # YaRN on the extras' frequencies happens in forward (learned ones change while training)
        self.yarn = None
        if config.rope_type == "yarn" and (self.per_head or config.rope_learned_wavelengths):
            self.yarn = dict(config.rope_scaling)
            self.attention_scaling = yarn_attention_factor(self.yarn)
        if self.per_head:
            # Bases spread geometrically from base/s to base*s: some heads fine, some coarse.
            s = config.rope_per_head_base_spread
            bases = base * s ** torch.linspace(-1.0, 1.0, H)
            inv_freq = torch.stack([default_inv_freq(dim, float(b)) for b in bases])  # (H, dim/2)
        elif config.rope_type == "yarn" and self.yarn is None:
            inv_freq, self.attention_scaling = yarn_inv_freq(dim, base, config.rope_scaling)
        else:
            inv_freq = default_inv_freq(dim, base)  # (dim/2,)
        if config.rope_learned_wavelengths:
            self.log_inv_freq = nn.Parameter(inv_freq.log())
        else:
            self.register_buffer("_inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the frequency table too, and a relative error of 2^-9
        # moves the angle at position p by up to p/512 radians. Keep it float32; only move devices.
        inv = getattr(self, "_inv_freq", None)
        out = super()._apply(fn, recurse)
        if inv is not None and self._inv_freq.dtype != torch.float32:
            moved = self._inv_freq
            self._inv_freq = moved.float() if inv.is_meta or moved.is_meta else inv.to(moved.device)
        return out

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.log_inv_freq.exp() if hasattr(self, "log_inv_freq") else self._inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin of shape (B, 1 or H, T, dim/2), YaRN-scaled."""
        inv_freq = self.inv_freq if self.yarn is None else yarn_blend(self.inv_freq, self.yarn)
        if inv_freq.dim() == 1:
            inv_freq = inv_freq[None]  # (1, dim/2)
        angles = positions[:, None, :, None].float() * inv_freq[None, :, None, :]  # (B, h, T, dim/2)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, h, T, dim) by cos/sin (B, 1|h, T, dim/2)."""
    if cpu_kernels.rope_usable(x, cos):  # bf16 CPU inference: one call instead of 14 ops, same bits
        return cpu_kernels.rope(x, cos, sin)
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, h, T, dim/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
