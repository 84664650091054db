"""The DeepSeek-V2 decoder: embeddings, N x (RMSNorm -> MLA -> RMSNorm -> MLP or MoE), head.

Parameter names follow Hugging Face's DeepseekV2ForCausalLM without the `model.` prefix, so
weight conversion is a rename (see hf.py). Single-device code: parallelism is applied from
outside (moray.model.parallel plans), never inside these modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.aux_heads import AuxHeads
from moray.model.cache import LatentCache
from moray.model.config import ModelConfig
from moray.model.linear import SmallBatchLinear
from moray.model.mla import AttentionInputs, MultiHeadLatentAttention
from moray.model.moe import MoE, RouterStats
from moray.model.norm import RMSNorm, SwiGLU
from moray.model.rope import RotaryEmbedding

# Up to this many new tokens per row, attention with a cache runs in absorbed (decode) form.
ABSORB_MAX_TOKENS = 4


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    aux_loss: torch.Tensor  # weighted sum of the balance losses over MoE layers (0 in eval)
    balance_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, summed
    router_stats: dict[int, RouterStats] = field(default_factory=dict)  # layer index -> stats
    hidden: torch.Tensor | None = None  # (B, T, H) the final normed hidden states, for the aux heads


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rope: list):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.swiglu_learned_beta)

    def forward(
        self, x: torch.Tensor, inp: AttentionInputs, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inp)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_mask) if isinstance(self.mlp, MoE) else self.mlp(h))


class HoldsMoE:
    """What the training loop asks of a model or of a pipeline stage's part of one: its MoE layers
    by their index in the whole model (`layers` is a ModuleList, or a ModuleDict keyed by index)."""

    layers: nn.Module

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(int(i), b.mlp) for i, b in self.layers.named_children() if isinstance(b.mlp, MoE)]

    def set_capacity_factor(self, factor: float | None) -> None:
        for _, moe in self.moe_layers():
            moe.capacity_factor = factor


def causal_inputs(rotary: RotaryEmbedding, B: int, T: int, device, needs_mask: bool) -> AttentionInputs:
    """Attention inputs of a training forward: no cache, no padding, positions 0..T-1."""
    positions = torch.arange(T, device=device).expand(B, T)
    cos, sin = rotary(positions)
    return AttentionInputs(positions, cos, sin, None, None, T, False, plain_causal=not needs_mask)


def balance_weights(config: ModelConfig) -> dict[str, float]:
    """Each balance loss's weight in the model's aux loss."""
    return {
        "expert_balance": config.aux_loss_alpha,
        "device_balance": config.device_balance_alpha,
        "comm_balance": config.comm_balance_alpha,
        "router_z_loss": config.router_z_loss_coef,
    }


def router_outputs(config: ModelConfig, moe_layers, device) -> tuple[torch.Tensor, dict, dict]:
    """The MoE layers' last forward: the weighted balance loss (aux), the unweighted balance losses
    summed over these layers, and each layer's routing statistics."""
    weights = balance_weights(config)
    totals: dict[str, torch.Tensor] = {}
    stats: dict[int, RouterStats] = {}
    for i, moe in moe_layers:
        stats[i] = moe.last_stats
        for name, value in (moe.last_losses or {}).items():
            totals[name] = totals.get(name, 0) + value
    aux = sum((weights[n] * v for n, v in totals.items()), torch.zeros((), device=device))
    return aux, totals, stats


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32 (also under bf16 autocast). Logits sharded on the vocabulary
    (a DTensor, under tensor parallelism) need DTensor's `loss_parallel` context, for the backward
    pass too; the loss comes back as a plain tensor."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def attention_inputs(
    rotary: RotaryEmbedding,
    needs_mask: bool,  # a sparse layer pattern or relative bias: the mask carries it, never skip it
    shape: tuple[int, int],  # (B, T) new tokens
    device,
    attention_mask: torch.Tensor | None = None,  # (B, T) 1 real / 0 pad
    position_ids: torch.Tensor | None = None,  # (B, T)
    cache=None,  # a LatentCache or PagedCacheView
    absorb: bool | None = None,
) -> tuple[AttentionInputs, torch.Tensor | None, torch.Tensor | None]:
    """What every layer's attention needs for one forward: positions, RoPE, key validity, the
    cache; also the real-token mask (padding stays out of MoE) and the cache lengths after it.
    The whole model and a serving pipeline stage (moray/actors/pipeline_stage.py) build it alike."""
    B, T = shape
    steps = torch.arange(T, device=device)
    new_lengths = None
    if cache is not None:
        # Rows are right-padded: a row's new tokens start at its cached length.
        positions = cache.lengths[:, None] + steps if position_ids is None else position_ids
        n_new = attention_mask.sum(dim=1) if attention_mask is not None else torch.full_like(cache.lengths, T)
        if attention_mask is not None and not torch.equal(attention_mask.bool(), steps < n_new[:, None]):
            raise ValueError("with a cache, rows must be right-padded (attention_mask 1...1 0...0)")
        new_lengths = cache.lengths + n_new
        key_len = int(new_lengths.max())
        k_valid = torch.arange(key_len, device=device)[None] < new_lengths[:, None]
    else:
        key_len = T
        k_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            k_valid = attention_mask.bool()
        if position_ids is not None:
            positions = position_ids
        elif k_valid is not None:  # a row's first real token is position 0, however much left padding
            positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        else:
            positions = steps.expand(B, T)
    if absorb is None:
        absorb = cache is not None and T <= ABSORB_MAX_TOKENS
    # SDPA's is_causal fast path: no cache, no padding, no sparse pattern or relative bias (the
    # mask carries those), and the expanded form (the absorbed form only masks with an explicit mask).
    plain = cache is None and k_valid is None and not absorb and not needs_mask
    # The real new tokens (padding is kept out of MoE capacity, statistics and balance losses).
    token_mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        token_mask = attention_mask.bool()
    cos, sin = rotary(positions)
    inp = AttentionInputs(positions, cos, sin, k_valid, cache, key_len, absorb, plain_causal=plain)
    return inp, token_mask, new_lengths


class Transformer(HoldsMoE, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        rope = [self.rotary]  # shared by every layer, registered once
        self.layers = nn.ModuleList(Block(config, i, rope) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = SmallBatchLinear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.aux_heads = AuxHeads(config) if config.aux_heads else None  # training-only heads
        # Sparse layer patterns and relative biases live in the attention mask: never skip it.
        self._needs_mask = bool(config.relative_bias_offsets) or any(
            config.attention_layer_type(i) != "full" for i in range(config.num_hidden_layers)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.startswith("aux_heads."):
                continue  # their own init, below
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("beta", "activation_scale")):
                p.fill_(1.0)
            elif name.endswith("relative_bias") or "log_inv_freq" in name:
                continue  # zeros / the RoPE frequencies they start from
            else:
                p.normal_(0.0, std)
        if self.aux_heads is not None:
            self.aux_heads.reset_parameters(std)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 real / 0 pad
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: LatentCache | None = None,
        absorb: bool | None = None,  # force the absorbed / expanded attention form
        num_logits_to_keep: int = 0,  # 0: logits for every position; n: the last n only
    ) -> ModelOutput:
        inp, token_mask, new_lengths = attention_inputs(
            self.rotary, self._needs_mask, input_ids.shape, input_ids.device, attention_mask, position_ids,
            cache, absorb,
        )  # fmt: skip

        x = self.embed_tokens(input_ids)  # (B, T, H)
        for block in self.layers:
            x = block(x, inp, token_mask)
        x = hidden = self.norm(x)
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        logits = self.lm_head(x)  # (B, T', vocab)
        if cache is not None:
            cache.lengths = new_lengths
        return self._output(logits, hidden if self.aux_heads is not None else None)

    def _output(self, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> ModelOutput:
        aux, totals, stats = router_outputs(self.config, self.moe_layers(), logits.device)
        return ModelOutput(
            logits=logits, aux_loss=aux, balance_losses=totals, router_stats=stats, hidden=hidden
        )
