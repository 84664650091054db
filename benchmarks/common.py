"""Shared helpers for the side-by-side benchmarks: timing, the CPU's GEMM rate, one result row.

Every benchmark runs both sides in one process on the same weights and inputs, warms up, and
reports the median of several repetitions: timings on a shared 2-core machine are noisy, and a
median shrugs off the odd slow repetition where a mean would not.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

THREADS = 2
NOMINAL_PEAK_GFLOPS = 140.0  # measured 1024x1024 fp32 GEMM on our 2-core AMD EPYC (DESIGN.md)


@dataclass
class Result:
    """One line of the summary table: what was compared, the ratio, and the target it must meet."""

    name: str
    ratio: float  # moray / reference (higher is better); nan where it was not run
    target: float | None  # None: for information, no target
    detail: str = ""

    @property
    def status(self) -> str:
        if math.isnan(self.ratio):  # Result.skipped
            return "skip"
        if self.target is None:
            return "info"
        return "PASS" if self.ratio >= self.target else "MISS"

    @classmethod
    def skipped(cls, name: str, target: float | None, why: str) -> Result:
        """A row this machine cannot measure, with the reason in its detail."""
        return cls(name, float("nan"), target, why)


def no_native_bf16() -> str | None:
    """Why bf16 sides are not run here (None where they are): without AMX or AVX-512 BF16 oneDNN
    emulates bf16 products, 100x slower than fp32 (a 1024^3 GEMM at 0.9 against 160 GFLOP/s on an
    AVX2 EPYC), so a ratio would measure the emulation, and training's `auto` precision is fp32."""
    from moray.platform.parallel import cpu_bf16_isa

    if cpu_bf16_isa():
        return None
    return "not run: this CPU has no AMX or AVX-512 BF16 (bf16 would be emulated; auto precision is fp32)"


def random_hf_model(preset_name: str = "small", seed: int = 0):
    """A transformers DeepseekV2ForCausalLM with a moray preset's shapes and random weights."""
    import transformers

    from moray.model import PRESETS

    torch.manual_seed(seed)
    config = transformers.DeepseekV2Config(**PRESETS[preset_name], tie_word_embeddings=False)
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits some weights; randomize all, peaky enough for stable argmaxes
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model


def setup(seed: int = 0) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `reps` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_times(fns: dict[str, Callable[[], object]], reps: dict[str, int] | int, warmup: int = 1) -> dict:
    """Median seconds of each fn, timed in interleaved rounds (a, b, c, a, b, c, ...) so that a
    burst of load from elsewhere on the machine hits every side alike rather than one of them."""
    reps = reps if isinstance(reps, dict) else dict.fromkeys(fns, reps)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(max(reps.values())):
        for name, fn in fns.items():
            if i < reps[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_gbs(mib: int = 1024, reps: int = 5) -> float:
    """GB/s this process's threads read from memory: the sum of an fp32 tensor too large for cache."""
    x = torch.ones(mib << 18)
    seconds = median_time(lambda: x.sum(), reps=reps, warmup=1)
    return x.nbytes / seconds / 1e9


def gemm_gflops(n: int = 1024, reps: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of one n x n x n matmul in `dtype` on this process's threads: the practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = median_time(lambda: a @ b, reps=reps, warmup=3)
    return 2 * n**3 / seconds / 1e9
