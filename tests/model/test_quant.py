import torch

from moray.model import Transformer, preset
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
