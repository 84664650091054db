"""Block-sparse local and strided attention (moray/model/sparse_attention.py): the groups cover exactly
the dense mask's pairs, and the model computes the same outputs and gradients with it as with the
dense mask, where it serves; elsewhere the dense mask stays."""

import pytest
import torch
import torch.nn.functional as F

import moray.model.mla as mla
from moray.model import LatentCache, ModelConfig
from moray.model.masks import additive_mask, allowed_keys
from moray.model.sparse_attention import MIN_BLOCK, grouped_attention, groups_for
from tests.model.test_mla import build, decode_matches_full, ids_for, max_diff, tiny

# (layer type, config overrides, T): windows below and above MIN_BLOCK, strides below and above T,
# with and without global tokens; no T is a multiple of the block or the stride.
LAYOUTS = {
    "local_w5": ("local", dict(sliding_window=5), 150),
    "local_w5_global3": ("local", dict(sliding_window=5, num_global_tokens=3), 150),
    "local_w100_global2": ("local", dict(sliding_window=100, num_global_tokens=2), 333),
    "strided_s7": ("strided", dict(attention_stride=7), 150),
    "strided_s7_global4": ("strided", dict(attention_stride=7, num_global_tokens=4), 150),
    "strided_s64_global1": ("strided", dict(attention_stride=64, num_global_tokens=1), 200),
    "strided_longer_than_T": ("strided", dict(attention_stride=40, num_global_tokens=2), 33),
}


def dense_allowed(cfg: ModelConfig, layer_type: str, T: int) -> torch.Tensor:
    pos = torch.arange(T)[None]
    return allowed_keys(cfg, layer_type, pos, pos, None)[0, 0]  # (T, T)


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_groups_cover_each_allowed_pair_exactly_once(case):
    layer_type, overrides, T = LAYOUTS[case]
    cfg = tiny(**overrides)
    g = groups_for(cfg, layer_type, torch.arange(T)[None], T, None)
    assert g is not None
    n, Lq = g.q_pos.shape
    assert torch.equal(g.q_pos.flatten().sort().values, torch.arange(n * Lq))  # every position once
    allowed = allowed_keys(cfg, layer_type, g.q_pos, g.k_pos, g.k_valid)[:, 0]  # (n, Lq, Sk)
    real_q = (g.q_pos < T)[:, :, None].expand_as(allowed)
    rows = g.q_pos[:, :, None].expand_as(allowed)[allowed & real_q]
    cols = g.k_pos[:, None, :].expand_as(allowed)[allowed & real_q]
    count = torch.zeros(T, T, dtype=torch.long).index_put_(
        (rows, cols), torch.ones_like(rows), accumulate=True
    )
    assert torch.equal(count, dense_allowed(cfg, layer_type, T).long())
    assert n * Lq * g.k_pos.shape[1] < T * T  # fewer scores than the dense mask


def test_groups_are_refused_where_the_dense_mask_must_serve():
    cfg = tiny(sliding_window=5, attention_stride=7)
    pos = torch.arange(150).expand(2, 150)
    assert groups_for(cfg, "local", pos, 150, None) is not None
    assert groups_for(cfg, "local", pos, 150, torch.ones(2, 150, dtype=torch.bool)) is not None
    assert groups_for(cfg, "full", pos, 150, None) is None
    assert groups_for(cfg.replace(block_sparse_attention=False), "local", pos, 150, None) is None
    padded = torch.ones(2, 150, dtype=torch.bool)
    padded[1, 140:] = False
    assert groups_for(cfg, "local", pos, 150, padded) is None  # padding
    assert groups_for(cfg, "strided", pos[:, 10:], 150, None) is None  # a cache with earlier keys
    shifted = pos.clone()
    shifted[1] -= 4
    assert groups_for(cfg, "strided", shifted, 150, None) is None  # positions other than 0..T-1
    # Layouts with no fewer scores than T x T: a window as long as the sequence, a stride of 1.
    assert groups_for(cfg.replace(sliding_window=150), "local", pos, 150, None) is None
    assert groups_for(cfg.replace(attention_stride=1), "strided", pos, 150, None) is None
    assert groups_for(cfg, "local", pos[:, :MIN_BLOCK], MIN_BLOCK, None) is None


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_grouped_attention_equals_the_dense_mask_forward_and_backward(case):
    """Heads of MLA's widths (q and k 12 wide, v 8), a batch of 2 and per-head masks (a relative bias)."""
    layer_type, overrides, T = LAYOUTS[case]
    cfg = tiny(**overrides)
    g = groups_for(cfg, layer_type, torch.arange(T)[None], T, None)
    torch.manual_seed(0)
    B, H = 2, 3
    q, k = torch.randn(B, H, T, 12), torch.randn(B, H, T, 12)
    v = torch.randn(B, H, T, 8)
    head_bias = torch.randn(1, H, 1, 1)  # a per-head term, as a relative bias makes the mask
    grad_out = torch.randn(B, H, T, 8)

    def run(sparse: bool):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        if sparse:
            mask = additive_mask(allowed_keys(cfg, layer_type, g.q_pos, g.k_pos, g.k_valid), torch.float32)
            out = grouped_attention(qq, kk, vv, g, mask + head_bias, scale=0.3)
        else:
            pos = torch.arange(T)[None]
            mask = additive_mask(allowed_keys(cfg, layer_type, pos, pos, None), torch.float32)
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask + head_bias, scale=0.3)
        out.backward(grad_out)
        return out, qq.grad, kk.grad, vv.grad

    for got, want in zip(run(True), run(False)):
        assert max_diff(got, want) <= 1e-5


# Whole models, block-sparse against dense: local and strided layers with global tokens, relative
# biases (through the group masks), per-head RoPE keys and a q bottleneck.
MODELS = {
    "local_strided_global": dict(
        attention_layer_types=["local", "full", "strided"],
        sliding_window=6,
        attention_stride=5,
        num_global_tokens=2,
    ),
    "everything": dict(
        attention_layer_types=["strided", "local", "local"],
        sliding_window=70,
        attention_stride=9,
        num_global_tokens=3,
        relative_bias_offsets=[1, 9, 18, 65],
        rope_per_head_base=True,
        q_lora_rank=12,
    ),
}
T_MODEL = 300


def pair(name: str):
    sparse = build(tiny(**MODELS[name]))
    with torch.no_grad():
        for n, p in sparse.named_parameters():
            if n.endswith("relative_bias"):
                p.normal_(0.0, 2.0)
    dense = build(tiny(**MODELS[name], block_sparse_attention=False))
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def count_grouped(monkeypatch) -> list[int]:
    calls = []
    real = mla.grouped_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mla, "grouped_attention", spy)
    return calls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_block_sparse_equals_dense_forward_and_gradients(name, monkeypatch):
    sparse, dense = pair(name)
    calls = count_grouped(monkeypatch)
    ids = ids_for(sparse.config, 2, T_MODEL)
    targets = ids.roll(-1, dims=1)
    results = {}
    for model in (sparse, dense):
        out = model.train()(ids)
        F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[model is sparse] = out.logits.detach(), grads
    sparse_layers = sum(t != "full" for t in MODELS[name]["attention_layer_types"])
    assert len(calls) == sparse_layers  # the block-sparse model's local and strided layers, no others
    (logits, grads), (want_logits, want_grads) = results[True], results[False]
    assert max_diff(logits, want_logits) <= 1e-5
    assert grads.keys() == want_grads.keys()
    for n, want in want_grads.items():
        assert max_diff(grads[n], want) <= 1e-5 * max(1.0, want.abs().max().item()), n


def test_padding_decode_and_the_switch_keep_the_dense_mask(monkeypatch):
    sparse, dense = pair("local_strided_global")
    calls = count_grouped(monkeypatch)
    ids = ids_for(sparse.config, 2, T_MODEL)
    mask = torch.ones(2, T_MODEL, dtype=torch.long)
    mask[1, 290:] = 0
    with torch.no_grad():
        dense(ids)
        sparse(ids, attention_mask=mask)
        sparse(ids, absorb=True)
        assert not calls
        sparse(ids, attention_mask=torch.ones_like(mask))  # an all-ones mask is no padding
        assert len(calls) == 2


def test_prefill_into_an_empty_cache_is_block_sparse_and_decode_continues_it(monkeypatch):
    model = pair("everything")[0].eval()
    calls = count_grouped(monkeypatch)
    ids = ids_for(model.config, 2, T_MODEL)
    with torch.no_grad():
        full = model(ids).logits
        assert len(calls) == 3
        cache = LatentCache(model.config, 2, T_MODEL)
        prefill = model(ids[:, :290], cache=cache).logits
    assert len(calls) == 6  # the prefill too: its keys are its own 290 positions
    assert max_diff(prefill, full[:, :290]) <= 1e-4
    calls.clear()
    # Decode (absorbed) and a continued prefill (expanded against earlier keys) mask densely.
    assert decode_matches_full(model, ids, prefill=290, chunk=1) <= 1e-4
    assert decode_matches_full(model, ids, prefill=280, chunk=10) <= 1e-4
    assert len(calls) == 3 + 3 + 3 + 3  # the full forward and the first prefill of each: 3 layers each


def test_block_sparse_switch_is_validated_and_travels_with_the_config():
    with pytest.raises(ValueError, match="^block_sparse_attention="):
        tiny(block_sparse_attention="yes")
    cfg = tiny(block_sparse_attention=False)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).block_sparse_attention is False
    assert tiny().block_sparse_attention is True
