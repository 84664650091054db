"""ModelConfig: validation names the bad field, HF config.json in both spellings, round trips, presets."""

import json

import pytest
import torch

from moray.model import ModelConfig, Transformer, preset
from moray.model.config import yarn_mscale
from moray.model.presets import PRESETS
from moray.platform.config import ConfigError, from_dict

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

# (overrides on the tiny preset, the field the error message must name)
BAD = {
    "heads_zero": (dict(num_attention_heads=0), "num_attention_heads"),
    "heads_negative": (dict(num_attention_heads=-4), "num_attention_heads"),
    "hidden_zero": (dict(hidden_size=0), "hidden_size"),
    "vocab_float": (dict(vocab_size=512.0), "vocab_size"),
    "layers_zero": (dict(num_hidden_layers=0), "num_hidden_layers"),
    "kv_lora_zero": (dict(kv_lora_rank=0), "kv_lora_rank"),
    "v_head_zero": (dict(v_head_dim=0), "v_head_dim"),
    "rope_dim_zero": (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
    "rope_dim_odd": (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    "nope_dim_negative": (dict(qk_nope_head_dim=-1), "qk_nope_head_dim"),
    "q_lora_zero": (dict(q_lora_rank=0), "q_lora_rank"),
    "moe_width_zero": (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    "experts_negative": (dict(n_routed_experts=-1), "n_routed_experts"),
    "k_above_experts": (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    "k_zero": (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    "unknown_topk_method": (dict(topk_method="top2"), "topk_method"),
    "unknown_scoring": (dict(scoring_func="relu"), "scoring_func"),
    "group_limited_without_groups": (dict(topk_method="group_limited_greedy"), "n_group"),
    "n_group_not_dividing": (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
    "topk_group_above_n_group": (
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=5),
        "topk_group",
    ),
    "topk_group_zero": (dict(topk_method="group_limited_greedy", n_group=4, topk_group=0), "topk_group"),
    "too_few_experts_in_kept_groups": (
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, num_experts_per_tok=3),
        "topk_group",
    ),
    "noaux_tc_with_softmax": (dict(topk_method="noaux_tc", n_group=4, topk_group=2), "scoring_func"),
    "noaux_tc_one_expert_per_group": (
        dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=2),
        "n_group",
    ),
    "ep_size_not_dividing": (dict(ep_size=3), "ep_size"),
    "max_devices_above_ep_size": (dict(ep_size=2, max_devices_per_token=3), "max_devices_per_token"),
    "capacity_factor_zero": (dict(capacity_factor=0.0), "capacity_factor"),
    "negative_aux_alpha": (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
    "negative_z_loss": (dict(router_z_loss_coef=-1.0), "router_z_loss_coef"),
    "routed_scaling_zero": (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    "rms_eps_zero": (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    "rope_theta_negative": (dict(rope_theta=-1.0), "rope_theta"),
    "unknown_rope_type": (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    "unknown_rope_type_hf5_key": (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    "yarn_without_factor": (
        dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 64}),
        "rope_scaling",
    ),
    "yarn_factor_below_one": (dict(rope_scaling={**YARN, "factor": 0.5}), "rope_scaling"),
    "yarn_without_original_max": (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    "layer_types_too_short": (dict(attention_layer_types=["full", "local"]), "attention_layer_types"),
    "layer_types_too_long": (dict(attention_layer_types=["full"] * 4), "attention_layer_types"),
    "layer_type_unknown": (dict(attention_layer_types=["full", "local", "dilated"]), "attention_layer_types"),
    "sliding_window_zero": (dict(sliding_window=0), "sliding_window"),
    "stride_zero": (dict(attention_stride=0), "attention_stride"),
    "global_tokens_negative": (dict(num_global_tokens=-1), "num_global_tokens"),
    "per_head_spread_below_one": (dict(rope_per_head_base_spread=0.5), "rope_per_head_base_spread"),
    "relative_offset_zero": (dict(relative_bias_offsets=[1, 0]), "relative_bias_offsets"),
    # q_pos - k_pos < 0 is a future key: causal attention never sees it, the bias would be dead.
    "relative_offset_negative": (dict(relative_bias_offsets=[1, -1]), "relative_bias_offsets"),
    "relative_offset_float": (dict(relative_bias_offsets=[1.5]), "relative_bias_offsets"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_value_is_refused_naming_the_field(case):
    overrides, field = BAD[case]
    with pytest.raises(ValueError) as err:
        preset("tiny", **overrides)
    assert str(err.value).startswith(f"{field}="), str(err.value)


def test_model_errors_are_value_errors_and_replace_validates():
    cfg = preset("tiny")
    assert issubclass(ConfigError, ValueError)  # the platform's config error is one too
    with pytest.raises(ValueError, match="^num_attention_heads="):
        cfg.replace(num_attention_heads=0)
    assert cfg.replace(num_attention_heads=8).num_attention_heads == 8
    assert cfg.num_attention_heads == 4  # replace returns a new config


def test_valid_extras_are_accepted():
    cfg = preset(
        "tiny",
        attention_layer_types=["full", "local", "strided"],
        relative_bias_offsets=[1, 2, 128],
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        n_group=4,
        topk_group=2,
        rope_scaling=YARN,
        capacity_factor=1.25,
        ep_size=2,
        max_devices_per_token=1,
    )
    assert [cfg.attention_layer_type(i) for i in range(3)] == ["full", "local", "strided"]
    assert preset("tiny").attention_layer_type(2) == "full"


def test_from_dict_refuses_unknown_fields_and_round_trips():
    d = preset("tiny", capacity_factor=1.5, relative_bias_offsets=[1, 3]).to_dict()
    assert from_dict(ModelConfig, d) == preset("tiny", capacity_factor=1.5, relative_bias_offsets=[1, 3])
    with pytest.raises(ValueError) as err:
        from_dict(ModelConfig, {**d, "num_heads": 4, "capacity": 2})
    assert "capacity" in str(err.value) and "num_heads" in str(err.value)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")


def test_derived_sizes_and_layer_kinds():
    cfg = preset("tiny", num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    assert cfg.qk_head_dim == 16 + 8
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    assert not any(preset("tiny", n_routed_experts=0).is_moe_layer(i) for i in range(3))


def test_softmax_scale_with_yarn_is_mscale_squared():
    assert preset("tiny").softmax_scale == pytest.approx(24**-0.5)
    cfg = preset("tiny", rope_scaling=YARN)
    m = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert yarn_mscale(4.0, 0.707) == pytest.approx(m)
    assert cfg.softmax_scale == pytest.approx(24**-0.5 * m * m, rel=1e-6)
    # No mscale_all_dim: plain 1/sqrt(d) (mscale only scales cos/sin then).
    no_all_dim = {k: v for k, v in YARN.items() if k != "mscale_all_dim"}
    assert preset("tiny", rope_scaling=no_all_dim).softmax_scale == pytest.approx(24**-0.5)
    assert yarn_mscale(1.0, 0.707) == 1.0  # no scaling at factor 1


# ---- Hugging Face config.json ---------------------------------------------------------------------------


def _hf_common():
    return dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=16,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        max_position_embeddings=256,
        hidden_act="silu",
        architectures=["DeepseekV2ForCausalLM"],
        torch_dtype="bfloat16",
        model_type="deepseek_v2",
        bos_token_id=1,
        eos_token_id=[2, 5],
    )


def test_from_hf_dict_original_release_spelling():
    d = {**_hf_common(), "rope_theta": 50000.0, "rope_scaling": dict(YARN)}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_type == "yarn" and cfg.rope_scaling == YARN
    assert cfg.q_lora_rank == 16 and cfg.n_group == 4 and cfg.topk_group == 2
    assert cfg.routed_scaling_factor == 2.5 and cfg.eos_token_id == 2  # a list of eos ids: the first


def test_from_hf_dict_transformers5_spelling():
    rope = {"rope_type": "yarn", "rope_theta": 50000.0, **{k: v for k, v in YARN.items() if k != "type"}}
    cfg = ModelConfig.from_hf_dict({**_hf_common(), "rope_parameters": rope})
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_type == "yarn" and cfg.rope_scaling == YARN
    plain = ModelConfig.from_hf_dict(
        {**_hf_common(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    )
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None and plain.rope_type == "default"
    # Both spellings of one config give the same ModelConfig.
    orig = ModelConfig.from_hf_dict({**_hf_common(), "rope_theta": 50000.0, "rope_scaling": dict(YARN)})
    assert cfg == orig


def test_from_hf_dict_reads_a_transformers_config():
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in YARN.items() if k != "type"}}
    kw = {k: v for k, v in _hf_common().items() if k not in ("architectures", "torch_dtype", "model_type")}
    hf = transformers.DeepseekV2Config(**{**kw, "eos_token_id": 2, "rope_parameters": rope})
    cfg = ModelConfig.from_hf_dict(json.loads(hf.to_json_string()))
    for name in (
        "hidden_size",
        "q_lora_rank",
        "kv_lora_rank",
        "n_group",
        "topk_group",
        "num_experts_per_tok",
        "routed_scaling_factor",
        "max_position_embeddings",
        "qk_rope_head_dim",
        "v_head_dim",
    ):
        assert getattr(cfg, name) == getattr(hf, name), name
    assert cfg.rope_scaling == YARN


def test_from_hf_dict_refuses_other_activations():
    with pytest.raises(ValueError, match="^hidden_act="):
        ModelConfig.from_hf_dict({**_hf_common(), "hidden_act": "gelu"})


def test_greedy_with_a_single_group_drops_the_group_fields():
    d = {**_hf_common(), "topk_method": "greedy", "n_group": 1, "topk_group": 1}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.n_group is None and cfg.topk_group is None


ROUND_TRIP = {
    "tiny": {},
    "yarn_qlora": dict(rope_scaling=YARN, q_lora_rank=16, rope_theta=50000.0),
    "grouped": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=3.0),
    "noaux": dict(
        topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1, norm_topk_prob=True
    ),
    "extras": dict(
        capacity_factor=1.25,
        aux_loss_alpha=0.01,
        device_balance_alpha=0.1,
        comm_balance_alpha=0.2,
        router_z_loss_coef=1e-3,
        ep_size=4,
        max_devices_per_token=2,
        bias_update_speed=0.01,
        attention_layer_types=["full", "local", "strided"],
        sliding_window=7,
        attention_stride=3,
        num_global_tokens=2,
        swiglu_learned_beta=True,
        expert_activation_scale=True,
        rope_per_head_base=True,
        rope_per_head_base_spread=2.0,
        rope_learned_wavelengths=True,
        relative_bias_offsets=[1, 2, 128],
        tie_word_embeddings=True,
        pad_token_id=None,
    ),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP))
def test_to_hf_dict_from_hf_dict_is_identity(case):
    cfg = preset("tiny", **ROUND_TRIP[case])
    d = json.loads(json.dumps(cfg.to_hf_dict()))  # through JSON, as on disk
    assert ModelConfig.from_hf_dict(d) == cfg
    assert d["model_type"] == "deepseek_v2" and d["hidden_act"] == "silu"
    # moray's own fields travel under "moray"; the HF fields stay at the top level for transformers.
    assert d["moray"]["capacity_factor"] == cfg.capacity_factor
    assert d["moray"]["relative_bias_offsets"] == cfg.relative_bias_offsets
    assert "hidden_size" not in d["moray"] and "rope_scaling" not in d["moray"]
    assert d["rope_parameters"]["rope_theta"] == cfg.rope_theta == d["rope_theta"]
    assert d["rope_parameters"]["rope_type"] == cfg.rope_type


def test_to_hf_dict_is_read_by_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = preset(
        "tiny", rope_scaling=YARN, q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2
    )
    d = cfg.to_hf_dict()
    hf = transformers.DeepseekV2Config(**{k: v for k, v in d.items() if k != "moray"})
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.qk_head_dim == cfg.qk_head_dim and hf.topk_group == 2 and hf.q_lora_rank == 16


# ---- presets --------------------------------------------------------------------------------------------


def _n_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


def test_tiny_preset_is_under_2m_parameters():
    n = _n_params(preset("tiny"))
    assert 100_000 < n < 2_000_000, n


def test_small_preset_is_50_to_150m_parameters():
    n = _n_params(preset("small"))
    assert 50_000_000 <= n <= 150_000_000, n


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = preset(name)
    assert cfg.num_experts_per_tok <= cfg.n_routed_experts
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_published_presets_match_the_release():
    lite, v2 = preset("deepseek-v2-lite"), preset("deepseek-v2")
    assert lite.q_lora_rank is None and lite.rope_type == "yarn" and lite.rope_scaling["factor"] == 40
    assert v2.q_lora_rank == 1536 and v2.n_routed_experts == 160 and (v2.n_group, v2.topk_group) == (8, 3)
    assert _n_params(lite) == pytest.approx(15.7e9, rel=0.02)  # DeepSeek-V2-Lite: 15.7B total


def test_from_hf_dict_refuses_unknown_moray_fields():
    d = preset("tiny", attention_layer_types=["full", "local", "full"]).to_hf_dict()
    d["moray"]["sliding_windw"] = 16
    with pytest.raises(ValueError, match="sliding_windw"):
        ModelConfig.from_hf_dict(d)
    # Unknown top-level HF keys are fine: they belong to transformers.
    d["moray"].pop("sliding_windw")
    assert ModelConfig.from_hf_dict({**d, "use_cache": True, "attention_dropout": 0.0}).sliding_window == 256
