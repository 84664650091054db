"""Pipeline parallelism: the stage split, each schedule against one process, and the refusals.

Two gloo processes run GPipe, 1F1B and interleaved 1F1B (2 virtual stages each, so 4 stages of a
4-layer model) for three steps of the real `train_step` with tokens dropped and every balance
loss on, against one process on the same micro-batches: the losses (each balance loss too), the
gradient norm, the drops and the routed tokens per expert of every layer agree at every step, and
so do the final weights and a validation loss computed through the schedule (`evaluate`). The
balance losses of the first stage's routers reach their gradients only through `_AddAuxGrad`;
that they matter at all is checked on one process (the router weights move with them).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moray.jobs.pretrain import checkpoint as ckpt
from moray.jobs.pretrain.optim import Schedule, build_optimizer
from moray.jobs.pretrain.parallel import parallelize
from moray.jobs.pretrain.step import ClipSettings, lm_loss, train_step
from moray.model import Transformer, preset
from moray.platform.parallel import ParallelLayout
from moray.platform.pipeline_parallel import (
    PipelinedModel,
    PipelineOptions,
    check_pipeline,
    pipeline_group,
    stage_ranges,
)

STEPS, MICRO, ROWS, SEQ = 3, 4, 2, 16  # 4 micro-batches of 2 sequences per step
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]


def _config():
    return preset("tiny").replace(
        num_hidden_layers=4, capacity_factor=0.5, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        ep_size=2, max_devices_per_token=1, router_z_loss_coef=0.001,
    )  # fmt: skip


def _micro_batches(step: int):
    g = torch.Generator().manual_seed(10 + step)
    seqs = torch.randint(3, 512, (MICRO * ROWS, SEQ + 1), generator=g)
    return [(seqs[m * ROWS : (m + 1) * ROWS, :-1], seqs[m * ROWS : (m + 1) * ROWS, 1:]) for m in range(MICRO)]


def _train(
    layout: ParallelLayout, schedule: str = "1f1b", virtual: int = 1, aux_loss_weight: float = 1.0
) -> dict:
    torch.manual_seed(0)
    mesh = layout.build_mesh()
    model = parallelize(Transformer(_config()), layout, mesh, PipelineOptions(schedule, virtual, MICRO, SEQ))
    opt = build_optimizer(model, "adamw", 1e-3, 0.1, pipeline_group=pipeline_group(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(STEPS, 1, "cosine", 0.1))
    history = []
    for step in range(STEPS):
        stats = train_step(
            model, opt, sched, _micro_batches(step), aux_loss_weight, ClipSettings(global_norm=1.0)
        )
        loads = {i: t.tolist() for i, t in stats.tokens_per_expert.items()}
        history.append(
            {**stats.losses, "grad_norm": stats.grad_norm, "dropped": stats.dropped, "loads": loads}
        )
    model.eval()
    with torch.no_grad():
        if isinstance(model, PipelinedModel):
            val = float(model.evaluate(_micro_batches(STEPS), contextlib.nullcontext, contextlib.nullcontext))
        else:
            val = sum(float(lm_loss(model(i).logits, t, reduction="sum")) for i, t in _micro_batches(STEPS))
    return {"history": history, "val": val, "weights": ckpt.full_model_state(model, pipeline_group(model))}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {s: _train(ParallelLayout(pp=2), s, v) for s, v in SCHEDULES}
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    out = str(root / "results.pt")
    mp.start_processes(_worker, args=(str(root / "init"), out), nprocs=2, start_method="spawn")
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("schedule", [s for s, _ in SCHEDULES])
def test_schedule_equals_one_process(pipelined, schedule):
    want, got = _train(ParallelLayout()), pipelined[schedule]
    assert sum(h["dropped"] for h in want["history"]) > 0  # capacity binds
    for step, (g, w) in enumerate(zip(got["history"], want["history"])):
        assert g.keys() == w.keys()  # every balance loss reported, as without pipelining
        for name in w:
            if name == "loads":
                assert g["loads"] == w["loads"], step  # every layer's routed tokens, from every stage
            else:
                assert g[name] == pytest.approx(w[name], rel=1e-5), (step, name)
    for key, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][key], w, rtol=1e-5, atol=1e-6, msg=key)
    assert got["val"] == pytest.approx(want["val"], rel=1e-5)


def test_balance_losses_move_the_routers():
    """Without the balance losses the first layers' routers train differently: the pipelined runs'
    equal router weights above show those losses' gradients crossed the stages' boundaries."""
    with_aux, without = _train(ParallelLayout()), _train(ParallelLayout(), aux_loss_weight=0.0)
    delta = (
        with_aux["weights"]["layers.1.mlp.gate.weight"] - without["weights"]["layers.1.mlp.gate.weight"]
    ).abs()
    assert float(delta.max()) > 1e-4


def test_stages_are_contiguous_and_flop_balanced():
    ranges = stage_ranges(_config(), 4, SEQ)
    assert [list(r) for r in ranges] == [[0], [1], [2], [3]]
    v2 = stage_ranges(preset("deepseek-v2"), 16, 4096)
    assert [len(r) for r in v2] == [2] + [4] * 14 + [2]  # 60 layers; the ends hold the embedding and head
    assert [i for r in v2 for i in r] == list(range(60))


@pytest.mark.parametrize(
    "changes,args,match",
    [
        ({}, (2, 1, "zero_bubble", 4), "pp_schedule='zero_bubble'"),
        ({}, (2, 2, "1f1b", 4), "interleaved_1f1b takes 2 or more virtual stages"),
        ({}, (2, 1, "interleaved_1f1b", 4), "interleaved_1f1b takes 2 or more virtual stages"),
        ({}, (4, 2, "interleaved_1f1b", 8), "more than the model's 4 layers"),
        ({"tie_word_embeddings": True}, (2, 1, "1f1b", 4), "tied embeddings"),
        ({}, (4, 1, "1f1b", 2), "needs at least 4 micro-batches"),
        ({}, (2, 2, "interleaved_1f1b", 5), "multiple of rounds"),
    ],
)
def test_refusals_name_the_limit(changes, args, match):
    with pytest.raises(ValueError, match=match):
        check_pipeline(_config().replace(**changes), *args)
