"""bf16 working weights: the same step as autocast alone, fp32 masters and gradients outside it;
replicated over data-parallel ranks, the same steps as one process on the whole batch."""

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moray.jobs.pretrain.optim import build_optimizer
from moray.jobs.pretrain.step import ClipSettings, train_step
from moray.jobs.pretrain.working_weights import WorkingWeights
from moray.model import Transformer, cpu_kernels, preset
from moray.platform.parallel import ParallelLayout
from tests.fixtures.ranks import run_ranks

BF16 = ParallelLayout(precision="bf16")


def _run(working: bool, steps: int = 2, **overrides):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", capacity_factor=1.25, **overrides))
    opt = build_optimizer(model, "adamw", 1e-3, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ww = WorkingWeights.for_layout(model, BF16, optimizer=opt) if working else None
    seqs = torch.randint(3, 512, (4, 17), generator=torch.Generator().manual_seed(1))
    micro = [(seqs[m : m + 2, :-1], seqs[m : m + 2, 1:]) for m in (0, 2)]
    losses = [
        train_step(model, opt, sched, micro, 0.01, ClipSettings(), BF16.autocast, working_weights=ww).losses[
            "loss"
        ]
        for _ in range(steps)
    ]
    return model, ww, losses


@contextlib.contextmanager
def _amx(on: bool):
    before = cpu_kernels.amx()
    cpu_kernels.set_amx(on)
    try:
        yield
    finally:
        cpu_kernels.set_amx(before)


def test_working_weights_take_the_same_steps_as_autocast_alone():
    """The same bf16 roundings of the same fp32 masters, and each micro-batch's gradient added in
    fp32: autocast's per-micro-batch casts, done once a step (without AMX: the experts' weight
    gradients from autograd, as under autocast)."""
    with _amx(False):
        (ref, _, want), (got, ww, losses) = _run(False), _run(True)
    assert losses == pytest.approx(want, rel=1e-6)
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32, name  # the masters are back after the step
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    names = {id(p): n for n, p in got.named_parameters()}
    swapped = {names[id(p)] for p in ww.params}
    assert "lm_head.weight" in swapped and "layers.1.mlp.experts.gate_up_proj" in swapped
    assert not any(("embed" in n or "norm" in n or n.endswith("mlp.gate.weight")) for n in swapped)


@pytest.mark.skipif(not cpu_kernels.amx(), reason="the deferred expert gradients run on AMX only")
def test_experts_weight_gradients_are_the_fp32_sums_of_every_micro_batchs_products(monkeypatch):
    """With AMX the experts' backward hands its products to the working weights: after a step of 12
    micro-batches each stack's gradient is the float64 sum of the per-expert products of the bf16
    rows every micro-batch handed over (folded into the buffer once they outweighed it, then at the
    end), the fold's sum of squares is the gradient's (the global clip's norm takes it), and the step
    stays autocast's to bf16 rounding."""
    handed: dict[int, list] = {}
    defer = WorkingWeights.defer

    def recording(self, i, segment):
        took = defer(self, i, segment)
        if took:  # the segment's rows as they were handed over
            a = segment.a if segment.a_rows is None else segment.a[segment.a_rows]
            b = segment.b if segment.b_rows is None else segment.b[segment.b_rows]
            handed.setdefault(i, []).append((a.double(), b.double(), segment.counts))
        return took

    folds = []
    fold = WorkingWeights._fold
    monkeypatch.setattr(WorkingWeights, "defer", recording)
    monkeypatch.setattr(WorkingWeights, "_fold", lambda self, i: (folds.append(i), fold(self, i)))
    torch.manual_seed(0)
    model = Transformer(preset("tiny", capacity_factor=1.25))
    ww = WorkingWeights.for_layout(model, BF16)
    seqs = torch.randint(3, 512, (12, 17), generator=torch.Generator().manual_seed(1))
    micro = [(seqs[m : m + 1, :-1], seqs[m : m + 1, 1:]) for m in range(12)]
    from moray.jobs.pretrain.step import forward_backward

    with ww:
        forward_backward(model, micro, 0.01, BF16.autocast)
    stacks = [
        p for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    ]
    assert stacks and {ww.index[id(p)] for p in stacks} == set(handed)
    assert len(folds) > len(handed)  # some folded mid-step, before the end of it
    from moray.model.experts import grouped_outer

    for p in stacks:
        want = sum(grouped_outer(a, b, counts) for a, b, counts in handed[ww.index[id(p)]])
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-7)
        # the last fold's sum of squares is the whole gradient's, for the global clip
        assert ww.squares[id(p)] == pytest.approx(float(p.grad.double().pow(2).sum()), rel=1e-6)
    assert set(ww.squares) == {id(p) for p in stacks}
    from moray.jobs.pretrain.optim import clip_gradients

    norm = clip_gradients(model, None, None, 1e9, squares=ww.squares)["grad_norm"]
    everything = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    assert norm == pytest.approx(everything**0.5, rel=1e-6)
    monkeypatch.undo()
    with _amx(False):
        (_, _, want), (_, _, got) = _run(False), _run(True)
    (_, _, deferred) = _run(True)
    assert deferred == pytest.approx(want, rel=1e-4) and got == pytest.approx(want, rel=1e-6)


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
    assert ParallelLayout(dp=2, dp_mode="replicate", precision="bf16").working_weights  # the CPU's replicas
    assert not ParallelLayout(dp=2, dp_mode="replicate", precision="bf16", device_type="cuda").working_weights


# ---- replicated over data-parallel ranks: the working weights average the gradients ------------
def _replica(world: int, dtype: torch.dtype, shard_optimizer: bool, seed: int = 0):
    from moray.jobs.pretrain.parallel import parallelize

    layout = ParallelLayout(dp=world, dp_mode="replicate", precision="bf16")
    torch.manual_seed(seed)
    model = parallelize(Transformer(preset("tiny", capacity_factor=1.25)), layout, layout.build_mesh())
    opt = build_optimizer(model, "adamw", 1e-3, 0.1)
    group = dist.group.WORLD if world > 1 else None
    ww = WorkingWeights(model, dtype, group, optimizer=opt, shard_optimizer=shard_optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, ww, sched


def _steps(rank: int, world: int, dtype: torch.dtype, shared_memory: bool = True, steps: int = 3,
           shard_optimizer: bool = True, resume_after: int | None = None, checkpoint: str = "",
           load: str = "dcp", clip: float | None = 1.0) -> dict:  # fmt: skip
    """`steps` steps of the tiny model on a batch of 4 x 16 (two global micro-batches of 2); with
    world 2 each rank takes one sequence of each, replicated (bf16 layout: no DDP), working copies
    in `dtype` averaging the gradients over the ranks. With `resume_after`, the run is saved after
    that many steps and goes on in a new model and optimizer loaded from it: through a distributed
    checkpoint in `checkpoint` (load "dcp": in place), or copies of their state dicts ("state_dict":
    the optimizer's load puts the copies in its state; the parameters' storage is replaced too)."""
    from moray.jobs.pretrain import checkpoint as ckpt
    from moray.jobs.pretrain.step import reduce_stats
    from moray.platform import buffer_mean
    from moray.platform.storage import Storage

    if not shared_memory:
        buffer_mean.SHM_DIR = "/no-such-dir"
    group = dist.group.WORLD if world > 1 else None
    model, opt, ww, sched = _replica(world, dtype, shard_optimizer)
    seqs = torch.randint(3, 512, (4, 17), generator=torch.Generator().manual_seed(1))
    per = 2 // world
    micro = [(seqs[m + rank * per : m + (rank + 1) * per, :-1], seqs[m + rank * per : m + (rank + 1) * per, 1:])
             for m in (0, 2)]  # fmt: skip
    autocast = (
        ParallelLayout(precision="bf16").autocast if dtype == torch.bfloat16 else contextlib.nullcontext
    )
    losses = []
    for step in range(steps):
        if step == resume_after and load == "dcp":
            ckpt.save(Path(checkpoint), model, opt, {}, rank, world, group)
            model, opt, ww, sched = _replica(world, dtype, shard_optimizer, seed=1)  # other weights
            ckpt.load(Storage(checkpoint), checkpoint, model, opt, group)
        elif step == resume_after:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
            model, opt, ww, sched = _replica(world, dtype, shard_optimizer, seed=1)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            for p in model.parameters():  # elsewhere, as a move to another device would leave them
                p.data = p.data.clone()
        stats = train_step(model, opt, sched, micro, 0.01, ClipSettings(global_norm=clip), autocast,
                           working_weights=ww)  # fmt: skip
        losses.append(reduce_stats(stats, world, group).losses["loss"])
    moments = {f"{name}.{key}": opt.state[p][key].clone() for name, p in model.named_parameters()
               for key in ("exp_avg", "exp_avg_sq")}  # fmt: skip
    return {"losses": losses, "weights": model.state_dict(), "moments": moments,
            "transport": ww.mean.transport if ww.mean else None, "shared": ww.shared is not None}  # fmt: skip


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "all-reduce"])
def test_replicas_average_their_gradients_like_one_process_on_the_whole_batch(tmp_path, shared_memory):
    """fp32 working copies (the same arithmetic as one process, in another order): losses and
    weights agree to float rounding; replicated over 2 ranks, through either transport."""
    want = _steps(0, 1, torch.float32)
    for got in run_ranks(_steps, 2, tmp_path, torch.float32, shared_memory):
        assert got["transport"] == ("shared memory" if shared_memory else "all-reduce")
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
        for key, w in want["weights"].items():
            torch.testing.assert_close(got["weights"][key], w, rtol=1e-5, atol=1e-5, msg=key)


def test_bf16_replicas_train_like_one_process_in_bf16(tmp_path):
    want = _steps(0, 1, torch.bfloat16)
    for got in run_ranks(_steps, 2, tmp_path, torch.bfloat16):
        assert got["losses"] == pytest.approx(want["losses"], rel=2e-3)
        assert all(w.dtype == torch.float32 for w in got["weights"].values() if w.is_floating_point())


NO_KERNELS = pytest.mark.skipif(
    not cpu_kernels.adamw_usable(torch.zeros(1)), reason="moray's CPU kernels do not build here"
)


@NO_KERNELS
def test_bf16_replicas_that_share_the_update_take_the_same_steps_as_replicas_that_each_take_all_of_it(
    tmp_path,
):
    """Each of 2 ranks updating its half of the shared weights, moments and copies: the same losses,
    weights and AdamW state as every rank averaging and updating everything, on both ranks. Bit for
    bit over 3 steps without clipping (the kernel's division by 2 is the mean's); one clipped step to
    float rounding (the gradient norm is summed in another order). Further clipped steps would not
    stay that close: a weight an ulp off can flip a bf16 rounding in the next forward, and AdamW
    magnifies the change of an almost-zero gradient."""
    for steps, clip in ((3, None), (1, 1.0)):
        want, got = (
            run_ranks(_steps, 2, tmp_path / f"{shard}{steps}", torch.bfloat16, True, steps, shard, None, "", "dcp", clip)
            for shard in (False, True)
        )  # fmt: skip
        for rank in range(2):
            assert (want[rank]["shared"], got[rank]["shared"]) == (False, True)
            assert got[rank]["losses"] == pytest.approx(want[rank]["losses"], rel=1e-6)
            for kind in ("weights", "moments"):
                for key, w in want[rank][kind].items():
                    if clip is None:
                        assert torch.equal(got[rank][kind][key], w), key
                    else:
                        torch.testing.assert_close(got[rank][kind][key], w, rtol=1e-5, atol=1e-8, msg=key)


@NO_KERNELS
@pytest.mark.parametrize("load", ["dcp", "state_dict"])
def test_bf16_replicas_that_share_the_update_resume_from_a_checkpoint_exactly(tmp_path, load):
    """Saved after 2 steps, loaded into another model and optimizer (in place; or replacing the
    optimizer's state and the parameters' storage, which the shared update takes back into shared
    memory): the third step as in the run that never stopped."""
    want = run_ranks(_steps, 2, tmp_path / "straight", torch.bfloat16, True, 3, True)
    got = run_ranks(
        _steps, 2, tmp_path / "resumed", torch.bfloat16, True, 3, True, 2, str(tmp_path / "ckpt"), load
    )
    for rank in range(2):
        assert got[rank]["shared"] and want[rank]["shared"]
        assert got[rank]["losses"] == want[rank]["losses"]
        for kind in ("weights", "moments"):
            for key, w in want[rank][kind].items():
                assert torch.equal(got[rank][kind][key], w), key


def _clip_per_layer(rank: int, world: int) -> str:
    from moray.jobs.pretrain.optim import clip_gradients

    model, opt, ww, _ = _replica(world, torch.bfloat16, True)
    with pytest.raises(ValueError) as refused:
        clip_gradients(model, 1.0, None, 1.0, optimizer=opt)
    return str(refused.value)


@NO_KERNELS
def test_clipping_per_layer_is_refused_where_each_rank_holds_only_its_part_of_the_mean(tmp_path):
    for message in run_ranks(_clip_per_layer, 2, tmp_path):
        assert "shard_optimizer=False" in message
