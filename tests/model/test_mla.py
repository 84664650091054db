"""Multi-head Latent Attention: absorbed == expanded, the latent cache, YaRN against transformers."""

import math

import pytest
import torch

from moray.model import LatentCache, ModelConfig, Transformer, preset
from moray.model.rope import RotaryEmbedding, apply_rope, default_inv_freq, yarn_inv_freq

TOL = 1e-4
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
# Parameters that start at the identity (extras): left alone so "off" and "on at init" agree.
IDENTITY_INIT = ("beta", "activation_scale", "relative_bias", "log_inv_freq")


def tiny(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    return preset("tiny", **{**base, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with weights large enough that attention is far from uniform (init std 0.02 is not)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(IDENTITY_INIT):
                continue
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def ids_for(cfg: ModelConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, (B, T), generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def decode_matches_full(model: Transformer, ids: torch.Tensor, prefill: int, chunk: int = 1) -> float:
    """Prefill `prefill` tokens through a LatentCache, then feed the rest `chunk` at a time; return the
    largest logit difference from one full forward over all of ids."""
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids).logits
        cache = LatentCache(model.config, B, T + 2)
        got = [model(ids[:, :prefill], cache=cache).logits]
        for s in range(prefill, T, chunk):
            got.append(model(ids[:, s : s + chunk], cache=cache).logits)
    assert cache.lengths.tolist() == [T] * B
    return max_diff(torch.cat(got, dim=1), full)


CASES = {
    "plain": {},
    "q_lora": dict(q_lora_rank=12),
    "yarn": dict(rope_scaling=YARN),
    "yarn_q_lora": dict(rope_scaling=YARN, q_lora_rank=12, rope_theta=500.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_absorbed_equals_expanded(case):
    model = build(tiny(**CASES[case]))
    ids = ids_for(model.config, 2, 40)
    with torch.no_grad():
        expanded = model(ids, absorb=False).logits
        absorbed = model(ids, absorb=True).logits
        default = model(ids).logits
    assert max_diff(absorbed, expanded) <= TOL
    assert max_diff(default, expanded) == 0.0  # no cache: expanded by default
    # Attention is causal in both forms: the first position does not see the rest.
    with torch.no_grad():
        first = model(ids[:, :1], absorb=True).logits[:, 0]
    assert max_diff(first, expanded[:, 0]) <= TOL


@pytest.mark.parametrize("case", ["plain", "q_lora", "yarn"])
def test_absorbed_equals_expanded_on_a_padded_batch(case):
    model = build(tiny(**CASES[case]))
    ids = ids_for(model.config, 3, 20)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 13:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    with torch.no_grad():
        expanded = model(ids, attention_mask=mask, absorb=False).logits
        absorbed = model(ids, attention_mask=mask, absorb=True).logits
        unpadded_row1 = model(ids[1:2, :13]).logits
    assert max_diff(absorbed, expanded) <= TOL
    # Right padding changes nothing for the real tokens of the row.
    assert max_diff(expanded[1, :13], unpadded_row1[0]) <= TOL
    # The padded keys are really masked: changing the pad ids changes no real logit.
    ids2 = ids.clone()
    ids2[1, 13:] = 7
    ids2[2, :5] = 9
    with torch.no_grad():
        expanded2 = model(ids2, attention_mask=mask, absorb=False).logits
    real = mask.bool()
    assert max_diff(expanded2[real], expanded[real]) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decode_equals_full_forward(case):
    model = build(tiny(**CASES[case]))
    ids = ids_for(model.config, 2, 24)
    assert decode_matches_full(model, ids, prefill=10, chunk=1) <= TOL  # expanded prefill, absorbed decode
    assert decode_matches_full(model, ids, prefill=3, chunk=3) <= TOL  # absorbed multi-token steps
    assert decode_matches_full(model, ids, prefill=2, chunk=11) <= TOL  # expanded steps against a cache


def test_cached_decode_in_both_forms():
    model = build(tiny(q_lora_rank=12))
    ids = ids_for(model.config, 2, 12)
    outs = {}
    for absorb in (False, True):
        cache = LatentCache(model.config, 2, 16)
        with torch.no_grad():
            steps = [model(ids[:, :6], cache=cache, absorb=absorb).logits]
            steps += [model(ids[:, t : t + 1], cache=cache, absorb=absorb).logits for t in range(6, 12)]
        outs[absorb] = torch.cat(steps, dim=1)
    assert max_diff(outs[True], outs[False]) <= TOL


def test_right_padded_prefill_then_decode_matches_each_row_alone():
    model = build(tiny(q_lora_rank=12))
    lengths = [9, 4, 6]
    full = ids_for(model.config, 3, 16)
    ids = full[:, :9].clone()
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    cache = LatentCache(model.config, 3, 20)
    with torch.no_grad():
        pre = model(ids, attention_mask=mask, cache=cache).logits
        assert cache.lengths.tolist() == lengths
        dec = []
        for i in range(5):  # row b decodes the tokens that follow its own prompt
            nxt = torch.stack([full[b, lengths[b] + i] for b in range(3)])[:, None]
            dec.append(model(nxt, cache=cache).logits[:, 0])
        for b, n in enumerate(lengths):
            alone = model(full[b : b + 1, : n + 5]).logits[0]
            assert max_diff(pre[b, :n], alone[:n]) <= TOL
            assert max_diff(torch.stack([d[b] for d in dec]), alone[n : n + 5]) <= TOL


def test_cache_holds_latent_plus_rope_key_per_token_per_layer():
    cfg = tiny(q_lora_rank=12)
    model = build(cfg)
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = LatentCache(cfg, 2, 16)
    assert cache.width == width == 24
    assert len(cache.layers) == cfg.num_hidden_layers
    assert all(t.shape == (2, 16, width) for t in cache.layers)
    assert cache.bytes_per_token() == cfg.num_hidden_layers * width * 4
    assert cache.nbytes() == 2 * 16 * cache.bytes_per_token()
    assert LatentCache(cfg, 1, 8, dtype=torch.bfloat16).bytes_per_token() == cfg.num_hidden_layers * width * 2
    with torch.no_grad():
        model(ids_for(cfg, 2, 5), cache=cache)
    for t in cache.layers:  # written where the tokens are, nothing else
        assert t[:, :5].abs().sum(dim=-1).min() > 0
        assert t[:, 5:].abs().max() == 0


def test_cache_stores_the_normalized_latent_and_the_rotated_rope_key():
    cfg = tiny(kv_lora_rank=16)
    model = build(cfg)
    ids = ids_for(cfg, 2, 7)
    seen = {}
    hooks = []
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        hooks.append(
            attn.kv_a_layernorm.register_forward_hook(
                lambda m, a, out, i=i: seen.__setitem__(("norm", i), out.detach())
            )
        )
        hooks.append(
            attn.kv_a_proj_with_mqa.register_forward_hook(
                lambda m, a, out, i=i: seen.__setitem__(("kv_a", i), out.detach())
            )
        )
    cache = LatentCache(cfg, 2, 10)
    with torch.no_grad():
        model(ids, cache=cache)
    for h in hooks:
        h.remove()
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    positions = torch.arange(7).expand(2, 7)
    cos, sin = model.rotary(positions)
    for i, block in enumerate(model.layers):
        stored = cache.layers[i][:, :7]
        assert max_diff(stored[..., :c], seen[("norm", i)]) <= 1e-6
        raw = seen[("kv_a", i)]
        # The normalized latent, not the projection's raw output.
        w = block.self_attn.kv_a_layernorm.weight
        rms = raw[..., :c].pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        assert max_diff(stored[..., :c], raw[..., :c] * rms * w) <= 1e-5
        assert max_diff(stored[..., :c], raw[..., :c]) > 0.1
        k_pe = apply_rope(raw[..., c:][:, None], cos, sin)[:, 0]
        assert max_diff(stored[..., c:], k_pe) <= 1e-6
        assert stored.shape[-1] == c + r


def test_left_padding_is_refused_with_a_cache():
    model = build(tiny())
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with torch.no_grad(), pytest.raises(ValueError, match="right-padded"):
        model(ids_for(model.config, 2, 3), attention_mask=mask, cache=LatentCache(model.config, 2, 8))


def test_left_padding_shifts_positions_to_the_first_real_token():
    model = build(tiny())
    ids = ids_for(model.config, 2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    explicit = torch.stack([torch.arange(10), (torch.arange(10) - 4).clamp_min(0)])
    with torch.no_grad():
        implied = model(ids, attention_mask=mask).logits
        given = model(ids, attention_mask=mask, position_ids=explicit).logits
    assert max_diff(implied, given) == 0.0


def test_full_cache_is_refused():
    model = build(tiny())
    cache = LatentCache(model.config, 1, 4)
    with torch.no_grad():
        model(ids_for(model.config, 1, 4), cache=cache)
        with pytest.raises(ValueError, match="latent cache is full"):
            model(ids_for(model.config, 1, 1), cache=cache)


def test_num_logits_to_keep():
    model = build(tiny())
    ids = ids_for(model.config, 2, 9)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, num_logits_to_keep=2).logits
    assert last.shape == (2, 2, model.config.vocab_size)
    assert max_diff(last, full[:, -2:]) <= 1e-5


# ---- RoPE and YaRN ------------------------------------------------------------------------------------


def test_default_inv_freq_and_interleaved_rotation():
    inv = default_inv_freq(8, 10000.0)
    assert torch.allclose(inv, torch.tensor([1.0, 10000**-0.25, 10000**-0.5, 10000**-0.75]))
    # Pairs (x0, x1), (x2, x3), ... are rotated, each by position * its frequency.
    x = torch.tensor([1.0, 0.0, 0.0, 1.0])[None, None, None]  # (1, 1, 1, 4)
    angles = torch.tensor([0.5, 0.25])
    out = apply_rope(x, angles.cos()[None, None, None], angles.sin()[None, None, None])[0, 0, 0]
    want = torch.tensor([math.cos(0.5), math.sin(0.5), -math.sin(0.25), math.cos(0.25)])
    assert torch.allclose(out, want, atol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(tiny())
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)


def _hf_yarn(scaling: dict, dim: int, theta: float, max_pos: int):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    rope = {"rope_type": "yarn", "rope_theta": theta, **{k: v for k, v in scaling.items() if k != "type"}}
    hf = transformers.DeepseekV2Config(
        hidden_size=64,
        num_attention_heads=4,
        qk_rope_head_dim=dim,
        qk_nope_head_dim=16,
        v_head_dim=16,
        kv_lora_rank=32,
        q_lora_rank=None,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
        num_experts_per_tok=2,
        n_routed_experts=8,
    )
    return _compute_yarn_parameters(hf)


YARN_CASES = {
    "v2_lite": (
        dict(
            type="yarn",
            factor=40,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        64,
        10000.0,
        163840,
    ),
    "small_factor": (YARN, 8, 10000.0, 128),
    "mscale_only": (
        dict(type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0),
        16,
        1e4,
        256,
    ),
    "no_mscale": (dict(type="yarn", factor=16.0, original_max_position_embeddings=512), 32, 50000.0, 8192),
    "unequal_mscales": (
        dict(
            type="yarn",
            factor=8.0,
            original_max_position_embeddings=256,
            beta_fast=16,
            beta_slow=2,
            mscale=1.0,
            mscale_all_dim=0.5,
        ),
        32,
        10000.0,
        2048,
    ),
    "no_truncate": (
        dict(
            type="yarn",
            factor=8.0,
            original_max_position_embeddings=256,
            truncate=False,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        32,
        10000.0,
        2048,
    ),
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_matches_transformers(case):
    scaling, dim, theta, max_pos = YARN_CASES[case]
    want_inv, want_factor = _hf_yarn(scaling, dim, theta, max_pos)
    got_inv, got_factor = yarn_inv_freq(dim, theta, scaling)
    assert got_factor == pytest.approx(want_factor, rel=1e-9)
    assert torch.allclose(got_inv, want_inv, rtol=1e-6, atol=0)
    # The module applies the same: cos at position 0 is the attention factor.
    cfg = tiny(qk_rope_head_dim=dim, rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos)
    rope = RotaryEmbedding(cfg)
    assert torch.allclose(rope.inv_freq, want_inv, rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(want_factor, rel=1e-9)
    cos, sin = rope(torch.tensor([[0, 5]]))
    assert torch.allclose(cos[0, 0, 0], torch.full((dim // 2,), want_factor))
    assert torch.allclose(cos[0, 0, 1], (5 * want_inv).cos() * want_factor, atol=1e-6)
    assert torch.allclose(sin[0, 0, 1], (5 * want_inv).sin() * want_factor, atol=1e-6)


def test_yarn_softmax_scale_is_used_by_attention():
    cfg = tiny(rope_scaling=YARN)
    m = 0.1 * 0.707 * math.log(4.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * m * m)
    model = build(cfg)
    assert all(b.self_attn.scale == pytest.approx(cfg.qk_head_dim**-0.5 * m * m) for b in model.layers)
    # Identical weights without YaRN give different logits (the frequencies and the scale differ).
    plain = build(tiny())
    plain.load_state_dict(model.state_dict())
    ids = ids_for(cfg, 1, 12)
    with torch.no_grad():
        assert max_diff(plain(ids).logits, model(ids).logits) > 1e-3


def test_rope_frequencies_stay_float32_under_a_dtype_cast():
    cfg = tiny(qk_rope_head_dim=32, rope_scaling=YARN)
    model = Transformer(cfg)
    want_cos, want_sin = model.rotary(torch.tensor([[4000]]))
    model = model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    cos, sin = model.rotary(torch.tensor([[4000]]))
    assert max_diff(cos, want_cos) <= 1e-6 and max_diff(sin, want_sin) <= 1e-6
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():  # a bf16 model still runs, prefill and decode
        cache = LatentCache(cfg, 1, 8, dtype=torch.bfloat16)
        assert model(ids_for(cfg, 1, 5), cache=cache).logits.dtype == torch.bfloat16
        assert model(ids_for(cfg, 1, 1), cache=cache).logits.isfinite().all()


# ---- regressions: a float32 cache under a bf16 model; the absorbed form on the fast path ------------------


def test_bf16_model_with_a_float32_cache():
    model = build(tiny()).to(torch.bfloat16)
    with torch.no_grad():
        out = model(ids_for(model.config, 1, 3), cache=LatentCache(model.config, 1, 8))
    assert out.logits.isfinite().all()


def test_attention_layer_is_causal_in_absorbed_form_on_the_fast_path():
    from moray.model.mla import AttentionInputs

    model = build(tiny())
    attn = model.layers[0].self_attn
    x = torch.randn(1, 6, model.config.hidden_size)
    pos = torch.arange(6)[None]
    cos, sin = model.rotary(pos)
    with torch.no_grad():
        expanded = attn(x, AttentionInputs(pos, cos, sin, plain_causal=True, absorb=False))
        absorbed = attn(x, AttentionInputs(pos, cos, sin, plain_causal=True, absorb=True))
    assert max_diff(absorbed, expanded) <= TOL
