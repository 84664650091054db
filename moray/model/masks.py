"""Attention masks: causal + padding, moray's hierarchical sparse patterns, relative biases.

Everything works on absolute positions, so the same code serves training, prefill and decode
against a cache: `q_pos` (B, T) and `k_pos` (B, S), and `k_valid` (B, S) for padding.
"""

from __future__ import annotations

import torch

from moray.model.config import ModelConfig


def allowed_keys(
    config: ModelConfig,
    layer_type: str,
    q_pos: torch.Tensor,  # (B, T)
    k_pos: torch.Tensor,  # (B, S)
    k_valid: torch.Tensor | None,  # (B, S) bool, or None when every key is real
) -> torch.Tensor:
    """Bool (B, 1, T, S): may query t attend to key s?"""
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S), >= 0 for the past
    allowed = dist >= 0
    if layer_type == "local":
        allowed = allowed & ((dist < config.sliding_window) | (k_pos[:, None, :] < config.num_global_tokens))
    elif layer_type == "strided":
        on_stride = (dist % config.attention_stride) == 0
        allowed = allowed & (on_stride | (k_pos[:, None, :] < config.num_global_tokens))
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    # A query with nothing to attend to (a left-pad position) would give NaN; let it see all keys.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]  # (B, 1, T, S)


def relative_bias(
    offsets: list[int],
    bias: torch.Tensor,  # (H, n_offsets) learned logits
    q_pos: torch.Tensor,  # (B, T)
    k_pos: torch.Tensor,  # (B, S)
) -> torch.Tensor:
    """Float (B, H, T, S): bias[h, i] where q_pos - k_pos == offsets[i], else 0."""
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S)
    offs = torch.tensor(offsets, device=dist.device)
    hit = (dist[..., None] == offs).to(bias.dtype)  # (B, T, S, n)
    return torch.einsum("btsn,hn->bhts", hit, bias)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
