"""Parallel layouts of pre-training, loss-equal to one process (gloo, fp32, deterministic).

Five steps of the real step (`train_step`, `reduce_stats`, `moe_feedback`) on the tiny model, two
micro-batches each, through `parallelize` (FSDP2, sharded or replicated; tensor-parallel DTensors with the loss on
vocab-sharded logits; expert shards with all-to-all dispatch; pipeline stages under 1F1B, up to
pp2 x tp2 x ep2 on 8 ranks), with AdamW and with LAMB (adaptive weight decay on),
against one process on the whole batch: capacity binding (tokens are dropped, and the controller
moves the factor), routing device-limited (2 groups, 1 per token), every balance loss on, clipping
per expert, per layer and globally. Losses, gradient norms, drops and capacity factors agree at every step, and the final
weights, gathered, agree too.

Checkpoints move between layouts: each layout's checkpoint loads into one process, the one-process
checkpoint into each layout, others across (pp2 x tp2 into dp4 and pp2 x ep2, ...), every time
with the writer's next-step loss. Processes are spawned directly (no Ray: the layouts are plain PyTorch;
tests/jobs/pretrain/test_job.py runs them under Ray Train)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moray.jobs.pretrain import checkpoint as ckpt
from moray.jobs.pretrain.optim import Schedule, build_optimizer
from moray.jobs.pretrain.parallel import parallelize
from moray.jobs.pretrain.step import ClipSettings, forward_backward, moe_feedback, reduce_stats, train_step
from moray.model import CapacityController, Transformer, preset
from moray.platform.parallel import ParallelLayout
from moray.platform.pipeline_parallel import PipelineOptions, pipeline_group
from moray.platform.storage import Storage

# Each step's batch is MICRO global micro-batches of BATCH / MICRO sequences; a data-parallel rank
# takes its slice of each (capacity and balance are decided over the whole global micro-batch).
STEPS, BATCH, MICRO, SEQ = 5, 8, 2, 16
OPTIMIZERS = ("adamw", "lamb_adam")
CLIP = ClipSettings(per_layer=0.5, per_expert=0.02, global_norm=1.0)
LAYOUTS = {
    "one": ParallelLayout(),
    "dp2": ParallelLayout(dp=2),
    "dp4": ParallelLayout(dp=4),
    "dp2-replicate": ParallelLayout(dp=2, dp_mode="replicate"),  # DDP: gradients all-reduced once a step
    "dp2-ep2": ParallelLayout(dp=2, ep=2),
    "tp2": ParallelLayout(tp=2),
    "tp2-ep2": ParallelLayout(dp=2, tp=2, ep=2),  # 4 ranks: 2 data-parallel x 2 tensor-parallel
    "pp2": ParallelLayout(pp=2),
    "pp2-dp2": ParallelLayout(pp=2, dp=2),
    "pp2-ep2": ParallelLayout(pp=2, dp=2, ep=2),
    "pp2-tp2": ParallelLayout(pp=2, tp=2),
    "pp2-tp2-ep2": ParallelLayout(pp=2, dp=2, tp=2, ep=2),  # 8 ranks
}


def _config():
    return preset("tiny").replace(
        topk_method="group_limited_greedy", n_group=2, topk_group=1, ep_size=2, max_devices_per_token=1,
        router_z_loss_coef=0.001,
    )  # fmt: skip


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    seqs = torch.randint(3, 512, (BATCH, SEQ + 1), generator=g)
    return seqs[:, :-1], seqs[:, 1:]


class Rank:
    """One layout built on this process: model, optimizer, and its data-parallel coordinates."""

    def __init__(self, layout: ParallelLayout, optimizer: str):
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.layout = layout
        mesh = layout.build_mesh()
        torch.manual_seed(0)
        pipeline = PipelineOptions("1f1b", 1, MICRO, SEQ)
        self.model = parallelize(Transformer(layout.configure_model(_config())), layout, mesh, pipeline)
        # lr 1e-2 is chaotic for this model (float order grows); LAMB with the adaptive weight decay
        self.opt = build_optimizer(self.model, optimizer, 1e-3, 0.1, adaptive_weight_decay=True,
                                   pipeline_group=pipeline_group(self.model))  # fmt: skip
        self.group = mesh["dp"].get_group() if mesh is not None else None
        self.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of each global micro-batch of step `step`."""
        size, per_rank = BATCH // MICRO, BATCH // MICRO // self.layout.dp
        first = [m * size + self.dp_rank * per_rank for m in range(MICRO)]
        return [tuple(t[i : i + per_rank] for t in _batch(step)) for i in first]

    def loss(self, step: int) -> float:
        """The training loss (capacity on, no update) of step `step`'s batch, over all ranks."""
        stats = forward_backward(
            self.model, self.micro_batches(step), 1.0, loss_parallel=self.layout.loss_parallel
        )
        self.opt.zero_grad(set_to_none=True)
        return reduce_stats(stats, self.layout.dp, self.group).losses["loss"]

    def resumed(self, sched) -> dict:
        """After the last step: the next batch's loss, then, one more step taken (the optimizer
        state and learning rate at work), the loss of the batch after it."""
        next_loss = self.loss(STEPS)
        train_step(self.model, self.opt, sched, self.micro_batches(STEPS), 1.0, CLIP,
                   loss_parallel=self.layout.loss_parallel)  # fmt: skip
        return {"next_loss": next_loss, "after_step": self.loss(STEPS + 1)}

    def restore(self, checkpoint: str, factor: float):
        """Load a checkpoint (the learning rate it was saved with too); returns a scheduler."""
        sched = torch.optim.lr_scheduler.LambdaLR(self.opt, Schedule(STEPS, 2, "cosine", 0.1))
        ckpt.load(Storage(checkpoint), checkpoint, self.model, self.opt)
        self.model.set_capacity_factor(factor)
        return sched


def train(layout: ParallelLayout, optimizer: str, save_to: str | None = None) -> dict:
    """STEPS steps on this rank's slice of each global batch; the group's figures per step."""
    r = Rank(layout, optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(r.opt, Schedule(STEPS, 2, "cosine", 0.1))
    controller = CapacityController(0.5, 0.02, 0.25, 2.0)
    controller.apply(r.model)
    history = []
    for step in range(STEPS):
        stats = train_step(r.model, r.opt, sched, r.micro_batches(step), aux_loss_weight=1.0, clip=CLIP,
                           loss_parallel=layout.loss_parallel)  # fmt: skip
        reduced = reduce_stats(stats, layout.dp, r.group)
        moe_feedback(r.model, reduced, controller)
        history.append({"loss": reduced.losses["loss"], "grad_norm": reduced.grad_norm,
                        "dropped": reduced.dropped, "factor": controller.factor})  # fmt: skip
    if save_to is not None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        ckpt.save(Path(save_to), r.model, r.opt, {"factor": controller.factor}, rank, layout.world_size)
    weights = ckpt.full_model_state(r.model, pipeline_group(r.model))
    return {"history": history, "weights": weights, **r.resumed(sched)}


def run_jobs(layout: ParallelLayout, jobs: list[tuple], root: Path):
    """In one process group of the layout's size: ("train", optimizer, save_to) and ("load",
    optimizer, checkpoint, capacity factor) jobs in order; rank 0's results."""
    if layout.world_size == 1:
        return [_run(layout, job) for job in jobs]
    out = root / f"results-{len(list(root.glob('results-*')))}.pt"
    mp.start_processes(_worker, args=(layout.world_size, str(out) + ".init", layout, jobs, str(out)),
                       nprocs=layout.world_size, start_method="spawn")  # fmt: skip
    return torch.load(out, weights_only=True)


def _run(layout: ParallelLayout, job: tuple):
    if job[0] == "train":
        return train(layout, job[1], job[2])
    r = Rank(layout, job[1])
    return r.resumed(r.restore(job[2], job[3]))


def _worker(rank: int, world: int, init_file: str, layout, jobs, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [_run(layout, job) for job in jobs]
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each layout's training with both optimizers, once per module: name -> optimizer -> result,
    with its checkpoint under result["checkpoint"]."""
    root = tmp_path_factory.mktemp("layouts")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            jobs = [("train", opt, str(root / name / opt)) for opt in OPTIMIZERS]
            results = run_jobs(LAYOUTS[name], jobs, root)
            cache[name] = {
                opt: {**res, "checkpoint": str(root / name / opt)} for opt, res in zip(OPTIMIZERS, results)
            }
        return cache[name]

    get.root = root
    return get


@pytest.mark.parametrize(
    "name",
    [
        "dp2",
        "dp2-replicate",
        "dp2-ep2",
        "tp2",
        "tp2-ep2",
        "pp2",
        "pp2-dp2",
        "pp2-ep2",
        "pp2-tp2",
        "pp2-tp2-ep2",
    ],
)
def test_layout_equals_one_process(runs, name):
    for optimizer in OPTIMIZERS:
        want, got = runs("one")[optimizer], runs(name)[optimizer]
        assert sum(h["dropped"] for h in want["history"]) > 0  # capacity binds
        assert len({h["factor"] for h in want["history"]}) > 1  # and the controller moves it
        for step, (g, w) in enumerate(zip(got["history"], want["history"])):
            assert g["dropped"] == w["dropped"], (optimizer, step)
            assert g["factor"] == pytest.approx(w["factor"], rel=1e-12), (optimizer, step)
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (optimizer, step)
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (optimizer, step)
        assert got["weights"].keys() == want["weights"].keys()
        for key, w in want["weights"].items():
            torch.testing.assert_close(got["weights"][key], w, rtol=1e-5, atol=1e-5, msg=f"{optimizer} {key}")
        assert got["next_loss"] == pytest.approx(want["next_loss"], rel=1e-5)
        assert got["after_step"] == pytest.approx(want["after_step"], rel=1e-5)

        # the layout's checkpoint restores into one process: the same weights, the same losses
        r = Rank(LAYOUTS["one"], optimizer)
        sched = r.restore(got["checkpoint"], got["history"][-1]["factor"])
        assert (
            ckpt.verify(Storage(got["checkpoint"]), got["checkpoint"])["world_size"]
            == LAYOUTS[name].world_size
        )
        for key, w in r.model.state_dict().items():
            torch.testing.assert_close(w, got["weights"][key], rtol=0, atol=0, msg=key)
        resumed = r.resumed(sched)
        for key in ("next_loss", "after_step"):
            assert resumed[key] == pytest.approx(got[key], rel=1e-5), key


def _loads(runs, reader: str, writers: list[tuple[str, str]]) -> None:
    """`reader` loads each (writer layout, optimizer) checkpoint: the writer's next-step loss, and
    after one more step (optimizer state and learning rate restored), the writer's loss after it."""
    jobs = [
        ("load", opt, runs(w)[opt]["checkpoint"], runs(w)[opt]["history"][-1]["factor"]) for w, opt in writers
    ]
    for (w, opt), got in zip(writers, run_jobs(LAYOUTS[reader], jobs, runs.root)):
        for key in ("next_loss", "after_step"):
            assert got[key] == pytest.approx(runs(w)[opt][key], rel=1e-5), f"{w} -> {reader} ({opt}): {key}"


def test_checkpoints_move_between_layouts(runs):
    # (every layout's checkpoint also loads into one process: test_layout_equals_one_process)
    _loads(
        runs, "tp2-ep2", [("one", "adamw"), ("tp2", "lamb_adam"), ("dp2-ep2", "adamw"), ("dp2", "lamb_adam")]
    )
    _loads(runs, "dp4", [("pp2-tp2", "adamw"), ("pp2-tp2-ep2", "lamb_adam"), ("tp2-ep2", "adamw")])
    _loads(runs, "dp2-replicate", [("tp2-ep2", "lamb_adam"), ("dp2", "adamw")])
    _loads(runs, "pp2-ep2", [("pp2-tp2", "lamb_adam"), ("one", "adamw"), ("tp2-ep2", "lamb_adam")])
