import math

import pytest
import torch

from moray.jobs.pretrain import optim
from moray.jobs.pretrain.optim import LambAdam, Schedule, build_optimizer, clip_gradients, takes_grad_scale
from moray.model import Transformer, cpu_kernels, preset


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


@pytest.mark.skipif(
    not cpu_kernels.adamw_usable(torch.zeros(1)), reason="moray's CPU kernels do not build here"
)
def test_adamw_refreshing_bf16_copies_takes_torchs_steps_and_rounds_the_copies_as_torch():
    """moray's AdamW with working copies runs its own kernel: the weights and the state of torch's fused
    AdamW over 3 steps (the second with a clip's grad_scale), each copy the new weight rounded to bf16
    bit for bit, the state loadable by torch's AdamW; without copies it is torch's step."""
    torch.manual_seed(0)
    shapes = [(64, 33), (7,), (3, 5, 16)]  # partial blocks of 16 included
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    runs = {}
    for kind in ("moray", "torch"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
        cls = optim.AdamW if kind == "moray" else torch.optim.AdamW
        opt = cls(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
        copies = {p: torch.empty_like(p, dtype=torch.bfloat16) for p in params[:2]}
        if kind == "moray":
            opt.copies.update(copies)
        for step, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.grad_scale = torch.tensor(4.0) if step == 1 else None
            opt.step()
        runs[kind] = (params, opt, copies)
    (params, opt, copies), (want, ref, _) = runs["moray"], runs["torch"]
    for p, q in zip(params, want):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-9)
        assert float(opt.state[p]["step"]) == 3.0
    for p, c in copies.items():
        assert torch.equal(c.view(torch.int16), p.detach().bfloat16().view(torch.int16))
        assert opt.refreshed[p] == (p._version, p.data_ptr())
    fresh = [torch.nn.Parameter(t.clone()) for t in start]
    torch.optim.AdamW([{"params": fresh[:2]}, {"params": fresh[2:]}], lr=1e-2).load_state_dict(
        opt.state_dict()
    )


def test_working_weights_take_the_optimizers_copies_unless_a_weight_changed_since():
    """With moray's AdamW the working weights skip their cast: the copies the step wrote are the
    masters rounded. A master changed after the step (loaded from a checkpoint) is cast again."""
    from moray.jobs.pretrain.step import ClipSettings, train_step
    from moray.jobs.pretrain.working_weights import WorkingWeights
    from moray.platform.parallel import ParallelLayout

    bf16 = ParallelLayout(precision="bf16").autocast

    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    opt = build_optimizer(model, "adamw", 1e-2, 0.1)
    ww = WorkingWeights(model, optimizer=opt)
    assert set(opt.copies) == set(ww.params)
    ids = torch.randint(3, 512, (2, 17))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_step(model, opt, sched, [(ids[:, :-1], ids[:, 1:])], 0.01, ClipSettings(), bf16, working_weights=ww)
    refreshed = dict(opt.refreshed)
    assert set(refreshed) == set(ww.params) or not cpu_kernels.adamw_usable(torch.zeros(1))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, sched, [(ids[:, :-1], ids[:, 1:])], 0.01, ClipSettings(), bf16, working_weights=ww)
    model.load_state_dict(saved)  # the masters go back a step: every copy is stale
    with ww:
        for w, master in zip(ww.working, ww.masters):
            assert torch.equal(w, master.bfloat16())


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
