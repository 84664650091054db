import math

import pytest
import torch

from moray.jobs.pretrain.optim import LambAdam, Schedule, build_optimizer, clip_gradients, takes_grad_scale
from moray.model import Transformer, preset


def _step(opt, p, grad):
    p.grad = grad.clone()
    opt.step()


def test_lamb_adam_first_step_is_trust_scaled_sign_update():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    w0 = w.detach().clone()
    g = torch.randn(8, 4)
    opt = LambAdam([w], lr=0.01, weight_decay=0.0, eps=1e-12)
    _step(opt, w, g)
    adam = g.sign()  # first Adam step: m_hat / sqrt(v_hat) = g / |g|
    trust = w0.norm() / adam.norm()
    assert torch.allclose(w.detach(), w0 - 0.01 * trust * adam, atol=1e-6)


def test_lamb_adam_decoupled_weight_decay_shrinks_weights_without_gradient_signal():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = LambAdam([w], lr=0.1, weight_decay=0.5, eps=1e-8)
    _step(opt, w, torch.zeros(4, 4))  # zero update: only the decay acts
    assert torch.allclose(w.detach(), torch.full((4, 4), 1 - 0.1 * 0.5))


def test_adaptive_weight_decay_follows_gradient_to_weight_ratio():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = LambAdam([w], lr=0.1, weight_decay=0.5, adaptive_weight_decay=True, awd_beta=0.0)
    _step(opt, w, torch.full((4, 4), 0.01))
    assert opt.param_groups[0]["awd_ref"] == pytest.approx(0.01)
    before = w.detach().clone()
    _step(opt, w, torch.full((4, 4), 0.04))  # 4x the gradient ratio -> 4x the decay this step
    assert opt.param_groups[0]["awd_ema"] == pytest.approx(0.04 / before[0, 0].item(), rel=1e-5)


def test_training_reduces_loss_with_both_optimizers():
    # LAMB's trust ratio scales the step by ||w|| / ||update||, so it takes a larger peak lr.
    for name, lr in (("adamw", 3e-3), ("lamb_adam", 5e-2)):
        torch.manual_seed(0)
        model = Transformer(preset("tiny"))
        opt = build_optimizer(model, name, lr=lr, weight_decay=0.01)
        ids = torch.randint(3, 512, (4, 33))
        losses = []
        for _ in range(15):
            logits = model(ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.5, (name, losses)


def test_clipping_per_expert_and_layer():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    ids = torch.randint(3, 512, (2, 17))
    (model(ids).logits.pow(2).mean() * 1e4).backward()
    stats = clip_gradients(model, per_layer=1e-3, per_expert=1e-4, global_norm=None)
    assert stats["experts_clipped"] > 0 and stats["layers_clipped"] > 0
    for block in model.layers:
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in block.parameters() if p.grad is not None))
        assert norm <= 1e-3 + 1e-6
        experts = getattr(block.mlp, "experts", None)
        if experts is not None:
            per = (
                experts.gate_up_proj.grad.flatten(1).pow(2).sum(1)
                + experts.down_proj.grad.flatten(1).pow(2).sum(1)
            ).sqrt()
            assert (per <= 1e-4 + 1e-6).all()


def test_the_global_clip_through_fused_adamws_step_equals_clipping_the_gradients_first():
    """A fused AdamW takes the global clip's factor into its step (grad_scale): the same weights and the
    same clipped gradients as scaling every gradient first and stepping an unfused AdamW."""
    torch.manual_seed(0)
    ids = torch.randint(3, 512, (2, 17))
    runs = []
    for fused in (True, False):
        torch.manual_seed(1)
        model = Transformer(preset("tiny"))
        opt = build_optimizer(model, "adamw", 1e-2, 0.1)
        if not fused:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
        assert takes_grad_scale(opt) == fused
        norms = []
        for scale in (1e3, 1e-3):  # clipped, then not
            (model(ids).logits.pow(2).mean() * scale).backward()
            norms.append(clip_gradients(model, None, None, 1.0, optimizer=opt)["grad_norm"])
            assert (getattr(opt, "grad_scale", None) is not None) == (fused and norms[-1] > 1.0)
            opt.step()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.zero_grad()
        runs.append((norms, list(model.parameters()), grads))
    (norms, fused_weights, fused_grads), (want_norms, weights, want_grads) = runs
    assert norms[0] > 1.0 > norms[1] and norms == pytest.approx(want_norms, rel=1e-5)
    for p, q in zip(fused_weights + fused_grads, weights + want_grads):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_schedule_shapes():
    cos = Schedule(max_steps=100, warmup_steps=10, kind="cosine", min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.1)
    assert cos(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    wsd = Schedule(max_steps=100, warmup_steps=10, kind="wsd", decay_fraction=0.2, min_ratio=0.0)
    assert wsd(50) == 1.0 and wsd(100) == pytest.approx(0.0) and 0 < wsd(95) < 1
    osc = Schedule(max_steps=100, warmup_steps=20, warmup_oscillation=0.3)
    ramp = [(s + 1) / 20 for s in range(20)]
    assert any(abs(osc(s) - r) > 0.01 for s, r in enumerate(ramp)) and osc(19) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kind"):
        Schedule(max_steps=10, kind="linear")
