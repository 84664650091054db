"""Pre-training throughput on the GPUs of one machine, layout by layout.

    python benchmarks/bench_gpu_pretrain.py                      # every GPU, the `small` preset
    python benchmarks/bench_gpu_pretrain.py --preset deepseek-v2-lite --layers 4 --seq-len 4096
    python benchmarks/bench_gpu_pretrain.py --cpu                # the same code on 2 gloo processes

With N = torch.cuda.device_count() GPUs it runs, for each layout that fits N (`layouts_for`: one
GPU; dp N; dp N with the experts split over all N (ep N) when they divide; tp 2 x dp N/2; pp 2 x
dp N/2 under 1F1B; pp 2 x tp 2 x dp N/4 from 4 GPUs; and x ep N/4 from 8), a few steps of moray's
real training step (`parallelize`, `train_step`, `reduce_stats`, `moe_feedback`) on random
tokens: one process per GPU (torch.multiprocessing spawn, torch.cuda.set_device(rank)), NCCL, bf16
compute (ParallelLayout(device_type="cuda"): the layout's autocast, and FSDP2's
MixedPrecisionPolicy for dp > 1; master weights, gradient reduction and AdamW state in fp32).
The first --warmup steps are not timed. It prints per layout: tokens/s (the whole layout's, and per
GPU), MFU (moray.model.accounting's training FLOPs per token, attention included, against
--peak-tflops per GPU: 989 dense bf16 for the H100 and H200), the peak GPU memory of every rank
over the steps (torch.cuda.max_memory_allocated: parameters, gradients, optimizer state,
activations, buffers; not the whole model each pp rank builds before keeping its stages) and the
last step's loss (the mean over the micro-batches: about ln(vocab) on random tokens).

A layout that uses fewer GPUs than N runs on the first ones. Each data-parallel rank gets its own
tokens (its tp and pp peers the same ones): a step is dp x --micro-batches x --micro-batch-size
sequences of --seq-len tokens.

The process group is "cpu:gloo,cuda:nccl": NCCL for the GPU tensors, and gloo for the few CPU
tensors moray's pipeline code all-reduces over the pipeline group (the global gradient norm in
moray/jobs/pretrain/optim.py `total_norm`, the step statistics in
moray/platform/pipeline_parallel.py `_pipeline_stats`), which NCCL alone would refuse.

With no GPU it says so and exits 0. --cpu runs the same code on gloo in fp32 (2 processes, the
tiny preset, 2 steps by default) so that it is exercised where there is no GPU
(tests/platform/test_bench_gpu_script.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
DEFAULTS = {  # GPU / --cpu
    "preset": ("small", "tiny"),
    "seq_len": (2048, 32),
    "micro_batch_size": (4, 2),
    "micro_batches": (4, 2),
    "steps": (10, 2),
    "warmup": (3, 1),
    "peak_tflops": (989.0, 0.07),  # dense bf16 H100/H200; fp32 GEMM on one of this machine's cores
}


# ---- arguments ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_gpu_pretrain", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--cpu", action="store_true", help="gloo and fp32 on 2 processes (no GPU needed)")
    p.add_argument("--preset", help="model preset (default small; tiny with --cpu)")
    p.add_argument("--layers", type=int, help="num_hidden_layers (default: the preset's)")
    p.add_argument("--hidden", type=int, help="hidden_size (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; 32 with --cpu)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch per dp rank (default 4)")
    p.add_argument("--micro-batches", type=int, help="micro-batches per dp rank per step (default 4, >= 2)")
    p.add_argument("--steps", type=int, help="steps per layout, warm-up included (default 10; 2 with --cpu)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default 3; 1 with --cpu)")
    p.add_argument("--peak-tflops", type=float, help="peak per device for MFU (default 989: H100/H200 bf16)")
    p.add_argument("--gpus", type=int, help="use the first GPUS devices (default: all)")
    p.add_argument("--only", help="comma-separated layout names to run (default: every one that fits)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait (default 300)")
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the defaults of the mode (GPU or --cpu) filled in; SystemExit on a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if args.cpu else gpu)
    if args.micro_batches < 2:
        parser.error("--micro-batches must be at least 2 (1F1B with pp 2 needs 2 per step)")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    for name in ("seq_len", "micro_batch_size", "steps", "layers", "hidden", "gpus"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} {v}: must be a positive integer")
    return args


def model_config(args: argparse.Namespace):
    from moray.model import preset

    overrides = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.hidden is not None:
        overrides["hidden_size"] = args.hidden
    return preset(args.preset, **overrides)


# ---- layouts -----------------------------------------------------------------------------------
def layout_name(degrees: dict) -> str:
    parts = [f"{k}{degrees[k]}" for k in ("pp", "tp", "dp", "ep") if degrees.get(k, 1) > 1]
    return "-".join(parts) or "single"


def layouts_for(n: int, n_experts: int, n_layers: int = 2) -> dict[str, dict]:
    """The layouts to run on n devices, by name: the ParallelLayout degrees of each (world = pp x
    tp x dp, at most n; ep borrowed from dp and dividing the experts; pp at most the layers)."""
    candidates = [{}]
    if n >= 2:
        candidates += [{"dp": n}, {"dp": n, "ep": n}, {"tp": 2, "dp": n // 2}, {"pp": 2, "dp": n // 2}]
    if n >= 4:
        candidates.append({"pp": 2, "tp": 2, "dp": n // 4})
    if n >= 8:
        candidates.append({"pp": 2, "tp": 2, "dp": n // 4, "ep": n // 4})
    out: dict[str, dict] = {}
    for d in candidates:
        d = {k: v for k, v in d.items() if v > 1}
        world = d.get("pp", 1) * d.get("tp", 1) * d.get("dp", 1)
        ep = d.get("ep", 1)
        if world > n or d.get("pp", 1) > n_layers or n_experts % ep or d.get("dp", 1) % ep:
            continue
        out.setdefault(layout_name(d), d)
    return out


def world_of(degrees: dict) -> int:
    return degrees.get("pp", 1) * degrees.get("tp", 1) * degrees.get("dp", 1)


# ---- one layout, in spawned processes ----------------------------------------------------------
def _worker(
    rank: int, world: int, degrees: dict, args: argparse.Namespace, device_type: str, out: str
) -> None:
    import torch.distributed as dist

    from moray.jobs.pretrain.optim import build_optimizer
    from moray.jobs.pretrain.parallel import parallelize
    from moray.jobs.pretrain.step import ClipSettings, moe_feedback, reduce_stats, train_step
    from moray.model import Transformer
    from moray.platform.parallel import ParallelLayout
    from moray.platform.pipeline_parallel import PipelineOptions, pipeline_group

    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    layout = ParallelLayout(**degrees, device_type=device_type)
    if world > 1:
        from datetime import timedelta

        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method=f"file://{out}/init",
                                rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout),
                                device_id=device if cuda else None)  # fmt: skip
    try:
        mesh = layout.build_mesh()
        torch.manual_seed(0)
        config = layout.configure_model(model_config(args))
        m, mbs, seq = args.micro_batches, args.micro_batch_size, args.seq_len
        pipeline = PipelineOptions("1f1b", 1, m, seq) if layout.pp > 1 else None
        model = parallelize(Transformer(config).to(device), layout, mesh, pipeline, device)
        opt = build_optimizer(model, "adamw", 3e-4, 0.1, pipeline_group=pipeline_group(model))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        dp_group = mesh["dp"].get_group() if mesh is not None else None  # not None: the world's
        # this dp rank's tokens (its tp and pp peers draw the same), every step's, before the clock starts
        g = torch.Generator().manual_seed(1000 + dp_rank)
        batches = []
        for _ in range(args.steps):
            seqs = torch.randint(3, config.vocab_size, (m * mbs, seq + 1), generator=g).to(device)
            batches.append(
                [(seqs[i * mbs : (i + 1) * mbs, :-1], seqs[i * mbs : (i + 1) * mbs, 1:]) for i in range(m)]
            )
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, loss = [], float("nan")
        for micro in batches:
            t0 = time.perf_counter()
            stats = train_step(model, opt, sched, micro, 0.001, ClipSettings(global_norm=1.0),
                               layout.autocast, layout.loss_parallel)  # fmt: skip
            reduced = reduce_stats(stats, layout.dp, dp_group, device)
            moe_feedback(model, reduced)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            loss = reduced.losses["lm_loss"]
        result = {"times": times, "loss": loss,
                  "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}  # fmt: skip
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_layout(degrees: dict, args: argparse.Namespace, device_type: str) -> dict:
    """One layout's figures: tokens/s, per-rank peak memory, loss; or {"error": ...}."""
    import torch.multiprocessing as mp

    world = world_of(degrees)
    out = tempfile.mkdtemp(prefix="bench_gpu_pretrain_")
    try:
        mp.start_processes(_worker, args=(world, degrees, args, device_type, out), nprocs=world,
                           start_method="spawn")  # fmt: skip
    except Exception as e:  # a rank failed (its traceback follows); the next layout still runs
        text = str(e).strip() or type(e).__name__
        print(text, file=sys.stderr, flush=True)
        return {"error": text.splitlines()[-1][:200]}
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    timed = slice(args.warmup, None)
    # a step ends when its slowest rank ends
    step_s = statistics.median(max(t) for t in zip(*(r["times"][timed] for r in ranks)))
    tokens = degrees.get("dp", 1) * args.micro_batches * args.micro_batch_size * args.seq_len
    return {"ranks": world, "step_s": step_s, "tokens_per_s": tokens / step_s, "loss": ranks[0]["loss"],
            "peak_bytes": [r["peak_bytes"] for r in ranks]}  # fmt: skip


# ---- the table ---------------------------------------------------------------------------------
def format_table(rows: dict[str, dict], flops_per_token: float, peak_tflops: float) -> str:
    """One line per layout: ranks (one per GPU), tokens/s (all, per rank), MFU, the last loss and the
    peak memory of each rank in GiB (global rank order: pp outermost, tp innermost)."""
    head = (
        f"{'layout':<18}{'ranks':>6}{'tokens/s':>12}{'per rank':>10}{'MFU':>8}{'loss':>8}  peak GiB per rank"
    )
    lines = [head]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"{name:<18}  ERROR: {r['error']}")
            continue
        per_rank = r["tokens_per_s"] / r["ranks"]
        mfu = per_rank * flops_per_token / (peak_tflops * 1e12)
        mem = " ".join("-" if b is None else f"{b / GIB:.2f}" for b in r["peak_bytes"])
        lines.append(f"{name:<18}{r['ranks']:>6}{r['tokens_per_s']:>12,.0f}{per_rank:>10,.0f}{100 * mfu:>7.1f}%"
                     f"{r['loss']:>8.3f}  {mem}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu:
        device_type, n, what = "cpu", 2, "2 gloo processes, fp32"
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            print("bench_gpu_pretrain: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                  "nothing to measure. --cpu runs the same code on 2 gloo processes.")  # fmt: skip
            return 0
        device_type, n = "cuda", torch.cuda.device_count()
        if args.gpus is not None:
            n = min(n, args.gpus)
        what = f"{n} x {torch.cuda.get_device_name(0)}, NCCL, bf16 compute"
    from moray.model.accounting import account

    config = model_config(args)
    flops = account(config, seq_len=args.seq_len).train_flops_per_token
    layouts = layouts_for(n, config.n_routed_experts, config.num_hidden_layers)
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in layouts]
        if unknown:
            print(
                f"bench_gpu_pretrain: --only {','.join(unknown)}: not among {', '.join(layouts)}",
                file=sys.stderr,
            )
            return 2
        layouts = {k: layouts[k] for k in wanted}
    print(f"{args.preset} preset ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.n_routed_experts} experts top-{config.num_experts_per_tok}), seq {args.seq_len}, "
          f"{args.micro_batches} micro-batches of {args.micro_batch_size} per dp rank, "
          f"{flops / 1e9:.3g} GFLOP/token (fwd+bwd); {what}; {args.steps} steps, {args.warmup} untimed",
          flush=True)  # fmt: skip
    rows = {}
    for name, degrees in layouts.items():
        t0 = time.perf_counter()
        try:
            rows[name] = run_layout(degrees, args, device_type)
        except Exception as e:  # noqa: BLE001 (report and go on to the next layout)
            traceback.print_exc()
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(format_table(rows, flops, args.peak_tflops))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "flops_per_token": flops, "layouts": rows}, indent=2)
        )
    return 1 if any("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
