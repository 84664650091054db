"""Pre-training throughput of the `small` preset, in one run:

1. Ray's overhead: the training step in one process without Ray against Ray Train with 1 worker, both
   in the config's default precision (`auto`: bf16 on CPUs with AMX or AVX-512 BF16);
   and data-parallel scaling: Ray Train with 2 workers of 1 thread against 1 worker of 2 (target
   0.7x, issue 15).
2. Parallel layouts on the same 2 cores: one process, dp2 (sharded by FSDP2, and replicated: each
   rank a whole copy, gradients all-reduced once a step), ep2 (dp2 with the experts split),
   tp2, tp2 x ep2 (4 ranks) and pp2 (1F1B), each running the real step (`parallelize`,
   `train_step`) in spawned gloo processes. Per layout: tokens/s, MFU (against the declared peak
   of 140 GFLOP/s fp32 per 2 cores), the expert all-to-all's bytes and time per step, the share of
   the step spent in collectives (gloo's own threads, measured with the profiler on one step), and
   parameter and optimizer bytes per rank.
3. The pipeline bubble: pp2 (one rank per core) under GPipe, 1F1B and interleaved 1F1B (2 virtual
   stages each) at m = 2, 4 and 8 micro-batches. Measured: the share of a rank's step
   (forward + backward through the schedule) in which it computes nothing, i.e. 1 - (time in the
   stages' forward and backward) / (step time), averaged over the ranks; against the textbook
   (p-1)/(m+p-1), and (p-1)/(v m+p-1) interleaved.

4. Precision: moray's `train_step` on one process in fp32, in bf16 as the loop runs it (working
   weights cast once per step) and in bf16 under autocast alone, interleaved; tokens/s and the
   fraction of the measured GEMM peak in each dtype. Target: bf16 at least 2x fp32 (issue 15).
   And the loss curves of 200 steps (Markov-chain batches of 4 x 32 tokens): every 20-step mean
   of bf16's within 1% of fp32's (issue 15). Not run on a CPU without AMX or AVX-512 BF16
   (common.no_native_bf16), where bf16 is emulated and `auto` trains in fp32.
5. The gradient mean of bf16 replicas (2 ranks, the small preset's 336 MB of fp32 gradients):
   through shared memory, as the replicas average them on one machine (`BufferMean`), against
   gloo's all-reduce. (Replicas that split the optimizer step, the default on one machine, run
   only its first half: each sums its part.)

On this 2-core machine the ranks share the cores one process uses, so the ratios say how much of
the machine each layout keeps busy and what it moves, not a multi-node speedup. Targets: ep2 at
least 2x dp2's tokens/s and at least 0.7x one process (the expert and tensor parallelism issue);
the measured 1F1B bubble at m = 8 within 25% of the formula (the pipeline issue).
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
    """tokens/s of the step a Ray Train worker runs (same model, batch, optimizer, and the config's
    default precision, `auto`: bf16 where the CPU has AMX or AVX-512 BF16) without Ray."""
    import numpy as np
    import pyarrow.parquet as pq

    from moray.jobs.pretrain.optim import build_optimizer
    from moray.jobs.pretrain.step import ClipSettings, train_step
    from moray.jobs.pretrain.working_weights import WorkingWeights
    from moray.model import Transformer, preset
    from moray.platform.parallel import ParallelLayout

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = pq.read_table(sorted((data / "train").glob("*.parquet"))[0]).column("input_ids").to_pylist()
    seqs = torch.from_numpy(np.array(rows[:GLOBAL_BATCH], dtype=np.int64))
    micro = [(seqs[m : m + MICRO, :-1], seqs[m : m + MICRO, 1:]) for m in range(0, GLOBAL_BATCH, MICRO)]
    layout = ParallelLayout(precision="auto")
    model = Transformer(preset("small", vocab_size=512, capacity_factor=1.25))
    opt = build_optimizer(model, "adamw", 3e-4, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    working = WorkingWeights.for_layout(model, layout, optimizer=opt)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        train_step(model, opt, sched, micro, 0.001, ClipSettings(), layout.autocast, working_weights=working)
        times.append(time.perf_counter() - t0)
    return GLOBAL_BATCH * SEQ_LEN / statistics.median(times[1:])


# Ray Train steps left out of its median: the first ones JIT oneDNN's kernels and allocate, and DDP
# rebuilds its buckets after the first (measured: 1.3 s, 1.3 s, then 0.63 s a step for one worker;
# on a busier day one worker's third and fourth steps still took 1.1-1.2 s, then 0.7)
RAY_WARMUP_STEPS = 4


def ray_train(data: Path, steps: int, workers: int) -> float:
    from moray.jobs.pretrain.job import load_config, run
    from moray.jobs.pretrain.tracker import read_metrics

    total = steps + RAY_WARMUP_STEPS
    cfg = load_config(None, [
        f"data.path={data}", "model.preset=small", "train.capacity_factor=1.25",
        f"data.global_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size={MICRO}", f"train.max_steps={total}",
        "train.warmup_steps=1", f"train.checkpoint_every={total}", f"train.val_every={total}", "train.val_batches=0",
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={2 / workers:g}", "scaling.max_failures=0",
        f"run.name=bench-{workers}w", "run.register_model=null", "run.experiment=moray-bench",
    ])  # fmt: skip
    summary = run(cfg)
    rows = read_metrics(Path(summary["run_dir"]))
    return statistics.median(r["tokens_per_s"] for r in rows[RAY_WARMUP_STEPS:])


def precision_steps(steps: int, threads: int, bf16: bool = True) -> dict[str, float]:
    """Seconds per training step (moray's train_step: the same model, batch and optimizer) in fp32
    and (`bf16`) under the layout's bf16 mixed precision, timed in interleaved rounds."""
    from common import median_times

    from moray.jobs.pretrain.optim import build_optimizer
    from moray.jobs.pretrain.step import ClipSettings, train_step
    from moray.jobs.pretrain.working_weights import WorkingWeights
    from moray.model import Transformer, preset
    from moray.platform.parallel import ParallelLayout

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(3, 512, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)
    micro = [(seqs[m : m + MICRO, :-1], seqs[m : m + MICRO, 1:]) for m in range(0, GLOBAL_BATCH, MICRO)]

    def runner(precision: str, working: bool = True):
        torch.manual_seed(0)
        layout = ParallelLayout(precision=precision)
        model = Transformer(preset("small", vocab_size=512, capacity_factor=1.25))
        opt = build_optimizer(model, "adamw", 3e-4, 0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ww = WorkingWeights.for_layout(model, layout, optimizer=opt) if working else None
        return lambda: train_step(model, opt, sched, micro, 0.001, ClipSettings(), layout.autocast,
                                  working_weights=ww)  # fmt: skip

    runners = {"fp32": runner("fp32")}
    if bf16:
        runners |= {"bf16": runner("bf16"), "bf16 autocast only": runner("bf16", False)}
    return median_times(runners, reps=steps)


def precision_curve(steps: int = 200, block: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The small preset trained `steps` steps in fp32 and in bf16 (working weights, as the loop runs
    it) on the same Markov-chain batches: the mean loss of each block of `block` steps, per precision.
    Issue 15's bound: every block within 1% of fp32's (the tiny preset's is a test, test_step.py)."""
    from moray.jobs.pretrain.optim import Schedule, build_optimizer
    from moray.jobs.pretrain.step import ClipSettings, train_step
    from moray.jobs.pretrain.working_weights import WorkingWeights
    from moray.model import Transformer, preset
    from moray.platform.parallel import ParallelLayout
    from tests.fixtures.markov import markov_batches

    data = markov_batches(steps)
    curves = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        layout = ParallelLayout(precision=precision)
        model = Transformer(preset("small", vocab_size=512, capacity_factor=1.25))
        opt = build_optimizer(model, "adamw", 1e-3, 0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(steps, 10, "cosine", 0.1))
        working = WorkingWeights.for_layout(model, layout, optimizer=opt)
        losses = [
            train_step(model, opt, sched, [(b[:, :-1], b[:, 1:])], 0.01, ClipSettings(), layout.autocast,
                       working_weights=working).losses["lm_loss"]
            for b in data
        ]  # fmt: skip
        curves.append(torch.tensor(losses).view(-1, block).mean(dim=1))
    return curves[0], curves[1]


# ---- parallel layouts, in spawned gloo processes ---------------------------------------------------
LAYOUTS = {"1 process": {}, "dp2 shard": {"dp": 2}, "dp2 replicate": {"dp": 2, "dp_mode": "replicate"},
           "ep2": {"dp": 2, "ep": 2}, "tp2": {"tp": 2}, "tp2 x ep2": {"dp": 2, "tp": 2, "ep": 2},
           "pp2": {"pp": 2}}  # fmt: skip


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
    from moray.platform.pipeline_parallel import PipelineOptions, pipeline_group

    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    layout = ParallelLayout(**degrees)
    mesh = layout.build_mesh()
    torch.manual_seed(0)
    config = layout.configure_model(preset("small", vocab_size=512, capacity_factor=1.25))
    per_rank = GLOBAL_BATCH // layout.dp
    pipeline = PipelineOptions("1f1b", 1, per_rank // MICRO, SEQ_LEN)
    model = parallelize(Transformer(config), layout, mesh, pipeline)
    opt = build_optimizer(model, "adamw", 3e-4, 0.1, pipeline_group=pipeline_group(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
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

    degrees = LAYOUTS[name]
    world = degrees.get("dp", 1) * degrees.get("tp", 1) * degrees.get("pp", 1)
    return _spawn(_layout_worker, world, root, degrees, steps)


def _spawn(worker, world: int, root: Path, *args):
    """Run worker(rank, world, init_file, *args, out_file) on `world` processes; rank 0's result."""
    import torch.multiprocessing as mp

    out = root / f"result-{len(list(root.glob('result-*')))}.pt"
    mp.start_processes(worker, args=(world, str(out) + ".init", *args, str(out)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return torch.load(out, weights_only=True)


# ---- the gradient mean of bf16 replicas -------------------------------------------------------------
def _mean_worker(rank: int, world: int, init_file: str, numel: int, out_file: str) -> None:
    import torch.distributed as dist

    from moray.platform.buffer_mean import BufferMean

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seconds = {}
    for shared in (True, False):
        mean = BufferMean(numel, shared_memory=shared)
        times = []
        for _ in range(4):
            mean.buffer.fill_(rank)  # the next step's gradients, written after the last mean
            mean.mean_()
            times.append(mean.seconds)
        seconds[mean.transport] = statistics.median(times[1:])
    if rank == 0:
        torch.save(seconds, out_file)
    dist.destroy_process_group()


def gradient_means(numel: int, root: Path) -> dict[str, float]:
    """Seconds to average a flat fp32 buffer of `numel` over 2 ranks: shared memory vs gloo."""
    return _spawn(_mean_worker, 2, root, numel)


# ---- the pipeline bubble ----------------------------------------------------------------------------
BUBBLE_SCHEDULES = {"GPipe": ("gpipe", 1), "1F1B": ("1f1b", 1), "interleaved 1F1B": ("interleaved_1f1b", 2)}
BUBBLE_MICRO_BATCHES = (2, 4, 8)
BUBBLE_SEQ = 128  # tokens per micro-batch (one sequence)


def bubble_formula(p: int, m: int, v: int = 1) -> float:
    return (p - 1) / (v * m + p - 1)


def _bubble_worker(rank: int, world: int, init_file: str, schedule: str, virtual: int, steps: int,
                   out_file: str) -> None:  # fmt: skip
    """pp2, one thread per rank: per m, each rank's idle share of the schedule's step (median
    over steps)."""
    import torch.distributed as dist

    from moray.jobs.pretrain.parallel import parallelize
    from moray.model import Transformer, preset
    from moray.platform.parallel import ParallelLayout
    from moray.platform.pipeline_parallel import PipelineOptions

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    layout = ParallelLayout(pp=world)
    # 4 layers of equal cost (all MoE, the head small): the formula assumes balanced stages
    config = preset("small", vocab_size=512, first_k_dense_replace=0)
    result = {}
    for m in BUBBLE_MICRO_BATCHES:
        torch.manual_seed(0)
        model = parallelize(
            Transformer(config),
            layout,
            layout.build_mesh(),
            PipelineOptions(schedule, virtual, m, BUBBLE_SEQ),
        )
        busy = [0.0]
        for stage in model.pipeline_stages:
            for name in ("forward_one_chunk", "backward_one_chunk"):
                _time_into(stage, name, busy)
        g = torch.Generator().manual_seed(0)
        seqs = torch.randint(3, 512, (m, BUBBLE_SEQ + 1), generator=g)
        micro = [(seqs[i : i + 1, :-1], seqs[i : i + 1, 1:]) for i in range(m)]
        idle = []
        for step in range(steps + 1):  # the first step also infers the stages' shapes: not timed
            busy[0] = 0.0
            t0 = time.perf_counter()
            model.forward_backward(micro, 0.001, _nullcontext, _nullcontext)
            wall = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if step:
                idle.append(1 - busy[0] / wall)
        shares = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(shares, torch.tensor(statistics.median(idle), dtype=torch.float64))
        result[m] = [float(x) for x in shares]
    if rank == 0:
        torch.save(result, out_file)
    dist.destroy_process_group()


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _time_into(obj, method: str, total: list) -> None:
    """Wrap obj.method so that its wall time adds into total[0]."""
    inner = getattr(obj, method)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t0

    setattr(obj, method, timed)


def measure_bubbles(steps: int, root: Path) -> dict:
    """schedule -> m -> measured bubble (pp2, 2 processes): the idle share of the busiest rank. The
    formula is the idle share of every stage of a balanced pipeline; with real stages not quite
    equal, the busiest one sets the step time and idles only for the schedule's bubble, the others
    also wait for it."""
    per_rank = {
        name: _spawn(_bubble_worker, 2, root, kind, v, steps) for name, (kind, v) in BUBBLE_SCHEDULES.items()
    }
    return {name: {m: min(shares) for m, shares in r.items()} for name, r in per_rank.items()}


def main(argv: list[str] | None = None) -> list:
    from common import Result

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    # Ray Train's 2 workers vary more step to step (each a single thread that waits for the other):
    # over 5 steps the median of one run read 0.69x where 12 read 0.93x
    p.add_argument("--ray-steps", type=int, default=12)
    args = p.parse_args(argv if argv is not None else [])
    from moray.model import Transformer, preset
    from moray.model.accounting import account
    from moray.platform.parallel import ParallelLayout

    home = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    os.environ["MORAY_HOME"] = str(home)
    from tests.fixtures.packed_data import write_packed_dataset  # the repo root is on sys.path

    data = write_packed_dataset(
        home / "data",
        n_train=GLOBAL_BATCH * (max(args.steps, args.ray_steps) + RAY_WARMUP_STEPS + 1),
        n_val=4,
        seq_len=SEQ_LEN,
    )
    flops = account(preset("small", vocab_size=512), seq_len=SEQ_LEN).train_flops_per_token

    def mfu(tps: float) -> float:
        return tps * flops / PEAK

    layouts = {name: run_layout(name, args.steps, home) for name in LAYOUTS}
    bubbles = measure_bubbles(args.steps, home)
    plain = plain_pytorch(data, args.steps, threads=2)
    from common import gemm_gflops, no_native_bf16

    no_bf16 = no_native_bf16()
    per_step = precision_steps(args.steps, threads=2, bf16=not no_bf16)
    params = sum(p.numel() for p in Transformer(preset("small", vocab_size=512)).parameters())
    means = gradient_means(params, home)
    peaks = {"fp32": gemm_gflops(2048, 5) * 1e9}
    if not no_bf16:
        fp32_curve, bf16_curve = precision_curve()
        curve_gap = float(((bf16_curve - fp32_curve).abs() / fp32_curve).max())
        peaks["bf16"] = gemm_gflops(2048, 5, torch.bfloat16) * 1e9
    import ray

    # 4 logical CPUs on 2 cores: the worker takes 2 (its threads), Ray Data keeps 2 for reading.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray1 = ray_train(data, args.ray_steps, 1)
    ray2 = ray_train(data, args.ray_steps, 2)  # the config's default dp_mode: auto, replicate here
    ray.shutdown()

    tokens = GLOBAL_BATCH * SEQ_LEN
    default = ParallelLayout(precision="auto").precision
    print(f"\nsmall preset (vocab 512), seq {SEQ_LEN}, global batch {GLOBAL_BATCH}, {default} (the default), "
          f"{flops / 1e9:.2f} GFLOP/token (fwd+bwd), 2 cores")  # fmt: skip
    print(f"{'setup':<32}{'tokens/s':>10}{'of ' + default + ' GEMM peak':>20}")
    for name, tps in [("train_step without Ray", plain), ("Ray Train, 1 worker x 2 threads", ray1),
                      ("Ray Train, 2 workers x 1 thread", ray2)]:  # fmt: skip
        print(f"{name:<32}{tps:>10.0f}{100 * tps * flops / peaks[default]:>19.1f}%")
    print(f"Ray overhead (1 worker vs plain): {100 * (1 - ray1 / plain):.1f}%")
    print(f"2 replicas average {4 * params / 1e6:.0f} MB of gradients in "
          + ", ".join(f"{1e3 * s:.0f} ms ({t})" for t, s in means.items()) + "\n")  # fmt: skip
    print(f"{'precision (train_step)':<24}{'s/step':>8}{'tokens/s':>10}{'GEMM peak':>14}{'of peak':>9}")
    precision_tps = {}
    for name, seconds in per_step.items():
        precision_tps[name] = tokens / seconds
        peak = peaks[name.split()[0]]  # "bf16 autocast only" against the bf16 peak
        reached = precision_tps[name] * flops / peak
        print(
            f"{name:<24}{seconds:>8.2f}{precision_tps[name]:>10.0f}{peak / 1e9:>9.0f} GF/s{100 * reached:>8.1f}%"
        )
    if no_bf16:
        print(f"bf16: {no_bf16}")
    else:
        print("bf16 against fp32, small preset, 200 steps (20-step mean losses):")
        print("  fp32 " + " ".join(f"{v:.3f}" for v in fp32_curve.tolist()))
        print("  bf16 " + " ".join(f"{v:.3f}" for v in bf16_curve.tolist()))
    print()
    print(f"{'layout (ranks on 2 cores)':<26}{'tokens/s':>9}{'MFU':>7}{'a2a MB/step':>12}{'a2a ms':>8}"
          f"{'comm share':>11}{'params MB/rank':>15}{'optim MB/rank':>14}")  # fmt: skip
    tps = {}
    for name, r in layouts.items():
        tps[name] = tokens / r["step_s"]
        print(f"{name:<26}{tps[name]:>9.0f}{100 * mfu(tps[name]):>6.1f}%{r['a2a_bytes'] / 1e6:>12.2f}"
              f"{1e3 * r['a2a_s']:>8.1f}{100 * r['comm_share']:>10.0f}%{r['param_bytes'] / 1e6:>15.1f}"
              f"{r['optim_bytes'] / 1e6:>14.1f}")  # fmt: skip
    print(
        f"\npipeline bubble, pp2 (one core per stage), small preset with 4 MoE layers, micro-batches of 1 x {BUBBLE_SEQ}:"
        " the busiest rank's idle share of the step"
    )
    print(
        f"{'schedule':<18}" + "".join(f"{f'm={m} measured':>14}{'formula':>9}" for m in BUBBLE_MICRO_BATCHES)
    )
    for name, per_m in bubbles.items():
        v = BUBBLE_SCHEDULES[name][1]
        print(f"{name:<18}" + "".join(f"{100 * per_m[m]:>13.1f}%{100 * bubble_formula(2, m, v):>8.1f}%"
                                      for m in BUBBLE_MICRO_BATCHES))  # fmt: skip
    one, dp2, ep2 = tps["1 process"], tps["dp2 shard"], tps["ep2"]
    speed_name, curve_name = (
        "pretrain: bf16 vs fp32 train_step",
        "pretrain: bf16 loss curve vs fp32 (small, 200 steps), 1 - gap",
    )
    if no_bf16:
        precision = [Result.skipped(speed_name, 2.0, no_bf16), Result.skipped(curve_name, 0.99, no_bf16)]
    else:
        precision = [
            Result(
                speed_name,
                precision_tps["bf16"] / precision_tps["fp32"],
                2.0,
                f"{precision_tps['bf16']:.0f} vs {precision_tps['fp32']:.0f} tok/s; GEMM peaks "
                f"{peaks['bf16'] / 1e9:.0f} vs {peaks['fp32'] / 1e9:.0f} GF/s",
            ),
            Result(
                curve_name,
                1 - curve_gap,
                0.99,
                f"largest gap {100 * curve_gap:.2f}% over 20-step means; fp32 {fp32_curve[0]:.2f} -> {fp32_curve[-1]:.2f}",
            ),
        ]
    return [
        Result(
            "pretrain: Ray Train 1 worker vs train_step without Ray",
            ray1 / plain,
            None,
            f"{ray1:.0f} vs {plain:.0f} tok/s",
        ),
        *precision,
        Result(
            "pretrain: 2 replicas' gradient mean, gloo all-reduce / shared memory",
            means["all-reduce"] / means["shared memory"],
            None,
            f"{1e3 * means['shared memory']:.0f} vs {1e3 * means['all-reduce']:.0f} ms for {4 * params / 1e6:.0f} MB",
        ),
        Result(
            "pretrain: Ray Train 2 workers vs 1 (same 2 cores)",
            ray2 / ray1,
            0.7,
            f"{ray2:.0f} vs {ray1:.0f} tok/s",
        ),
        Result(
            "pretrain: dp2 replicate vs 1 process",
            tps["dp2 replicate"] / one,
            0.7,
            f"{tps['dp2 replicate']:.0f} vs {one:.0f} tok/s",
        ),
        Result("pretrain: dp2 shard vs 1 process", dp2 / one, None, f"{dp2:.0f} vs {one:.0f} tok/s"),
        Result("pretrain: ep2 vs dp2", ep2 / dp2, 2.0, f"{ep2:.0f} vs {dp2:.0f} tok/s"),
        Result("pretrain: ep2 vs 1 process", ep2 / one, 0.7, f"{ep2:.0f} vs {one:.0f} tok/s"),
        Result("pretrain: tp2 vs 1 process", tps["tp2"] / one, None, f"{tps['tp2']:.0f} tok/s"),
        Result(
            "pretrain: tp2 x ep2 (4 ranks) vs 1 process",
            tps["tp2 x ep2"] / one,
            None,
            f"{tps['tp2 x ep2']:.0f} tok/s",
        ),  # fmt: skip
        Result("pretrain: pp2 (1F1B) vs 1 process", tps["pp2"] / one, None, f"{tps['pp2']:.0f} tok/s"),
        # closeness to the formula: 1 at equality, below 0.75 when 25% or more apart (either side)
        Result(
            "pretrain: 1F1B bubble at m=8, measured vs formula",
            1 - abs(bubbles["1F1B"][8] / bubble_formula(2, 8) - 1),
            0.75,
            f"{100 * bubbles['1F1B'][8]:.1f}% vs {100 * bubble_formula(2, 8):.1f}%",
        ),
    ]


if __name__ == "__main__":
    main(sys.argv[1:])
