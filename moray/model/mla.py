"""Multi-head Latent Attention (DeepSeek-V2, section 2.1).

Keys and values come from one low-rank latent c_kv (kv_lora_rank values per token) plus a single
RoPE key k_pe shared by all heads (qk_rope_head_dim values); queries optionally go through their
own low-rank bottleneck (q_lora_rank). Two ways to compute the same attention:

- expanded (training, long prefill): up-project c_kv to per-head k_nope and v, then ordinary SDPA;
- absorbed (decode): fold W_UK into the query and W_UV into the output, and attend directly over
  the cached latents, so nothing per-head is ever materialized for the context.

"local" and "strided" layers run the expanded form block-sparsely where the keys are the queries'
own positions 0..T-1 (moray/model/sparse_attention.py); elsewhere they mask densely.

Shapes: B batch, T new tokens, S keys, H heads, c kv_lora_rank, r qk_rope_head_dim,
dn qk_nope_head_dim, dv v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moray.model import cpu_kernels
from moray.model.config import ModelConfig
from moray.model.linear import SmallBatchLinear
from moray.model.masks import additive_mask, allowed_keys, relative_bias
from moray.model.norm import RMSNorm
from moray.model.rope import apply_rope
from moray.model.sparse_attention import grouped_attention, groups_for


@dataclass
class AttentionInputs:
    """What every layer's attention needs about positions, computed once per forward."""

    q_pos: torch.Tensor  # (B, T) absolute positions of the new tokens
    cos: torch.Tensor  # (B, 1|H, T, r/2)
    sin: torch.Tensor
    k_valid: torch.Tensor | None = None  # (B, S) real keys; None: all real
    cache: object | None = None  # LatentCache
    key_len: int = 0  # keys to read from the cache after this step's write
    absorb: bool = False  # use the absorbed (decode) formulation
    plain_causal: bool = False  # no padding, no cache, no extras: SDPA's is_causal fast path
    # layer type -> (Groups or None, additive mask), shared by the layers: the block-sparse groups and
    # their (n, 1, Lq, Sk) mask, or None and the dense (B, 1, T, S) one
    masks: dict = field(default_factory=dict)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rope):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.layer_type = config.attention_layer_type(layer_idx)
        self.rope = rope  # shared RotaryEmbedding (not registered twice: held in a plain list)
        H, c, r = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
        self.n_heads, self.c, self.r = H, c, r
        self.dn, self.dv = config.qk_nope_head_dim, config.v_head_dim
        dq = config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = SmallBatchLinear(config.hidden_size, H * dq, bias=False)
        else:
            self.q_a_proj = SmallBatchLinear(config.hidden_size, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = SmallBatchLinear(config.q_lora_rank, H * dq, bias=False)
        self.kv_a_proj_with_mqa = SmallBatchLinear(config.hidden_size, c + r, bias=False)
        self.kv_a_layernorm = RMSNorm(c)
        self.kv_b_proj = nn.Linear(c, H * (self.dn + self.dv), bias=False)
        self.o_proj = SmallBatchLinear(H * self.dv, config.hidden_size, bias=False)
        self.scale = config.softmax_scale
        if config.relative_bias_offsets:
            self.relative_bias = nn.Parameter(torch.zeros(H, len(config.relative_bias_offsets)))

    @property
    def _rope(self):
        return self.rope[0]

    def forward(self, x: torch.Tensor, inp: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        H, c = self.n_heads, self.c
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        # Heads from the width, not the config: under tensor parallelism a rank holds H/tp of them.
        q = q.view(B, T, -1, self.dn + self.r).transpose(1, 2)  # (B, H, T, dn + r)
        q_nope, q_pe = q.split([self.dn, self.r], dim=-1)
        q_pe = apply_rope(q_pe, inp.cos, inp.sin)  # (B, H, T, r)

        kv = self.kv_a_proj_with_mqa(x)  # (B, T, c + r)
        c_kv, k_pe = kv.split([c, self.r], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        if not self._rope.per_head:  # shared rotation: cache the rotated key
            k_pe = apply_rope(k_pe[:, None], inp.cos, inp.sin)[:, 0]  # (B, T, r)
        latent = torch.cat([c_kv, k_pe], dim=-1)  # (B, T, c + r)

        if inp.cache is not None:
            inp.cache.write(self.layer_idx, inp.q_pos, latent)
            latent = inp.cache.read(self.layer_idx, inp.key_len).to(x.dtype)  # (B, S, c + r)
            k_pos = torch.arange(latent.shape[1], device=x.device).expand(B, -1)
        else:
            k_pos = inp.q_pos
        c_kv, k_pe = latent.split([c, self.r], dim=-1)  # (B, S, c), (B, S, r)
        k_pe = k_pe[:, None]  # (B, 1, S, r)
        if self._rope.per_head:  # the cache holds the raw key; rotate it per head now
            cos, sin = self._rope(k_pos)
            k_pe = apply_rope(k_pe.expand(-1, H, -1, -1), cos, sin)  # (B, H, S, r)

        # SDPA's is_causal fast path only where it is exactly this layer's mask: a full layer without
        # relative biases, in the expanded form (the absorbed form takes an explicit mask).
        fast = inp.plain_causal and self.layer_type == "full" and not self.config.relative_bias_offsets
        groups, mask = None, None
        if not (fast and not inp.absorb):
            if self.layer_type not in inp.masks:  # the first layer of this type builds it for all
                # Block-sparse groups (local / strided, expanded form, keys = queries at 0..T-1) get
                # the same rule on their own positions; anything else the dense (B, 1, T, S) mask.
                if not inp.absorb:
                    groups = groups_for(self.config, self.layer_type, inp.q_pos, k_pos.shape[1], inp.k_valid)
                if groups is None:
                    q_at, k_at, valid = inp.q_pos, k_pos, inp.k_valid  # (B, T), (B, S)
                else:
                    q_at, k_at, valid = groups.q_pos, groups.k_pos, groups.k_valid  # (n, Lq), (n, Sk)
                allowed = allowed_keys(self.config, self.layer_type, q_at, k_at, valid)
                inp.masks[self.layer_type] = (groups, additive_mask(allowed, q.dtype))
            groups, mask = inp.masks[self.layer_type]
            if self.config.relative_bias_offsets:
                q_at, k_at = (inp.q_pos, k_pos) if groups is None else (groups.q_pos, groups.k_pos)
                mask = mask + relative_bias(self.config.relative_bias_offsets, self.relative_bias, q_at, k_at)

        if inp.absorb:
            # A shared rope key: [c_kv | k_pe] is `latent` itself, the keys of one bmm for all heads.
            keys = latent if k_pe.shape[1] == 1 else None
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask, keys)
        else:
            out = self._expanded(q_nope, q_pe, c_kv, k_pe, mask, groups)  # (B, H, T, dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * dv) -> (B, T, hidden)

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask, groups=None):
        B, H, T, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, -1, self.dn + self.dv).transpose(1, 2)  # (B, H, S, dn + dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, H, -1, -1)], dim=-1)  # (B, H, S, dn + r)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, dn + r)
        # SDPA's fused (flash) kernels need values as wide as queries and keys; MLA's are narrower
        # (dv < dn + r), which sends SDPA to its unfused path that materializes (B, H, T, S) scores:
        # 2.5-5x slower at 1-2k tokens on CPU. Zero columns make v as wide; the output drops them.
        pad = q.shape[-1] - self.dv
        if pad > 0:
            v = F.pad(v, (0, pad))  # (B, H, S, dn + r)
        if groups is not None:
            out = grouped_attention(q, k, v, groups, mask, self.scale)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out[..., : self.dv] if pad > 0 else out

    def _absorbed_weights(self, H: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, dn, c) and W_UV transposed (H, c, dv) from kv_b_proj in `dtype`, each contiguous (a
        strided batch is copied by every bmm). Without autograd, a parameter's are kept until it
        changes (a weight computed per call, as int8's dequantized one, has no version to key them on)."""
        weight = self.kv_b_proj.weight
        keep = not torch.is_grad_enabled() and type(weight) is nn.Parameter  # not DTensors either
        key = (weight.data_ptr(), weight._version, weight.dtype, dtype) if keep else None
        if not keep or getattr(self, "_absorbed_cache", (None,))[0] != key:
            w = weight.view(H, self.dn + self.dv, self.c).to(dtype)
            pair = (w[:, : self.dn].contiguous(), w[:, self.dn :].transpose(1, 2).contiguous())
            if not keep:
                return pair
            self._absorbed_cache = (key, *pair)
        return self._absorbed_cache[1], self._absorbed_cache[2]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, keys=None):
        # The products are laid out for the CPU's small-batch matmuls: heads first for the weight
        # products (one (B*T, d) x (d, c) per head), the cache as the left operand of the scores.
        # einsum's layouts and bmm against the transposed cache copy their operands first, which
        # cost 3-4x the products themselves in bf16 at decode sizes.
        B, H, T, _ = q_nope.shape
        if keys is not None and cpu_kernels.attention_usable(q_pe, keys, mask, self.c):
            # moray's kernel: the whole block in one call, each cached latent read once for all heads
            # and the weight products in fp32 (PyTorch's bf16 bmm at these shapes is 4x slower)
            w_uk, w_uv_t = self._absorbed_weights(H, torch.float32)
            out = cpu_kernels.absorbed_attention(q_nope, q_pe, keys, mask, w_uk, w_uv_t, self.scale)
            return out.transpose(1, 2)  # (B, H, T, dv) over the (B, T, H, dv) that o_proj reads
        w_uk, w_uv_t = self._absorbed_weights(H, q_nope.dtype)  # (H, dn, c), (H, c, dv)
        q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(H, B * T, self.dn), w_uk)  # (H, B*T, c)
        q_lat = q_lat.view(H, B, T, self.c).transpose(0, 1)  # (B, H, T, c)
        if k_pe.shape[1] == 1:  # shared rope key: one product over [latent | rope] for all heads
            q_cat = torch.cat([q_lat, q_pe], dim=-1).reshape(B, H * T, -1)  # (B, H*T, c + r)
            if keys is None:
                keys = torch.cat([c_kv, k_pe[:, 0]], dim=-1)  # (B, S, c + r)
            scores = torch.matmul(keys, q_cat.transpose(1, 2)).transpose(1, 2)  # (B, H*T, S)
            o_lat = self._softmax_values(scores.reshape(B, H, T, -1), mask, c_kv)
        else:
            scores = q_lat @ c_kv[:, None].transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)
            o_lat = self._softmax_values(scores, mask, c_kv)
        o_lat = o_lat.to(q_nope.dtype).view(B, H, T, self.c)
        out = torch.bmm(o_lat.transpose(0, 1).reshape(H, B * T, self.c), w_uv_t)  # (H, B*T, dv)
        return out.view(H, B, T, self.dv).transpose(0, 1)  # (B, H, T, dv)

    def _softmax_values(self, scores, mask, c_kv):
        """scores (B, H, T, S) -> the attention-weighted latents (B, H*T, c)."""
        B, H, T, _ = scores.shape
        scores = scores * self.scale
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(c_kv.dtype)
        return torch.bmm(probs.view(B, H * T, -1), c_kv)
