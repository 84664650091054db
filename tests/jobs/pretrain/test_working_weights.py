"""bf16 working weights: the same step as autocast alone, fp32 masters and gradients outside it."""

import pytest
import torch

from moray.jobs.pretrain.optim import build_optimizer
from moray.jobs.pretrain.step import ClipSettings, train_step
from moray.jobs.pretrain.working_weights import WorkingWeights
from moray.model import Transformer, preset
from moray.platform.parallel import ParallelLayout

BF16 = ParallelLayout(precision="bf16")


def _run(working: bool, steps: int = 2, **overrides):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", capacity_factor=1.25, **overrides))
    opt = build_optimizer(model, "adamw", 1e-3, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ww = WorkingWeights.for_layout(model, BF16) if working else None
    seqs = torch.randint(3, 512, (4, 17), generator=torch.Generator().manual_seed(1))
    micro = [(seqs[m : m + 2, :-1], seqs[m : m + 2, 1:]) for m in (0, 2)]
    losses = [
        train_step(model, opt, sched, micro, 0.01, ClipSettings(), BF16.autocast, working_weights=ww).losses[
            "loss"
        ]
        for _ in range(steps)
    ]
    return model, ww, losses


def test_working_weights_take_the_same_steps_as_autocast_alone():
    """The same bf16 roundings of the same fp32 masters, and each micro-batch's gradient added in
    fp32: autocast's per-micro-batch casts, done once a step."""
    (ref, _, want), (got, ww, losses) = _run(False), _run(True)
    assert losses == pytest.approx(want, rel=1e-6)
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32, name  # the masters are back after the step
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    names = {id(p): n for n, p in got.named_parameters()}
    swapped = {names[id(p)] for p in ww.params}
    assert "lm_head.weight" in swapped and "layers.1.mlp.experts.gate_up_proj" in swapped
    assert not any(("embed" in n or "norm" in n or n.endswith("mlp.gate.weight")) for n in swapped)


def test_fp32_parameters_and_gradients_outside_the_step_even_after_an_error():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    ww = WorkingWeights(model)
    ids = torch.randint(3, 512, (2, 8))
    with ww, BF16.autocast():
        assert all(p.dtype == torch.bfloat16 for p in ww.params)
        model(ids).logits.float().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in ww.params)
    with pytest.raises(RuntimeError, match="boom"):
        with ww:
            raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_head_tied_to_the_embedding_stays_fp32_and_layouts_that_shard_take_none():
    model = Transformer(preset("tiny", tie_word_embeddings=True))
    assert all(p is not model.lm_head.weight for p in WorkingWeights(model).params)
    assert WorkingWeights.for_layout(model, ParallelLayout()) is None  # fp32
    assert WorkingWeights.for_layout(model, ParallelLayout(dp=2, precision="bf16")) is None  # FSDP's policy
