import pytest
import torch

from moray.model import Transformer, preset
from moray.model.accounting import account


@pytest.mark.parametrize(
    "name,total,activated",
    [("deepseek-v2", 236e9, 21e9), ("deepseek-v2-lite", 15.7e9, 2.4e9)],
)
def test_published_models_match_the_papers_figures(name, total, activated):
    a = account(preset(name))
    assert abs(a.total_params - total) / total < 0.005
    assert abs(a.activated_params - activated) / activated < 0.025


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(q_lora_rank=16, tie_word_embeddings=True),
        dict(
            swiglu_learned_beta=True,
            expert_activation_scale=True,
            rope_learned_wavelengths=True,
            rope_per_head_base=True,
            relative_bias_offsets=[1, 2],
        ),  # fmt: skip
    ],
)
def test_counts_equal_the_instantiated_model(overrides):
    cfg = preset("tiny", **overrides)
    model = Transformer(cfg)
    a = account(cfg)
    assert a.total_params == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    assert a.activated_params == a.total_params - embedding - routed + routed * k // E


def test_kv_cache_figures():
    cfg = preset("deepseek-v2")
    a = account(cfg, cache_dtype="bfloat16")
    assert a.kv_cache_values_per_token_mla == 60 * (512 + 64)  # the paper's (d_c + d_h^R) * l
    assert a.kv_cache_bytes_per_token_mla == 60 * 576 * 2
    assert a.kv_cache_values_per_token_mha == 60 * 128 * (192 + 128)
    assert a.kv_cache_reduction > 50


def test_presets_sizes():
    assert account(preset("tiny")).total_params < 2_000_000
    assert 50e6 <= account(preset("small")).total_params <= 150e6


def test_train_flops_grow_with_context():
    cfg = preset("small")
    short, long = account(cfg, seq_len=512), account(cfg, seq_len=4096)
    assert (
        long.train_flops_per_token
        > short.train_flops_per_token
        >= 6 * (short.activated_params - short.other_params)
    )


@pytest.mark.parametrize("kind", ["local", "strided"])
@pytest.mark.parametrize("global_tokens", [0, 3])
def test_sparse_layers_count_the_keys_their_rule_allows(kind, global_tokens):
    """Attention FLOPs of a local or strided layer follow its keys, not the causal T / 2."""
    from moray.model.accounting import mean_keys
    from moray.model.masks import allowed_keys

    c = preset("tiny", attention_layer_types=[kind] * 3, sliding_window=8, attention_stride=4,
               num_global_tokens=global_tokens)  # fmt: skip
    positions = torch.arange(37)[None]
    want = allowed_keys(c, kind, positions, positions, None).float().sum(-1).mean().item()
    assert mean_keys(c, 0, 37) == pytest.approx(want)
    assert mean_keys(preset("tiny"), 0, 37) == 37 / 2
    full = account(preset("tiny"), seq_len=4096).train_flops_per_token
    assert account(c, seq_len=4096).train_flops_per_token < full
