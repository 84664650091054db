"""Named model sizes: `tiny` for tests, `small` for CPU benchmarks, and the published shapes."""

from __future__ import annotations

from moray.model.config import ModelConfig

# DeepSeek-V2-Lite and DeepSeek-V2 exactly as their published config.json files spell them.
_DEEPSEEK_V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy",
    n_group=None, topk_group=None, routed_scaling_factor=1.0, norm_topk_prob=False,
    scoring_func="softmax", rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=163840,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
)  # fmt: skip

_DEEPSEEK_V2 = dict(
    _DEEPSEEK_V2_LITE,
    hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
    num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160, num_experts_per_tok=6,
    topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
    ep_size=8, max_devices_per_token=3,
)  # fmt: skip

PRESETS: dict[str, dict] = {
    # Under 2M parameters: one dense layer then MoE layers; fast enough for every unit test.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # About 110M total / 30M activated: the CPU benchmark model (hidden 512, 64 experts, top-6).
    "small": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, q_lora_rank=None, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    "deepseek-v2": _DEEPSEEK_V2,
}  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset as a ModelConfig, with field overrides applied (and validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
