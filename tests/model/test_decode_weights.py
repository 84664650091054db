"""bf16 decode weights: the blocked head and the dense-over-experts layer against plain bf16, and a
whole model's logits and greedy tokens against fp32 (the bounds bf16 rounding leaves)."""

import mmap

import pytest
import torch
import torch.nn.functional as F

from moray.model import SamplingParams, Transformer, generate, preset
from moray.model.decode_weights import (
    HUGE_PAGE,
    DenseDecodeExperts,
    PackedLinear,
    for_decode,
    in_huge_pages,
    onednn_bf16,
)
from moray.model.experts import RoutedExperts, sort_pairs, swiglu_experts_few_rows

pytestmark = pytest.mark.skipif(not onednn_bf16(), reason="this CPU has no native bf16 (oneDNN)")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@torch.no_grad()
def test_packed_linear_equals_the_plain_bf16_linear_and_autograd_uses_the_plain_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300).bfloat16()
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight  # a tied head stays tied
    for shape in ((8, 64), (2, 5, 64), (1, 64)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        assert _rel(packed(x), F.linear(x, linear.weight, linear.bias)) < 1e-2
    with torch.enable_grad():
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        packed(x).sum().backward()
    assert linear.weight.grad is not None


def _check_decode_experts(tokens: int, kernel: bool):
    torch.manual_seed(tokens)
    E, H, I, k = 16, 64, 32, 4  # noqa: E741
    experts = RoutedExperts(E, H, I, learned_beta=False, activation_scale=False)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1), torch.nn.init.normal_(experts.down_proj, std=0.1)
    experts.bfloat16()
    x = torch.randn(tokens, H, dtype=torch.bfloat16)
    chosen = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    keep = torch.rand(tokens, k) > 0.2  # over capacity: dropped pairs add nothing
    pairs = sort_pairs(chosen, weights, keep, E)
    rows = swiglu_experts_few_rows(
        x, pairs.token_of_row, experts.gate_up_proj, experts.down_proj, pairs.counts
    )
    want = torch.zeros_like(x).index_add_(0, pairs.token_of_row, rows * pairs.weights.to(x.dtype)[:, None])
    decode = DenseDecodeExperts(experts)
    assert (decode.stacks is not None) == kernel
    got = decode(x, chosen, weights, keep)
    assert _rel(got, want) < 1e-2


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 8, 32, 300])
def test_the_expert_kernel_equals_the_per_expert_loop(tokens, products):
    """moray's hit-expert kernel, on AMX tiles and on the AVX-512 loop; 300 tokens put more than 64
    pairs on an expert (two passes of AMX tiles)."""
    _check_decode_experts(tokens, kernel=True)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 8, 32])
def test_the_dense_decode_experts_equal_the_per_expert_loop(tokens, monkeypatch):
    """The dense blocked products, where the kernel does not build."""
    from moray.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "usable", lambda *a: False)
    _check_decode_experts(tokens, kernel=False)


@torch.no_grad()
def test_a_model_for_decode_stays_close_to_fp32_and_leaves_the_original_alone():
    """Logits within 2% (relative norm) of fp32's, the same next token at 95% of positions or more;
    greedy decoding from them starts with the same token for every prompt."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    fast = for_decode(model)
    assert next(model.parameters()).dtype == torch.float32  # a copy
    assert isinstance(fast.lm_head, PackedLinear)
    assert all(m.dense_decode is not None for m in fast.modules() if type(m) is RoutedExperts)
    ids = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(1))
    want, got = model(ids).logits, fast(ids).logits
    assert got.dtype == torch.bfloat16 and _rel(got, want) < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(-1,))
    first = [seq[0] for seq in generate(model, ids[:, :16], params)]
    assert first == [seq[0] for seq in generate(fast, ids[:, :16], params)]


@pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or not onednn_bf16(), reason="no huge pages or no native bf16 here"
)
def test_in_huge_pages_copies_onto_2mb_boundaries_and_leaves_small_tensors_alone():
    """Whether Linux then backs the copy with 2 MB pages depends on its free memory; what we control
    is the madvise'd, 2 MB-aligned copy that holds the same values and outlives the function."""
    big = torch.randn(1500, 1000).bfloat16()  # 3 MB
    copied = in_huge_pages(big)
    assert copied.data_ptr() % HUGE_PAGE == 0 and copied.data_ptr() != big.data_ptr()
    assert torch.equal(copied, big) and copied.shape == big.shape and copied.is_contiguous()
    small = torch.randn(100).bfloat16()
    assert in_huge_pages(small) is small

    model = for_decode(Transformer(preset("tiny", vocab_size=4096, hidden_size=256)).eval())
    head = model.lm_head.weight  # 4096 x 256 bf16: 2 MB
    assert head.data_ptr() % HUGE_PAGE == 0
