"""Run every side-by-side benchmark and print one table: each ratio and PASS/MISS against its target.

`make bench` runs this. Each benchmark prints its own details first; a benchmark that fails
(a correctness check, an exception) shows as ERROR and the others still run; a row this machine
cannot measure (bf16 on a CPU without native bf16) shows as skip, with the reason. Exit status 1 if
anything missed or failed.
"""

from __future__ import annotations

import sys
import time
import traceback

import bench_curate
import bench_decode
import bench_eval
import bench_expert_dispatch
import bench_kv_cache
import bench_moe
import bench_pretrain
import bench_serve
import bench_sparse_attention
from common import Result

BENCHMARKS = {
    "moe": bench_moe,
    "decode": bench_decode,
    "kv_cache": bench_kv_cache,
    "curate": bench_curate,
    "pretrain": bench_pretrain,
    "serve": bench_serve,
    "eval": bench_eval,
    "expert_dispatch": bench_expert_dispatch,
    "sparse_attention": bench_sparse_attention,
}


def main() -> int:
    rows: list[tuple[str, Result | None, float]] = []
    for name, module in BENCHMARKS.items():
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results = module.main()
        except Exception:
            traceback.print_exc()
            results = [None]
        rows += [(name, r, time.perf_counter() - t0) for r in results]

    print("\n== summary (ratio = moray / reference, higher is better)")
    print(f"{'benchmark':52s} {'ratio':>8s} {'target':>7s}  {'status':6s}  detail")
    ok = True
    for name, r, seconds in rows:
        if r is None:
            print(f"{name:52s} {'-':>8s} {'-':>7s}  ERROR   see the traceback above ({seconds:.0f} s)")
            ok = False
            continue
        target = "-" if r.target is None else f"{r.target:g}x"
        ratio = "-" if r.status == "skip" else f"{r.ratio:.2f}x"
        print(f"{r.name:52s} {ratio:>8s} {target:>7s}  {r.status:6s}  {r.detail}")
        ok &= r.status != "MISS"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
