"""Rank 0's metrics: MLflow (every step) and metrics.jsonl in run storage, which survives restarts
and feeds the end-of-run plots; `read_metrics` reads them back."""

from __future__ import annotations

import json
import posixpath
import time
from pathlib import Path

from moray.platform.storage import Storage

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """metrics.jsonl is written whole at each checkpoint (object stores cannot append); MLflow gets
    every step as it happens. Other ranks hold nothing."""

    def __init__(self, rank: int, tracking_uri: str, run_id: str | None, storage: Storage, run_dir: str):
        self.rank, self.run_id = rank, run_id
        self.storage, self.path = storage, posixpath.join(run_dir, METRICS_FILE)
        self.lines = (
            storage.read_bytes(self.path).decode().splitlines()
            if rank == 0 and storage.exists(self.path)
            else []
        )
        self.mlflow = None
        if rank == 0 and run_id:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            self.mlflow = mlflow
            self.client = mlflow.MlflowClient()

    def step(self, step: int, metrics: dict, loads: dict) -> None:
        if self.rank != 0:
            return
        self.lines.append(json.dumps({"step": step, **metrics, "loads": loads}))
        if self.mlflow is not None:
            ms = [self.mlflow.entities.Metric(k.replace("/", "."), float(v), int(time.time() * 1000), step)
                  for k, v in metrics.items()]  # fmt: skip
            self.client.log_batch(self.run_id, metrics=ms)

    def flush(self) -> None:
        """Persist the rows so far: at each checkpoint and at the end. Rows after the last checkpoint
        need not survive a crash, since those steps are trained (and logged) again on resume."""
        if self.rank == 0:
            self.storage.write_bytes(self.path, ("\n".join(self.lines) + "\n").encode())


def read_metrics(run_dir: str | Path, storage: Storage | None = None) -> list[dict]:
    """Per-step metrics of a run, the latest attempt of each step winning (after a restart the
    steps since the last checkpoint are trained again)."""
    if storage is None:  # run_dir is itself a local path or URI
        storage = Storage(str(run_dir))
        run_dir = storage.root
    path = posixpath.join(str(run_dir), METRICS_FILE)
    if not storage.exists(path):
        return []
    by_step: dict[int, dict] = {}
    for line in storage.read_bytes(path).decode().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
