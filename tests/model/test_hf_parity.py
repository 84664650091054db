"""Logit and generation parity with transformers.DeepseekV2ForCausalLM on random tiny configs."""

import pytest
import torch

from moray.model import load_pretrained, save_pretrained
from tests.model.hf_reference import hf_model, transformers

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip

CASES = {
    "lite-like": {},
    "q_lora": dict(q_lora_rank=24),
    "group_limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, n_routed_experts=8),
    "scaling_factor": dict(routed_scaling_factor=2.5, q_lora_rank=16),
    "yarn": dict(rope_parameters=YARN, max_position_embeddings=256),
    "no_dense_layer": dict(first_k_dense_replace=0),
    "two_dense_layers": dict(first_k_dense_replace=2, num_hidden_layers=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(tmp_path, case):
    ref = hf_model(seed=len(case), **CASES[case])
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    ids = torch.randint(3, 256, (2, 48))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
    assert got.shape == want.shape == (2, 48, 256)
    assert (got - want).abs().max().item() <= 1e-4


def test_padded_batch_matches_hf(tmp_path):
    ref = hf_model(seed=3, q_lora_rank=16)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    ids = torch.randint(3, 256, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 14:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    ref = hf_model(seed=5, q_lora_rank=16, topk_method="group_limited_greedy", n_group=2, topk_group=1)
    ref.save_pretrained(tmp_path / "a")
    ours = load_pretrained(tmp_path / "a")
    save_pretrained(ours, tmp_path / "b")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
    names = set(__import__("safetensors").safe_open(str(tmp_path / "b/model.safetensors"), "pt").keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names


def test_original_release_config_loads(tmp_path):
    """The original release spells RoPE as rope_theta + rope_scaling {"type": "yarn", ...}."""
    import json

    ref = hf_model(seed=7, rope_parameters=YARN, max_position_embeddings=256)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_type == "yarn" and ours.config.rope_scaling["factor"] == 4.0
    ids = torch.randint(3, 256, (1, 40))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4
