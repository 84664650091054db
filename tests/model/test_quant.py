import torch

from moray.model import Transformer, preset
from moray.model.experts import RoutedExperts
from moray.model.quant import (
    Int8Linear,
    Int8RoutedExperts,
    quantization_report,
    quantize_int8,
    quantize_per_channel,
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
    q = quantize_int8(model)
    assert any(isinstance(m, Int8RoutedExperts) for m in q.modules())
    assert any(isinstance(m, Int8Linear) for m in q.modules())
    assert not any(p.dtype == torch.float32 and p.dim() == 3 for p in q.parameters())  # no fp32 experts left
    # the original model is untouched
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_quantized_model_generates():
    from moray.model import SamplingParams, generate

    q = quantize_int8(Transformer(preset("tiny")).eval())
    out = generate(q, [[5, 6, 7]], SamplingParams(max_new_tokens=5, stop_token_ids=(-1,)))
    assert len(out[0]) == 5


@torch.inference_mode()
def test_fused_int8_linear_matches_the_dequantized_product():
    linear = torch.nn.Linear(64, 96, bias=True)
    q = Int8Linear(linear)
    x = torch.randn(4, 64)  # a decode step's rows: the fused kernel, activations in bf16
    want = torch.nn.functional.linear(x, q.weight, q.bias)
    got = q(x)
    assert got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 1e-2  # bf16 activations and output
    many = torch.randn(100, 64)  # prefill-sized (past FUSED_MAX_ROWS): the dequantized GEMM, exact
    torch.testing.assert_close(q(many), torch.nn.functional.linear(many, q.weight, q.bias))


def test_int8_experts_decode_never_expands_a_stack(monkeypatch):
    model = Transformer(preset("tiny")).eval()
    layer = next(m for m in model.modules() if type(m).__name__ == "MoE")
    experts = Int8RoutedExperts(layer.experts)
    x = torch.randn(4, model.config.hidden_size)
    top = torch.randn(4, experts.n_experts).topk(model.config.num_experts_per_tok)
    weights = top.values.softmax(-1)
    with torch.no_grad():
        want = RoutedExperts.forward(experts, x, top.indices, weights)  # on the dequantized stacks

    def expanded(self):
        raise AssertionError("a decode step dequantized a whole expert stack")

    monkeypatch.setattr(Int8RoutedExperts, "gate_up_proj", property(expanded))
    monkeypatch.setattr(Int8RoutedExperts, "down_proj", property(expanded))
    with torch.inference_mode():
        got = experts(x, top.indices, weights)
    assert (got - want).norm() / want.norm() < 1e-2
