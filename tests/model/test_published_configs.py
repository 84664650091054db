"""The published config.json files map onto ModelConfig unchanged."""

import json

import pytest
import torch

from moray.model import ModelConfig, Transformer, load_pretrained, preset, save_pretrained
from moray.model.accounting import account

# DeepSeek-V2-Lite's config.json as released (auto_map dropped: it only names remote code).
V2_LITE_CONFIG_JSON = """{
  "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
  "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
  "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
  "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16,
  "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1,
  "q_lora_rank": null, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": true,
  "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128, "vocab_size": 102400
}"""


def test_v2_lite_config_json_equals_the_preset():
    cfg = ModelConfig.from_hf_dict(json.loads(V2_LITE_CONFIG_JSON))
    want = preset("deepseek-v2-lite")
    for name in ("hidden_size", "num_hidden_layers", "n_routed_experts", "kv_lora_rank", "q_lora_rank",
                 "rope_theta", "max_position_embeddings", "topk_method", "n_group"):  # fmt: skip
        assert getattr(cfg, name) == getattr(want, name), name
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_type == "yarn"
    assert account(cfg).total_params == account(want).total_params


def test_bf16_checkpoint_loads_as_fp32_or_kept(tmp_path):
    model = Transformer(preset("tiny")).to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert load_pretrained(tmp_path).lm_head.weight.dtype == torch.float32
    kept = load_pretrained(tmp_path, dtype=None)
    assert kept.lm_head.weight.dtype == torch.bfloat16
    assert kept.rotary.inv_freq.device.type == "cpu"  # buffers materialized, not left on meta


def test_mismatched_weights_are_refused_with_the_name(tmp_path):
    save_pretrained(Transformer(preset("tiny")), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight '[^']*kv_a[^']*' has shape"):
        load_pretrained(tmp_path)


def test_missing_weights_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a model directory: no config\.json"):
        load_pretrained(tmp_path)
    save_pretrained(Transformer(preset("tiny")), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no \*\.safetensors weights"):
        load_pretrained(tmp_path)
