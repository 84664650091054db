"""benchmarks/bench_gpu_pretrain.py without a GPU: its layouts for 1, 2, 4 and 8 GPUs, its
arguments and table, its exit on a machine without CUDA, and its training path on 2 gloo
processes (--cpu: the code the GPUs run, in fp32)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_gpu_pretrain.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*argv: str, timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})  # fmt: skip


def test_layouts_for_each_gpu_count(bench):
    names = {n: list(bench.layouts_for(n, n_experts=64, n_layers=4)) for n in (1, 2, 4, 8)}
    assert names == {
        1: ["single"],
        2: ["single", "dp2", "dp2-ep2", "tp2", "pp2"],
        4: ["single", "dp4", "dp4-ep4", "tp2-dp2", "pp2-dp2", "pp2-tp2"],
        8: ["single", "dp8", "dp8-ep8", "tp2-dp4", "pp2-dp4", "pp2-tp2-dp2", "pp2-tp2-dp2-ep2"],
    }
    eight = bench.layouts_for(8, 64, 4)
    assert eight["pp2-tp2-dp2-ep2"] == {"pp": 2, "tp": 2, "dp": 2, "ep": 2}
    assert all(bench.world_of(d) == 8 for name, d in eight.items() if name != "single")
    # experts that do not split over the ranks, a model too shallow for two stages
    assert list(bench.layouts_for(4, n_experts=6, n_layers=1)) == ["single", "dp4", "tp2-dp2"]
    assert (
        "dp3-ep3" not in bench.layouts_for(3, 64, 4)
        and bench.world_of(bench.layouts_for(3, 64, 4)["pp2"]) == 2
    )


def test_arguments(bench):
    gpu, cpu = bench.parse_args([]), bench.parse_args(["--cpu"])
    assert (gpu.preset, gpu.steps, gpu.warmup, gpu.seq_len, gpu.peak_tflops) == ("small", 10, 3, 2048, 989.0)
    assert (cpu.preset, cpu.steps, cpu.micro_batches) == ("tiny", 2, 2)
    big = bench.parse_args(["--preset", "deepseek-v2-lite", "--layers", "4", "--hidden", "1024"])
    config = bench.model_config(big)
    assert (config.num_hidden_layers, config.hidden_size, config.n_routed_experts) == (4, 1024, 64)
    for bad in (
        ["--micro-batches", "1"],
        ["--steps", "3", "--warmup", "3"],
        ["--step", "3"],
        ["--layers", "0"],
    ):
        with pytest.raises(SystemExit):  # "--step": no abbreviations
            bench.parse_args(bad)


def test_table(bench):
    rows = {
        "single": {"ranks": 1, "tokens_per_s": 100_000.0, "loss": 10.4, "peak_bytes": [3 * 2**30]},
        "pp2": {"ranks": 2, "tokens_per_s": 150_000.0, "loss": 10.4, "peak_bytes": [2**30, 2**29]},
        "tp2": {"error": "RuntimeError: NCCL error"},
    }
    text = bench.format_table(rows, flops_per_token=1e9, peak_tflops=1000.0).splitlines()
    assert text[0].split()[:6] == ["layout", "ranks", "tokens/s", "per", "rank", "MFU"]
    assert text[1].split() == ["single", "1", "100,000", "100,000", "10.0%", "10.400", "3.00"]
    assert text[2].split() == ["pp2", "2", "150,000", "75,000", "7.5%", "10.400", "1.00", "0.50"]
    assert text[3].split() == ["tp2", "ERROR:", "RuntimeError:", "NCCL", "error"]


def test_exits_0_saying_there_is_no_gpu():
    done = _run(timeout=120, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU on this machine" in done.stdout and "--cpu" in done.stdout


def test_cpu_mode_trains_each_layout(tmp_path):
    """The GPU code path on 2 gloo processes: the pipeline (1F1B) and dp2 x ep2 (FSDP2, all-to-all)."""
    out = tmp_path / "bench.json"
    done = _run("--cpu", "--only", "pp2,dp2-ep2", "--json", str(out), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pp2" in done.stdout and "dp2-ep2" in done.stdout and "ERROR" not in done.stdout
    rows = json.loads(out.read_text())["layouts"]
    assert list(rows) == ["pp2", "dp2-ep2"]
    for r in rows.values():
        assert r["ranks"] == 2 and r["tokens_per_s"] > 0 and r["peak_bytes"] == [None, None]
        assert abs(r["loss"] - math.log(512)) < 0.5  # random tokens: about ln(vocab)
