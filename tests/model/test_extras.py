"""moray's architectural extras, each switched on in a tiny model: it changes the output, its parameters
learn, and the absorbed form and the cached decode still agree with the full forward."""

import pytest
import torch
import torch.nn.functional as F

from moray.model import Transformer
from moray.model.masks import additive_mask, allowed_keys, relative_bias
from moray.model.rope import RotaryEmbedding, default_inv_freq
from tests.model.test_mla import TOL, build, decode_matches_full, ids_for, max_diff, tiny

T = 20  # longer than the sliding window and several strides


def perturb_beta(p: torch.Tensor) -> None:
    p.uniform_(0.4, 2.5)


def perturb_scale(p: torch.Tensor) -> None:
    p.uniform_(0.3, 2.0)


def perturb_wavelengths(p: torch.Tensor) -> None:
    p.add_(0.5 * torch.randn_like(p))


def perturb_bias(p: torch.Tensor) -> None:
    p.normal_(0.0, 2.0)


# name -> (config overrides, {parameter name suffix: perturbation} for parameters the extra adds)
EXTRAS = {
    "local": (dict(attention_layer_types=["local", "full", "local"], sliding_window=3), {}),
    "local_global": (dict(attention_layer_types=["local"] * 3, sliding_window=3, num_global_tokens=2), {}),
    "strided": (dict(attention_layer_types=["strided", "full", "strided"], attention_stride=3), {}),
    "strided_global": (
        dict(attention_layer_types=["strided"] * 3, attention_stride=4, num_global_tokens=1),
        {},
    ),
    "swiglu_learned_beta": (dict(swiglu_learned_beta=True), {"beta": perturb_beta}),
    "expert_activation_scale": (dict(expert_activation_scale=True), {"activation_scale": perturb_scale}),
    "rope_per_head_base": (dict(rope_per_head_base=True), {}),
    "rope_learned_wavelengths": (dict(rope_learned_wavelengths=True), {"log_inv_freq": perturb_wavelengths}),
    "rope_per_head_learned": (
        dict(rope_per_head_base=True, rope_learned_wavelengths=True),
        {"log_inv_freq": perturb_wavelengths},
    ),
    "relative_bias": (dict(relative_bias_offsets=[1, 2, 128]), {"relative_bias": perturb_bias}),
    "everything": (  # configs/model/tiny-extras.yaml, scaled to this model
        dict(
            attention_layer_types=["full", "local", "strided"],
            sliding_window=5,
            attention_stride=3,
            num_global_tokens=2,
            swiglu_learned_beta=True,
            expert_activation_scale=True,
            rope_per_head_base=True,
            rope_learned_wavelengths=True,
            relative_bias_offsets=[1, 2, 128],
            capacity_factor=1.25,
        ),
        {
            "beta": perturb_beta,
            "activation_scale": perturb_scale,
            "log_inv_freq": perturb_wavelengths,
            "relative_bias": perturb_bias,
        },
    ),
}


def new_params(model: Transformer, suffixes) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(tuple(suffixes))}


def pair(name: str, seed: int = 0) -> tuple[Transformer, Transformer]:
    """The model with the extra off, and with it on sharing every weight the two have in common."""
    overrides, added = EXTRAS[name]
    off = build(tiny(), seed)
    on = build(tiny(**overrides), seed)
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == set(new_params(on, added)), missing
    return off, on


def perturbed(name: str, seed: int = 0) -> Transformer:
    _, on = pair(name, seed)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for suffix, fn in EXTRAS[name][1].items():
            for p in new_params(on, [suffix]).values():
                fn(p)
    return on


# Extras whose only change is a parameter that starts at the identity (beta = 1, scale = 1, bias = 0,
# the RoPE frequencies themselves): switched on, they change nothing until trained.
IDENTITY_AT_INIT = {
    "swiglu_learned_beta",
    "expert_activation_scale",
    "rope_learned_wavelengths",
    "relative_bias",
}


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_extra_changes_the_output(name):
    off, on = pair(name)
    ids = ids_for(off.config, 2, T)
    with torch.no_grad():
        base = off(ids).logits
        at_init = on(ids).logits
        if name in IDENTITY_AT_INIT:
            assert max_diff(at_init, base) <= 1e-5
        else:  # a mask or position change acts at once
            assert max_diff(at_init, base) > 1e-2
        if EXTRAS[name][1]:  # moving the new parameters moves the output
            assert max_diff(perturbed(name)(ids).logits, at_init) > 1e-2


@pytest.mark.parametrize("name", sorted(n for n in EXTRAS if EXTRAS[n][1]))
def test_extra_parameters_get_gradients(name):
    model = perturbed(name).train()
    ids = ids_for(model.config, 2, T)
    out = model(ids)
    targets = ids.roll(-1, dims=1)  # every position in the loss, so every routed pair matters
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()) + out.aux_loss
    loss.backward()
    params = new_params(model, EXTRAS[name][1])
    assert params
    for pname, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if pname.endswith("relative_bias"):  # (H, offsets): 1 and 2 occur in a length-20 sequence, 128 not
            layer = int(pname.split(".")[1])
            if model.config.attention_layer_type(layer) != "strided":  # (1 and 2 are off a stride of 3)
                assert (p.grad[:, 0:2] != 0).all(), pname
            assert (p.grad[:, 2] == 0).all(), pname
        elif pname.startswith("layers.") and ".mlp.experts." in pname:  # one value per routed expert
            layer = int(pname.split(".")[1])
            used = out.router_stats[layer].tokens_per_expert > 0
            assert ((p.grad != 0) == used).all(), pname
        else:
            assert (p.grad != 0).all(), pname


def test_a_long_relative_offset_gets_a_gradient_once_the_sequence_reaches_it():
    model = perturbed("relative_bias").train()
    ids = ids_for(model.config, 1, 130)
    model(ids).logits.logsumexp(-1).mean().backward()
    for layer in model.layers:
        assert (layer.self_attn.relative_bias.grad != 0).all()


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_absorbed_equals_expanded_with_the_extra(name):
    model = perturbed(name)
    ids = ids_for(model.config, 3, T)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 15:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    with torch.no_grad():
        assert max_diff(model(ids, absorb=True).logits, model(ids, absorb=False).logits) <= TOL
        padded_abs = model(ids, attention_mask=mask, absorb=True).logits
        padded_exp = model(ids, attention_mask=mask, absorb=False).logits
        right_alone = model(ids[1:2, :15]).logits[0]
        left_alone = model(ids[2:3, 5:]).logits[0]
    assert max_diff(padded_abs, padded_exp) <= TOL
    # Padding is invisible on either side, global tokens included (they are a row's first real tokens).
    assert max_diff(padded_exp[1, :15], right_alone) <= TOL
    assert max_diff(padded_exp[2, 5:], left_alone) <= TOL


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_cached_decode_equals_full_forward_with_the_extra(name):
    model = perturbed(name)
    ids = ids_for(model.config, 2, T)
    assert decode_matches_full(model, ids, prefill=7, chunk=1) <= TOL
    assert decode_matches_full(model, ids, prefill=2, chunk=3) <= TOL


# ---- masks ----------------------------------------------------------------------------------------------


def grid(config, layer_type, n=12, k_valid=None):
    pos = torch.arange(n)[None]
    return allowed_keys(config, layer_type, pos, pos, k_valid)[0, 0]  # (T, S)


def test_local_mask_sees_the_window_and_the_global_tokens():
    cfg = tiny(sliding_window=4)
    allowed = grid(cfg, "local")
    for t in range(12):
        for s in range(12):
            assert allowed[t, s] == (0 <= t - s < 4), (t, s)
    allowed = grid(cfg.replace(num_global_tokens=2), "local")
    for t in range(12):
        for s in range(12):
            assert allowed[t, s] == (0 <= t - s < 4 or s < 2 <= t or s <= t < 2), (t, s)
    assert allowed.sum(-1).tolist() == [1, 2, 3, 4, 5] + [6] * 7  # the 4 in the window plus globals 0-1


def test_strided_mask_sees_multiples_of_the_stride_and_the_global_tokens():
    cfg = tiny(attention_stride=3)
    allowed = grid(cfg, "strided")
    for t in range(12):
        for s in range(12):
            assert allowed[t, s] == (t >= s and (t - s) % 3 == 0), (t, s)
    allowed = grid(cfg.replace(num_global_tokens=1), "strided")
    for t in range(12):
        for s in range(12):
            assert allowed[t, s] == (t >= s and ((t - s) % 3 == 0 or s < 1)), (t, s)


def test_full_mask_is_causal_and_padding_is_masked():
    cfg = tiny()
    assert torch.equal(grid(cfg, "full"), torch.ones(12, 12, dtype=torch.bool).tril())
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    allowed = grid(cfg, "local", k_valid=valid)
    assert not allowed[3:, :3].any()
    assert allowed[:3].all()  # a pad query that could see nothing sees everything (no NaN)
    assert additive_mask(allowed, torch.float32)[5, 0] == torch.finfo(torch.float32).min
    assert additive_mask(allowed, torch.float32)[5, 5] == 0


def test_masks_use_absolute_positions_for_a_decode_step():
    cfg = tiny(sliding_window=4, num_global_tokens=1, attention_stride=5)
    q, k = torch.tensor([[10]]), torch.arange(11)[None]
    assert allowed_keys(cfg, "local", q, k, None)[0, 0, 0].nonzero().flatten().tolist() == [0, 7, 8, 9, 10]
    assert allowed_keys(cfg, "strided", q, k, None)[0, 0, 0].nonzero().flatten().tolist() == [0, 5, 10]


def test_relative_bias_lands_on_the_offsets():
    bias = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (H=2, offsets [1, 3])
    pos = torch.arange(6)[None]
    out = relative_bias([1, 3], bias, pos, pos)  # (1, 2, 6, 6)
    assert out.shape == (1, 2, 6, 6)
    for h in range(2):
        for t in range(6):
            for s in range(6):
                want = {1: bias[h, 0].item(), 3: bias[h, 1].item()}.get(t - s, 0.0)
                assert out[0, h, t, s].item() == want


def single_layer(**overrides) -> Transformer:
    return build(tiny(num_hidden_layers=1, first_k_dense_replace=1, **overrides))


def changed_positions(model: Transformer, n: int = 14) -> list[int]:
    """Positions whose logits change when only the token at position 0 changes."""
    ids = ids_for(model.config, 1, n)
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % model.config.vocab_size
    with torch.no_grad():
        diff = (model(ids).logits - model(other).logits).abs().amax(-1)[0]
    return (diff > 1e-6).nonzero().flatten().tolist()


def test_a_local_layer_does_not_see_past_its_window():
    assert changed_positions(single_layer(attention_layer_types=["local"], sliding_window=4)) == [0, 1, 2, 3]
    globals_on = single_layer(attention_layer_types=["local"], sliding_window=4, num_global_tokens=1)
    assert changed_positions(globals_on) == list(range(14))
    assert changed_positions(single_layer()) == list(range(14))


def test_a_strided_layer_sees_only_its_stride():
    model = single_layer(attention_layer_types=["strided"], attention_stride=4)
    assert changed_positions(model) == [0, 4, 8, 12]


# ---- RoPE extras ------------------------------------------------------------------------------------------


def test_per_head_bases_spread_geometrically():
    cfg = tiny(rope_per_head_base=True, rope_per_head_base_spread=4.0, rope_theta=1000.0)
    rope = RotaryEmbedding(cfg)
    H, r = cfg.num_attention_heads, cfg.qk_rope_head_dim
    assert rope.per_head and rope.inv_freq.shape == (H, r // 2)
    bases = [1000.0 * 4.0**e for e in torch.linspace(-1, 1, H).tolist()]
    for h, b in enumerate(bases):
        assert torch.allclose(rope.inv_freq[h], default_inv_freq(r, b), rtol=1e-5)
    cos, _ = rope(torch.arange(5)[None])
    assert cos.shape == (1, H, 5, r // 2)


def test_learned_wavelengths_start_at_the_rope_frequencies():
    cfg = tiny(rope_learned_wavelengths=True)
    model = Transformer(cfg)
    params = dict(model.named_parameters())
    assert "rotary.log_inv_freq" in params
    assert torch.allclose(model.rotary.inv_freq, default_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta))
    assert "rotary._inv_freq" not in dict(model.named_buffers())


def test_yarn_blend_is_yarn_without_truncation_on_the_default_frequencies():
    """The extras' YaRN (from each frequency's rotations over the original context) equals the
    published index form with its ramp left untruncated, and it applies per head."""
    from moray.model.rope import yarn_blend, yarn_inv_freq

    scaling = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "truncate": False}
    want, _ = yarn_inv_freq(32, 10000.0, scaling)
    torch.testing.assert_close(yarn_blend(default_inv_freq(32, 10000.0), scaling), want)

    cfg = tiny(rope_per_head_base=True, rope_scaling={**scaling, "original_max_position_embeddings": 16})
    rotary = RotaryEmbedding(cfg)
    plain = RotaryEmbedding(tiny(rope_per_head_base=True))
    torch.testing.assert_close(rotary.inv_freq, plain.inv_freq)  # the bases as trained; YaRN on top
    cos, _ = rotary(torch.arange(5)[None])
    assert cos.shape == (1, cfg.num_attention_heads, 5, cfg.qk_rope_head_dim // 2)
    assert rotary.attention_scaling > 1 and not torch.allclose(cos, plain(torch.arange(5)[None])[0])
