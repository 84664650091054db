import pytest
import torch

from moray.model import Transformer, preset
from moray.model.experts import RoutedExperts
from moray.model.quant import (
    INT4,
    QuantizedLinear,
    QuantizedRoutedExperts,
    quantization_report,
    quantize,
    quantize_per_channel,
    weight_bytes,
)


def test_per_channel_roundtrip_error_is_bounded():
    w = torch.randn(32, 64)
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (32,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_quantized_model_is_close_and_smaller():
    model = Transformer(preset("tiny")).eval()
    ids = torch.randint(3, 512, (2, 24))
    report = quantization_report(model, ids)
    assert report["relative_logit_error"] < 0.03
    assert report["top1_agreement"] > 0.9
    assert report["memory_saved_fraction"] > 0.4  # embeddings stay fp32 in this tiny model
    q = quantize(model, "int8")
    assert any(isinstance(m, QuantizedRoutedExperts) for m in q.modules())
    assert any(isinstance(m, QuantizedLinear) for m in q.modules())
    assert not any(p.dtype == torch.float32 and p.dim() == 3 for p in q.parameters())  # no fp32 experts left
    # the original model is untouched
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_model_generates(fmt):
    from moray.model import SamplingParams, generate

    q = quantize(Transformer(preset("tiny")).eval(), fmt)
    out = generate(q, [[5, 6, 7]], SamplingParams(max_new_tokens=5, stop_token_ids=(-1,)))
    assert len(out[0]) == 5


@torch.inference_mode()
def test_fused_int8_linear_matches_the_dequantized_product():
    linear = torch.nn.Linear(64, 96, bias=True)
    q = QuantizedLinear(linear)
    x = torch.randn(4, 64)  # a decode step's rows: the fused kernel, activations in bf16
    want = torch.nn.functional.linear(x, q.weight, q.bias)
    got = q(x)
    assert got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 1e-2  # bf16 activations and output
    many = torch.randn(100, 64)  # prefill-sized (past FUSED_MAX_ROWS): the dequantized GEMM, exact
    torch.testing.assert_close(q(many), torch.nn.functional.linear(many, q.weight, q.bias))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_decode_never_expands_a_stack(monkeypatch, fmt):
    from moray.model.quant import FORMATS

    model = Transformer(preset("tiny")).eval()
    layer = next(m for m in model.modules() if type(m).__name__ == "MoE")
    experts = QuantizedRoutedExperts(layer.experts, FORMATS[fmt])
    x = torch.randn(4, model.config.hidden_size)
    top = torch.randn(4, experts.n_experts).topk(model.config.num_experts_per_tok)
    weights = top.values.softmax(-1)
    with torch.no_grad():
        want = RoutedExperts.forward(experts, x, top.indices, weights)  # on the dequantized stacks

    def expanded(self):
        raise AssertionError("a decode step dequantized a whole expert stack")

    monkeypatch.setattr(QuantizedRoutedExperts, "gate_up_proj", property(expanded))
    monkeypatch.setattr(QuantizedRoutedExperts, "down_proj", property(expanded))
    with torch.inference_mode():
        got = experts(x, top.indices, weights)
    assert (got - want).norm() / want.norm() < 1e-2


def test_int4_groupwise_roundtrip_error_is_bounded():
    """Each weight is within half a step of its group's grid: (max - min) / 15 / 2, plus bf16's
    rounding of the scale and zero."""
    w = torch.randn(48, 64)
    packed = INT4.pack(w)
    assert packed["qweight"].shape == (48, 32) and packed["qweight"].dtype == torch.uint8  # two a byte
    assert packed["scales_and_zeros"].shape == (64 // INT4.GROUP, 48, 2)
    back = INT4.dequantize(packed, torch.float32)
    groups = w.view(48, -1, INT4.GROUP)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(INT4.GROUP, dim=1)  # (48, 64)
    assert ((back - w).abs() <= step / 2 + 0.02 * w.abs().amax()).all()


@torch.inference_mode()
def test_fused_int4_linear_matches_the_dequantized_product_at_any_size():
    linear = torch.nn.Linear(64, 96, bias=False)
    q = QuantizedLinear(linear, INT4)
    for rows in (1, 4, 100):  # the blocked kernel serves decode and prefill alike
        x = torch.randn(rows, 64)
        want = torch.nn.functional.linear(x, q.weight)
        assert (q(x) - want).norm() / want.norm() < 1e-2  # bf16 activations and output


def test_int4_model_is_smaller_than_int8_and_keeps_unfit_shapes():
    """int4 holds half a byte a weight (int8: one) plus its groups' scales; a linear whose shape the
    kernel does not take (outputs not a multiple of 16) stays float."""
    model = Transformer(preset("tiny")).eval()
    ids = torch.randint(3, 512, (2, 24))
    r8, r4 = quantization_report(model, ids, "int8"), quantization_report(model, ids, "int4")
    assert r4["bytes_after"] < r8["bytes_after"] < r8["bytes_before"]
    assert r4["relative_logit_error"] < 0.2 and r4["top1_agreement"] > 0.5
    q = quantize(model, "int4")
    unfit = [n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features % 16]
    assert unfit and all(isinstance(m, torch.nn.Linear) for n, m in q.named_modules() if n in unfit)
    assert weight_bytes(q) == r4["bytes_after"]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="quantize='int3': one of int8, int4"):
        quantize(Transformer(preset("tiny")), "int3")
