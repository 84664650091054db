"""Build random tiny `transformers.DeepseekV2ForCausalLM` models: the numerical reference."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")


def hf_config(**overrides):
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=1, topk_method="greedy", n_group=None, topk_group=None,
        routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base.update(overrides)
    return transformers.DeepseekV2Config(**base)


def hf_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = hf_config(**overrides)
    config._attn_implementation = "eager"
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits some weights; randomize everything so parity means something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model
