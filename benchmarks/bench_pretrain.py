"""Pre-training throughput of the `small` preset, in one run:

1. Ray's overhead: the training step in one plain PyTorch process against Ray Train with 1 worker.
2. Parallel layouts on the same 2 cores: one process, dp2, ep2 (dp2 with the experts split),
   tp2 and tp2 x ep2 (4 ranks), each running the real step (`parallelize`, `train_step`) in
   spawned gloo processes. Per layout: tokens/s, MFU (against the declared peak of 140 GFLOP/s
   fp32 per 2 cores), the expert all-to-all's bytes and time per step, the share of the step spent
   in collectives (gloo's own threads, measured with the profiler on one step), and parameter and
   optimizer bytes per rank.

On this 2-core machine the ranks share the cores one process uses, so the ratios say how much of
the machine each layout keeps busy and what it moves, not a multi-node speedup. Targets (the expert
and tensor parallelism issue): ep2 at least 2x dp2's tokens/s and at least 0.7x one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ_LEN, GLOBAL_BATCH, MICRO = 256, 4, 2
PEAK = 140e9  # fp32 GEMM on 2 cores (DESIGN.md)


def plain_pytorch(data: Path, steps: int, threads: int) -> float:
    """tokens/s of the same step (same model, batch, optimizer) without Ray."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch.nn.functional as F

    from moray.jobs.pretrain.optim import build_optimizer
    from moray.model import Transformer, preset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = pq.read_table(sorted((data / "train").glob("*.parquet"))[0]).column("input_ids").to_pylist()
    seqs = torch.from_numpy(np.array(rows[:GLOBAL_BATCH], dtype=np.int64))
    model = Transformer(preset("small", vocab_size=512, capacity_factor=1.25))
    opt = build_optimizer(model, "adamw", 3e-4, 0.1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for m in range(0, GLOBAL_BATCH, MICRO):
            x, y = seqs[m : m + MICRO, :-1], seqs[m : m + MICRO, 1:]
            out = model(x)
            loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + out.aux_loss
            (loss * MICRO / GLOBAL_BATCH).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return GLOBAL_BATCH * SEQ_LEN / statistics.median(times[1:])


def ray_train(data: Path, steps: int, workers: int) -> float:
    from moray.jobs.pretrain.job import load_config, run
    from moray.jobs.pretrain.tracker import read_metrics

    cfg = load_config(None, [
        f"data.path={data}", "model.preset=small", "train.capacity_factor=1.25",
        f"data.global_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size={MICRO}", f"train.max_steps={steps}",
        "train.warmup_steps=1", f"train.checkpoint_every={steps}", f"train.val_every={steps}", "train.val_batches=0",
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={2 / workers:g}", "scaling.max_failures=0",
        f"run.name=bench-{workers}w", "run.register_model=null", "run.experiment=moray-bench",
    ])  # fmt: skip
    summary = run(cfg)
    rows = read_metrics(Path(summary["run_dir"]))
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


# ---- parallel layouts, in spawned gloo processes ---------------------------------------------------
LAYOUTS = {"1 process": {}, "dp2": {"dp": 2}, "ep2": {"dp": 2, "ep": 2}, "tp2": {"tp": 2},
           "tp2 x ep2": {"dp": 2, "tp": 2, "ep": 2}}  # fmt: skip


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def _layout_worker(rank: int, world: int, init_file: str, degrees: dict, steps: int, out_file: str) -> None:
    import torch.distributed as dist
    from torch.profiler import profile

    from moray.jobs.pretrain.optim import build_optimizer
    from moray.jobs.pretrain.parallel import parallelize
    from moray.jobs.pretrain.step import ClipSettings, train_step
    from moray.model import Transformer, preset
    from moray.platform.expert_parallel import ALL_TO_ALL
    from moray.platform.parallel import ParallelLayout

    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    layout = ParallelLayout(**degrees)
    mesh = layout.build_mesh()
    torch.manual_seed(0)
    config = layout.configure_model(preset("small", vocab_size=512, capacity_factor=1.25))
    model = parallelize(Transformer(config), layout, mesh)
    opt = build_optimizer(model, "adamw", 3e-4, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    per_rank = GLOBAL_BATCH // layout.dp
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(3, 512, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)[dp_rank * per_rank :][:per_rank]
    micro = [(seqs[m : m + MICRO, :-1], seqs[m : m + MICRO, 1:]) for m in range(0, per_rank, MICRO)]

    def step() -> float:
        t0 = time.perf_counter()
        train_step(model, opt, sched, micro, 0.001, ClipSettings(), loss_parallel=layout.loss_parallel)
        return time.perf_counter() - t0

    times, a2a_bytes, a2a_s = [], [], []
    for _ in range(steps):
        ALL_TO_ALL.reset()
        times.append(step())
        a2a_bytes.append(ALL_TO_ALL.bytes_sent)
        a2a_s.append(ALL_TO_ALL.seconds)
    with profile() as prof:  # one more step, for the time spent in collectives
        profiled = step()
    main_thread = min(e.thread for e in prof.events())
    comm = sum(
        e.cpu_time_total for e in prof.events() if e.name.startswith("gloo:") and e.thread != main_thread
    )
    result = {
        "step_s": statistics.median(times[1:]),
        "a2a_bytes": statistics.median(a2a_bytes[1:]),
        "a2a_s": statistics.median(a2a_s[1:]),
        "comm_share": comm / 1e6 / profiled,
        "param_bytes": _local_bytes(model.parameters()),
        "optim_bytes": _local_bytes(
            t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
        ),
    }
    if rank == 0:
        torch.save(result, out_file)
    if world > 1:
        dist.destroy_process_group()


def run_layout(name: str, steps: int, root: Path) -> dict:
    import torch.multiprocessing as mp

    degrees = LAYOUTS[name]
    world = degrees.get("dp", 1) * degrees.get("tp", 1)
    out = root / f"layout-{len(list(root.glob('layout-*')))}.pt"
    mp.start_processes(_layout_worker, args=(world, str(out) + ".init", degrees, steps, str(out)),
                       nprocs=world, start_method="spawn")  # fmt: skip
    return torch.load(out, weights_only=True)


def main(argv: list[str] | None = None) -> list:
    from common import Result

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv if argv is not None else [])
    from moray.model import preset
    from moray.model.accounting import account

    home = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    os.environ["MORAY_HOME"] = str(home)
    from tests.fixtures.packed_data import write_packed_dataset  # the repo root is on sys.path

    data = write_packed_dataset(
        home / "data", n_train=GLOBAL_BATCH * (args.steps + 1), n_val=4, seq_len=SEQ_LEN
    )
    flops = account(preset("small", vocab_size=512), seq_len=SEQ_LEN).train_flops_per_token

    def mfu(tps: float) -> float:
        return tps * flops / PEAK

    layouts = {name: run_layout(name, args.steps, home) for name in LAYOUTS}
    plain = plain_pytorch(data, args.steps, threads=2)
    import ray

    # 4 logical CPUs on 2 cores: the worker takes 2 (its threads), Ray Data keeps 2 for reading.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray1 = ray_train(data, args.steps, 1)
    ray.shutdown()

    tokens = GLOBAL_BATCH * SEQ_LEN
    print(f"\nsmall preset (vocab 512), seq {SEQ_LEN}, global batch {GLOBAL_BATCH}, fp32, "
          f"{flops / 1e9:.2f} GFLOP/token (fwd+bwd), 2 cores")  # fmt: skip
    print(f"{'setup':<32}{'tokens/s':>10}{'MFU':>7}")
    for name, tps in [("plain PyTorch, 2 threads", plain), ("Ray Train, 1 worker x 2 threads", ray1)]:
        print(f"{name:<32}{tps:>10.0f}{100 * mfu(tps):>6.1f}%")
    print(f"Ray overhead (1 worker vs plain): {100 * (1 - ray1 / plain):.1f}%\n")
    print(f"{'layout (ranks on 2 cores)':<26}{'tokens/s':>9}{'MFU':>7}{'a2a MB/step':>12}{'a2a ms':>8}"
          f"{'comm share':>11}{'params MB/rank':>15}{'optim MB/rank':>14}")  # fmt: skip
    tps = {}
    for name, r in layouts.items():
        tps[name] = tokens / r["step_s"]
        print(f"{name:<26}{tps[name]:>9.0f}{100 * mfu(tps[name]):>6.1f}%{r['a2a_bytes'] / 1e6:>12.2f}"
              f"{1e3 * r['a2a_s']:>8.1f}{100 * r['comm_share']:>10.0f}%{r['param_bytes'] / 1e6:>15.1f}"
              f"{r['optim_bytes'] / 1e6:>14.1f}")  # fmt: skip
    one, dp2, ep2 = tps["1 process"], tps["dp2"], tps["ep2"]
    return [
        Result(
            "pretrain: Ray Train 1 worker vs plain PyTorch",
            ray1 / plain,
            None,
            f"{ray1:.0f} vs {plain:.0f} tok/s",
        ),
        Result("pretrain: dp2 vs 1 process (same 2 cores)", dp2 / one, None, f"{dp2:.0f} vs {one:.0f} tok/s"),
        Result("pretrain: ep2 vs dp2", ep2 / dp2, 2.0, f"{ep2:.0f} vs {dp2:.0f} tok/s"),
        Result("pretrain: ep2 vs 1 process", ep2 / one, 0.7, f"{ep2:.0f} vs {one:.0f} tok/s"),
        Result("pretrain: tp2 vs 1 process", tps["tp2"] / one, None, f"{tps['tp2']:.0f} tok/s"),
        Result(
            "pretrain: tp2 x ep2 (4 ranks) vs 1 process",
            tps["tp2 x ep2"] / one,
            None,
            f"{tps['tp2 x ep2']:.0f} tok/s",
        ),  # fmt: skip
    ]


if __name__ == "__main__":
    main(sys.argv[1:])
