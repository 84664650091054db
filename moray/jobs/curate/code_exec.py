"""Code-execution labels: run each Python document of the code domain in the mix in the sandbox and record
whether it executes correctly, for pre-training's code-execution objective.

A document "runs" (label 1) when, as a program in `moray.platform.sandbox` (own process, no network,
time and memory limits), it exits 0 *and* its doctests pass: TheAlgorithms-style files carry their
tests as doctests, and a file whose `__main__` block only calls `doctest.testmod()` exits 0 whether
they pass or not, so the doctests run again after the program and a failure exits 1. Anything else
is 0: an exception, a failed doctest, a timeout, too much memory, reading stdin (it is /dev/null).

The programs run as Ray Data tasks over the code documents; each task drives `workers` sandboxed
children at a time. The stage writes `<out>/code_exec/labels.parquet` (uid, status, label) and
reports the counts by status; `pack` puts each label on the document's closing EOS.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("uid", pa.string()), ("status", pa.string()), ("label", pa.int8())])
LABELS_FILE = "code_exec/labels.parquet"

# Run after the document: its doctests, whatever its own __main__ block did with them.
_DOCTESTS = """

import doctest as _moray_doctest, sys as _moray_sys
_moray_sys.exit(1 if _moray_doctest.testmod(_moray_sys.modules["__main__"]).failed else 0)
"""


@dataclass
class CodeExecConfig:
    enabled: bool = False
    timeout_s: float = 10.0  # per program, interpreter start-up included
    memory_mb: int = 1024
    workers: int = 2  # sandboxed programs at a time in each Ray task
    batch_size: int = 16  # documents per Ray task
    domains: list[str] = field(default_factory=lambda: ["code"])

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be positive")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb}: must be at least 64 (Python itself needs ~30)")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError(f"workers={self.workers}, batch_size={self.batch_size}: must be positive")


def program(source: str) -> str:
    """The document as a program that also fails when its doctests do."""
    return source + _DOCTESTS


def label_batch(batch, timeout_s: float, memory_mb: int, workers: int):
    """map_batches body: (uid, text) -> (uid, status, label) through the sandbox."""
    from moray.platform.sandbox import SandboxLimits, run_programs

    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    results = run_programs([program(t) for t in batch["text"]], limits, workers=workers)
    return {
        "uid": list(batch["uid"]),
        "status": [r.status for r in results],
        "label": [int(r.status == "passed") for r in results],
    }


def stage(ds, cfg: CodeExecConfig, out_dir: Path) -> tuple[dict, list[Path]]:
    """Label the kept documents of cfg.domains. Returns (counts, [the labels file])."""
    d = Path(out_dir) / "code_exec"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    domains = set(cfg.domains)
    in_mix = lambda r: r["outcome"] == "kept" and r["copies"] > 0 and r["domain"] in domains  # noqa: E731
    code = ds.filter(in_mix).select_columns(["uid", "text"])
    labelled = code.map_batches(
        label_batch,
        fn_kwargs={"timeout_s": cfg.timeout_s, "memory_mb": cfg.memory_mb, "workers": cfg.workers},
        batch_size=cfg.batch_size,
        batch_format="pandas",
        num_cpus=1,
    )
    rows = {"uid": [], "status": [], "label": []}
    for b in labelled.iter_batches(batch_format="numpy", batch_size=1024):
        for k in rows:
            rows[k] += b[k].tolist()
    order = sorted(range(len(rows["uid"])), key=rows["uid"].__getitem__)  # deterministic file
    table = pa.table({k: [v[i] for i in order] for k, v in rows.items()}, schema=SCHEMA)
    path = Path(out_dir) / LABELS_FILE
    pq.write_table(table, path)
    statuses = {s: rows["status"].count(s) for s in sorted(set(rows["status"]))}
    return {"programs": len(order), "ran": sum(rows["label"]), "by_status": statuses}, [path]


def read_labels(out_dir: Path) -> dict[str, int]:
    """uid -> label from the stage's file (empty when the stage did not run)."""
    path = Path(out_dir) / LABELS_FILE
    if not path.exists():
        return {}
    t = pq.read_table(path, columns=["uid", "label"])
    return dict(zip(t["uid"].to_pylist(), t["label"].to_pylist()))
