"""moray's CPU kernels against PyTorch: the attention, RoPE, RMSNorm and the decode linears (the decode
expert kernel is tested with the decode experts, tests/model/test_decode_weights.py), and the experts'
weight gradients of training."""

import pytest
import torch

from moray.model import Transformer, cpu_kernels, preset
from moray.model.cache import LatentCache
from moray.model.decode_weights import for_decode
from moray.model.masks import additive_mask

needs_kernel = pytest.mark.skipif(
    cpu_kernels.kernel() is None, reason="moray's CPU kernels do not build on this machine"
)


@torch.no_grad()
@pytest.mark.parametrize("T, S, c", [(1, 37, 64), (3, 37, 64), (1, 40, 160)])
def test_latent_attention_equals_softmax_attention_in_fp32(T, S, c, products):
    """Key counts with and without a partial block of 16, latent widths of whole and partial blocks
    of 64 columns; the scores on AMX tiles and on the AVX-512 loop."""
    torch.manual_seed(T)
    B, H, r = 3, 4, 32
    cache = torch.randn(B, S + 11, c + r).bfloat16()
    keys = cache[:, :S]  # a slice of a longer cache, read in place
    q = torch.randn(B, H * T, c + r).bfloat16()
    allowed = torch.rand(B, 1, T, S) > 0.3
    allowed[..., 0] = True
    mask = additive_mask(allowed, torch.bfloat16)  # (B, 1, T, S) as the model builds it
    got = cpu_kernels.latent_attention(q, keys, mask, 0.1, c)

    scores = 0.1 * q.float() @ keys.float().transpose(1, 2)  # (B, H*T, S)
    scores = scores + mask[:, 0].float().repeat(1, H, 1)  # row r is token r % T
    want = scores.softmax(-1) @ keys[..., :c].float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unmasked = cpu_kernels.latent_attention(q, keys, None, 0.1, c)
    torch.testing.assert_close(
        unmasked, (0.1 * q.float() @ keys.float().mT).softmax(-1) @ keys[..., :c].float()
    )


@torch.no_grad()
@pytest.mark.parametrize("H, T", [(8, 1), (6, 2), (20, 1)])
def test_absorbed_attention_equals_the_fp32_products(H, T, products):
    """The whole absorbed block (W_UK, the attention, W_UV) against PyTorch in fp32: within the bf16
    rounding of the query and the output. Head counts that are not whole blocks of 4, several new
    tokens, strided queries (splits of one tensor, as the model's), an output width of 48; more heads
    than one task's 16."""
    torch.manual_seed(H)
    B, S, dn, c, r, dv = 2, 45, 32, 64, 32, 48
    q_nope, q_pe = torch.randn(B, H, T, dn + r).bfloat16().split([dn, r], dim=-1)
    keys = torch.randn(B, S + 5, c + r).bfloat16()[:, :S]
    w_uk, w_uv_t = torch.randn(H, dn, c) * dn**-0.5, torch.randn(H, c, dv) * c**-0.5
    allowed = torch.rand(B, 1, T, S) > 0.3
    allowed[..., 0] = True
    mask = additive_mask(allowed, torch.bfloat16)
    got = cpu_kernels.absorbed_attention(q_nope, q_pe, keys, mask, w_uk, w_uv_t, 0.1)  # (B, T, H, dv)

    q = torch.cat([q_nope.float() @ w_uk, q_pe.float()], dim=-1)  # (B, H, T, c + r)
    scores = 0.1 * q @ keys.float()[:, None].mT + mask.float()  # (B, H, T, S)
    want = (scores.softmax(-1) @ keys.float()[:, None, :, :c] @ w_uv_t).transpose(1, 2)
    assert got.shape == (B, T, H, dv) and got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


@needs_kernel
@torch.no_grad()
def test_bf16_decode_with_the_kernel_follows_pytorch_attention(monkeypatch):
    """A bf16 model's decode steps with the kernel against the same model's PyTorch attention: the
    kernel keeps scores and probabilities in fp32 (PyTorch's bf16 bmm rounds them), so the logits
    differ by bf16 rounding only."""
    config = preset("tiny", kv_lora_rank=96, qk_rope_head_dim=32, capacity_factor=None)
    torch.manual_seed(0)
    model = for_decode(Transformer(config).eval())
    ids = torch.randint(3, 512, (2, 9))
    steps = torch.randint(3, 512, (2, 4))

    def decode():
        cache = LatentCache(config, 2, 16, dtype=torch.bfloat16)
        model(ids, cache=cache)
        return torch.stack([model(steps[:, i : i + 1], cache=cache).logits[:, -1] for i in range(4)])

    with_kernel = decode()
    monkeypatch.setattr(cpu_kernels, "attention_usable", lambda *a: False)
    without = decode()
    err = ((with_kernel.float() - without.float()).norm() / without.float().norm()).item()
    assert err < 2e-2, err


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("heads_in_angles", [1, 4])
def test_rope_kernel_is_bit_identical_to_pytorchs(monkeypatch, heads_in_angles):
    """The kernel rotates a strided bf16 view (q_pe is a split of q) exactly as apply_rope's 14 ops
    do, shared or per-head angles."""
    from moray.model.rope import apply_rope

    torch.manual_seed(1)
    q = torch.randn(3, 4, 5, 64 + 32).bfloat16()
    x = q[..., 64:]  # (B, h, T, r), not contiguous
    angles = torch.rand(3, heads_in_angles, 5, 16) * 100
    got = apply_rope(x, angles.cos(), angles.sin())
    monkeypatch.setattr(cpu_kernels, "rope_usable", lambda *a: False)
    want = apply_rope(x, angles.cos(), angles.sin())
    assert torch.equal(got, want)


@needs_kernel
@torch.no_grad()
def test_rms_norm_kernel_follows_pytorchs_within_one_bf16_rounding(monkeypatch):
    from moray.model.norm import RMSNorm

    torch.manual_seed(2)
    norm = RMSNorm(96).to(torch.bfloat16)
    norm.weight.data = torch.randn(96).bfloat16()
    x = (torch.randn(5, 3, 96) * 4).bfloat16()[:, 1:]  # a strided view
    got = norm(x)
    monkeypatch.setattr(cpu_kernels, "norm_usable", lambda *a: False)
    want = norm(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(1, 64), (2, 3, 64), (8, 1, 96), (40, 64), (70, 32)])
@pytest.mark.parametrize("outputs", [40, 48])
def test_few_rows_linear_equals_the_fp32_product_rounded_to_bf16(shape, outputs, products):
    """The decode linears' kernel: any leading shape, output sizes that are not whole blocks of 16
    (the AVX-512 loop takes those), several blocks of 16 rows and two passes of 64 on AMX."""
    torch.manual_seed(3)
    x = torch.randn(*shape).bfloat16()
    weight = torch.randn(outputs, shape[-1]).bfloat16()
    got = cpu_kernels.few_rows_linear(x, weight)
    want = x.float() @ weight.float().T
    assert got.shape == (*shape[:-1], outputs) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows, V", [(1, 32000), (8, 32000), (33, 37), (3, 15), (2, 16)])
def test_argmax_kernel_returns_pytorchs_indices(rows, V):
    """Random rows of the head's width and of widths with and without a partial block of 16, rows of a
    wider tensor (the logits' last position), then the cases an order alone does not settle: ties
    (the first maximum), a row of -inf (index 0), NaN (the first NaN, even past an inf)."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 2, V + 5).bfloat16()[:, -1, 2 : V + 2]  # strided rows
    assert cpu_kernels.argmax_usable(x)
    assert torch.equal(cpu_kernels.argmax(x), x.argmax(dim=-1))
    x = torch.zeros(4, V, dtype=torch.bfloat16)
    x[1, V // 3], x[1, V - 1] = 1.0, 1.0
    x[2] = float("-inf")
    x[3, V - 1], x[3, V // 2], x[3, 0] = float("nan"), float("nan"), float("inf")
    got = cpu_kernels.argmax(x)
    assert torch.equal(got, x.argmax(dim=-1)) and got.tolist() == [0, V // 3, 0, V // 2]
    assert not cpu_kernels.argmax_usable(x.float()) and not cpu_kernels.argmax_usable(x.t())


needs_amx = pytest.mark.skipif(not cpu_kernels.amx(), reason="the weight-gradient kernel runs on AMX only")


@needs_amx
@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_outer_into_sums_every_segments_products_in_fp32(threads):
    """Three micro-batches' rows (uneven counts, an expert no micro-batch hits, one hit in a single
    micro-batch, 33 rows: more than one block of 32) into one fp32 gradient: the float64 sum of the
    per-expert products of the same bf16 rows, written, then accumulated onto. The third segment
    names its rows: a's in a padded grid (padding rows of NaN, never read), b's among 10 token rows."""
    from moray.model.experts import grouped_outer

    torch.manual_seed(0)
    E, M, N = 6, 64, 96
    counts = [
        torch.tensor([3, 0, 33, 1, 7, 0]),
        torch.tensor([5, 0, 0, 2, 9, 0]),
        torch.tensor([1, 0, 4, 0, 0, 6]),
    ]
    segments = [
        cpu_kernels.OuterSegment(
            torch.randn(int(c.sum()), M).bfloat16(), torch.randn(int(c.sum()), N).bfloat16(), c
        )
        for c in counts[:2]
    ]
    grid = torch.full((E * 8, M), float("nan")).bfloat16()  # 8 slots an expert, the first counts[e] real
    a_rows = torch.cat([torch.arange(n) + 8 * e for e, n in enumerate(counts[2].tolist())])
    grid[a_rows] = torch.randn(len(a_rows), M).bfloat16()
    tokens, b_rows = torch.randn(10, N).bfloat16(), torch.randint(0, 10, (len(a_rows),))
    segments.append(cpu_kernels.OuterSegment(grid, tokens, counts[2], a_rows, b_rows))
    dense = [(s.a, s.b, s.counts) for s in segments[:2]] + [(grid[a_rows], tokens[b_rows], counts[2])]
    want = sum(grouped_outer(a.double(), b.double(), c) for a, b, c in dense)
    out = torch.full((E, M, N), float("nan"))
    assert cpu_kernels.outer_usable(out, segments[0].a, segments[0].b)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_kernels.grouped_outer_into(out, segments, accumulate=False)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[1], torch.zeros(M, N))  # no rows: zeros, not what was there
        cpu_kernels.grouped_outer_into(out, segments[:1], accumulate=True)
        first = grouped_outer(segments[0].a.double(), segments[0].b.double(), counts[0])
        torch.testing.assert_close(out.double(), want + first, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="do not add up"):
            cpu_kernels.grouped_outer_into(
                out, [cpu_kernels.OuterSegment(grid, tokens, counts[0], a_rows)], False
            )
    finally:
        torch.set_num_threads(before)
    a, b = segments[0].a, segments[0].b
    assert not cpu_kernels.outer_usable(out, a.float(), b.float())  # bf16 rows only
    assert not cpu_kernels.outer_usable(torch.empty(E, 48, N), a[:, :48], b)  # whole blocks of 32 only


@needs_kernel
def test_swiglu_kernels_equal_the_fp32_activation_and_its_gradients_to_bf16_rounding(monkeypatch):
    """The experts' activation and its backward, fused: against fp32 autograd on the same bf16 values
    (gates out to +-12, where silu saturates), every element within one bf16 rounding of it. PyTorch's
    bf16 ops (the fallback) round each op's result: within 4 roundings of each tensor's largest value
    (d w sums rounded products, so a small sum can be far off relative to itself)."""
    import torch.nn.functional as F

    from moray.model import experts

    torch.manual_seed(0)
    P, I = 70, 48  # noqa: E741
    h = (torch.randn(P, 2 * I) * 4).clamp(-12, 12).bfloat16()
    grad_act, w = torch.randn(P, I).bfloat16(), torch.rand(P).bfloat16()
    h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
    gate, up = h32.chunk(2, dim=-1)
    act = F.silu(gate) * up
    (act * w32[:, None]).backward(grad_act.float())
    want = {
        "act": act.detach(),
        "grad_h": h32.grad,
        "act_w": (act * w32[:, None]).detach(),
        "grad_w": w32.grad,
    }

    def check(got: dict, ulps: float, per_element: bool) -> None:
        for name, value in got.items():
            assert value.dtype == torch.bfloat16, name
            scale = want[name].abs().clamp_min(1e-2) if per_element else want[name].abs().max()
            assert float(((value.float() - want[name]).abs() / scale).max()) <= ulps * 2**-8, name

    def results() -> dict:
        return dict(zip(want, [experts.swiglu(h), *experts.swiglu_backward(grad_act, h, w)]))

    assert cpu_kernels.swiglu_usable(h) and not cpu_kernels.swiglu_usable(h.float())
    check(results(), ulps=1, per_element=True)
    monkeypatch.setattr(cpu_kernels, "swiglu_usable", lambda h: False)
    check(results(), ulps=4, per_element=False)


@needs_kernel
def test_combine_kernel_sums_each_tokens_weighted_rows_in_fp32_and_rounds_once():
    """The experts' combine: tokens with several rows, one with none (zeros), widths of partial blocks of
    64 columns; weighted and not. Within one bf16 rounding of the float64 sum, where index_add_ in
    bf16 rounds after each row."""
    from moray.model.experts import combine

    torch.manual_seed(0)
    P, H, N = 300, 80, 40
    rows, w = torch.randn(P, H).bfloat16(), torch.rand(P).bfloat16()
    tokens = torch.randint(1, N, (P,))  # token 0 gets no row
    like = torch.empty(N, H, dtype=torch.bfloat16)
    for weights in (w, None):
        want = torch.zeros(N, H, dtype=torch.float64).index_add_(
            0, tokens, rows.double() * (1 if weights is None else weights.double()[:, None])
        )
        got = combine(rows, weights, tokens, like)
        assert got.dtype == torch.bfloat16 and torch.equal(got[0], torch.zeros(H, dtype=torch.bfloat16))
        assert float(((got.double() - want).abs() / want.abs().clamp_min(1e-2)).max()) <= 2**-8
    assert cpu_kernels.combine_usable(rows) and not cpu_kernels.combine_usable(rows.float())


@needs_kernel
@pytest.mark.parametrize("dtype, D", [(torch.float32, 512), (torch.bfloat16, 128), (torch.float32, 48)])
def test_training_rms_norm_kernel_equals_pytorchs_forms_and_their_gradients(dtype, D, monkeypatch):
    """RMSNorm in training with its fp32 weight (fp32 rows: the residual stream; bf16 rows: MLA's latent
    norm under autocast), fused forward and backward, against the PyTorch forms it replaces, on 3-row
    blocks past a whole 64-row block of the weight's gradient: fp32 out, grad_x in the rows' dtype,
    everything within fp32 summation-order error of the reference (1e-5 of its largest value)."""
    from moray.model.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(D)
    norm.weight.data = torch.randn(D)
    x, grad = (torch.randn(3, 67, D) * 3).to(dtype), torch.randn(3, 67, D)

    def run() -> tuple[torch.Tensor, ...]:
        norm.weight.grad = None
        xg = x.clone().requires_grad_(True)
        out = norm(xg)
        out.backward(grad)
        return out.detach(), xg.grad, norm.weight.grad

    got = run()
    assert cpu_kernels.norm_train_usable(x, norm.weight)
    monkeypatch.setattr(cpu_kernels, "norm_train_usable", lambda x, w: False)
    want = run()
    for name, g, w in zip(("out", "grad_x", "grad_weight"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert float((g.float() - w.float()).abs().max()) <= 1e-5 * float(w.float().abs().max()), name
    if dtype == torch.float32:
        with torch.no_grad():  # inference keeps F.rms_norm
            assert torch.equal(norm(x), want[0])
    assert not cpu_kernels.norm_train_usable(x.double(), norm.weight)
    assert not cpu_kernels.norm_train_usable(x, norm.weight.bfloat16())


@needs_amx
@pytest.mark.parametrize("gathered", [True, False], ids=["gathered-rows", "rows-in-order"])
def test_grouped_rows_linear_kernel_equals_the_fp32_products_to_bf16_rounding(gathered):
    """The routed experts' forward products on AMX tiles: ragged groups (an empty one, one of a single
    row, one past a whole block of 16 and one past two pair blocks of 32), an output width with a
    last block of 16 rows, rows gathered by index or read in order; each value within one bf16
    rounding of the fp32 product (fp32 accumulation, rounded once)."""
    torch.manual_seed(0)
    E, K, O, R = 5, 64, 48, 30  # noqa: E741
    x, weight = torch.randn(R, K).bfloat16(), torch.randn(E, O, K).bfloat16()
    counts = torch.tensor([3, 0, 17, 1, 40])
    rows = torch.randint(0, R, (int(counts.sum()),)) if gathered else None
    picked = x[rows] if gathered else torch.randn(int(counts.sum()), K).bfloat16()
    source = x if gathered else picked
    got = cpu_kernels.grouped_rows_linear(source, rows, weight, counts)
    groups = picked.float().split(counts.tolist())
    want = torch.cat([g @ weight[e].float().t() for e, g in enumerate(groups)])
    assert got.dtype == torch.bfloat16 and got.shape == (int(counts.sum()), O)
    assert float(((got.float() - want).abs() / want.abs().clamp_min(1e-1)).max()) <= 2**-8
    P = int(counts.sum())
    assert cpu_kernels.rows_linear_usable(source, weight, P)
    assert not cpu_kernels.rows_linear_usable(source.float(), weight, P)
    assert not cpu_kernels.rows_linear_usable(
        source, weight[:, :40].contiguous(), P
    )  # whole blocks of 16 outputs
    assert not cpu_kernels.rows_linear_usable(source, weight, 129 * E)  # prefill's many rows per expert
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.grouped_rows_linear(x, torch.full((int(counts.sum()),), R), weight, counts)
    none = cpu_kernels.grouped_rows_linear(x, torch.empty(0, dtype=torch.int64), weight, counts * 0)
    assert none.shape == (0, O)  # every pair dropped
