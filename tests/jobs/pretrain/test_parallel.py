"""Parallel layouts of pre-training, loss-equal to one process (gloo, fp32, deterministic).

Ten steps of the real step (`train_step`, `reduce_stats`, `moe_feedback`) on the tiny model,
through `parallelize` (FSDP2; expert shards with all-to-all dispatch), against one process on the
whole batch: capacity binding (tokens are dropped, and the controller moves the factor), routing
device-limited (2 groups, 1 per token), every balance loss on, clipping per expert, per layer and
globally. Losses, gradient norms, drops and capacity factors agree at every step, the final
weights, gathered, agree too, and the layout's checkpoint loads into one process with the same
next-step loss. Processes are spawned directly (no Ray: the layouts are plain
PyTorch; tests/jobs/pretrain/test_job.py runs them under Ray Train)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moray.jobs.pretrain import checkpoint as ckpt
from moray.jobs.pretrain.optim import Schedule, build_optimizer
from moray.jobs.pretrain.parallel import parallelize
from moray.jobs.pretrain.step import ClipSettings, lm_loss, moe_feedback, reduce_stats, train_step
from moray.model import CapacityController, Transformer, preset
from moray.platform.parallel import ParallelLayout
from moray.platform.storage import Storage

STEPS, BATCH, SEQ = 10, 4, 16


def _config():
    return preset("tiny").replace(
        topk_method="group_limited_greedy", n_group=2, topk_group=1, ep_size=2, max_devices_per_token=1,
        router_z_loss_coef=0.001,
    )  # fmt: skip


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    seqs = torch.randint(3, 512, (BATCH, SEQ + 1), generator=g)
    return seqs[:, :-1], seqs[:, 1:]


def _setup(world: int, ep: int, optimizer: str):
    torch.use_deterministic_algorithms(True, warn_only=True)
    layout = ParallelLayout(dp=world, ep=ep)
    mesh = layout.build_mesh()
    torch.manual_seed(0)
    model = parallelize(Transformer(layout.configure_model(_config())), layout, mesh)
    opt = build_optimizer(model, optimizer, 1e-3, 0.1)  # 1e-2 is chaotic for this model: float order grows
    group = mesh["dp"].get_group() if mesh is not None else None
    return layout, model, opt, group


def _rows(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    per_rank = BATCH // world
    return t[rank * per_rank : (rank + 1) * per_rank]


def next_loss(model, world: int, rank: int, group) -> float:
    """The training loss (capacity on, no update) of the batch after the last step, over all ranks."""
    inputs, targets = (_rows(t, world, rank) for t in _batch(STEPS))
    out = model(inputs)
    loss = (lm_loss(out.logits, targets) + out.aux_loss).detach()
    if group is not None:
        dist.all_reduce(loss, group=group)
    return float(loss) / world


def train(world: int, ep: int, optimizer: str, rank: int = 0, save_to: str | None = None) -> dict:
    """STEPS steps on this rank's slice of each global batch; the group's figures per step."""
    layout, model, opt, group = _setup(world, ep, optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(STEPS, 2, "cosine", 0.1))
    controller = CapacityController(0.5, 0.02, 0.25, 2.0)
    controller.apply(model)
    clip = ClipSettings(per_layer=0.5, per_expert=0.02, global_norm=1.0)
    history = []
    for step in range(STEPS):
        inputs, targets = (_rows(t, world, rank) for t in _batch(step))
        stats = train_step(model, opt, sched, [(inputs, targets)], aux_loss_weight=1.0, clip=clip)
        reduced = reduce_stats(stats, layout.dp, group)
        moe_feedback(model, reduced, controller)
        history.append({"loss": reduced.losses["loss"], "grad_norm": reduced.grad_norm,
                        "dropped": reduced.dropped, "factor": controller.factor})  # fmt: skip
    if save_to is not None:
        ckpt.save(Path(save_to), model, opt, {"factor": controller.factor}, rank, world)
    return {"history": history, "next_loss": next_loss(model, world, rank, group),
            "weights": ckpt.full_model_state(model)}  # fmt: skip


def _worker(rank: int, world: int, init_file: str, ep: int, optimizer: str, out_file: str, save_to) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = train(world, ep, optimizer, rank, save_to)
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def run_layout(tmp_path, world: int, ep: int, optimizer: str, save_to: str | None = None) -> dict:
    out = tmp_path / f"{world}-{ep}-{optimizer}.pt"
    mp.start_processes(
        _worker, args=(world, str(tmp_path / f"init-{out.stem}"), ep, optimizer, str(out), save_to),
        nprocs=world, start_method="spawn",
    )  # fmt: skip
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb_adam"])
@pytest.mark.parametrize("ep", [1, 2], ids=["dp2", "dp2-ep2"])
def test_layout_equals_one_process(tmp_path, ep, optimizer):
    want = train(1, 1, optimizer)
    saved = tmp_path / "checkpoint"
    got = run_layout(tmp_path, 2, ep, optimizer, str(saved))
    assert sum(h["dropped"] for h in want["history"]) > 0  # capacity binds
    assert len({h["factor"] for h in want["history"]}) > 1  # and the controller moves it
    for step, (g, w) in enumerate(zip(got["history"], want["history"])):
        assert g["dropped"] == w["dropped"], step
        assert g["factor"] == pytest.approx(w["factor"], rel=1e-12), step
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), step
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), step
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)

    # the layout's checkpoint restores into one process: the same weights, the same next loss
    _, model, opt, _ = _setup(1, 1, optimizer)
    ckpt.load(Storage(str(saved)), str(saved), model, opt)
    assert ckpt.verify(Storage(str(saved)), str(saved))["world_size"] == 2
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w, got["weights"][name], rtol=0, atol=0, msg=name)
    model.set_capacity_factor(got["history"][-1]["factor"])
    assert next_loss(model, 1, 0, None) == pytest.approx(got["next_loss"], rel=1e-5)
    assert got["next_loss"] == pytest.approx(want["next_loss"], rel=1e-5)
