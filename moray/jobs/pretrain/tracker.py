"""Rank 0's metrics: MLflow (every step), metrics.jsonl in run storage, which survives restarts
and feeds the end-of-run plots (`read_metrics` reads them back), and Prometheus through
`ray.util.metrics` (`TrainGauges`: what dashboards/moray-training.json charts)."""

from __future__ import annotations

import json
import posixpath
import time
from pathlib import Path

from moray.platform.metrics import LazyGauges
from moray.platform.storage import Storage

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """metrics.jsonl is written whole at each checkpoint (object stores cannot append); MLflow gets
    every step as it happens. Other ranks hold nothing."""

    def __init__(self, rank: int, tracking_uri: str, run_id: str | None, storage: Storage, run_dir: str,
                 run_name: str = "") -> None:  # fmt: skip
        self.rank, self.run_id = rank, run_id
        self.storage, self.path = storage, posixpath.join(run_dir, METRICS_FILE)
        self.lines = (
            storage.read_bytes(self.path).decode().splitlines()
            if rank == 0 and storage.exists(self.path)
            else []
        )
        self.mlflow = None
        self.gauges = TrainGauges(run_name) if rank == 0 else None
        if rank == 0 and run_id:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            self.mlflow = mlflow
            self.client = mlflow.MlflowClient()

    def step(self, step: int, metrics: dict, loads: dict) -> None:
        if self.rank != 0:
            return
        self.lines.append(json.dumps({"step": step, **metrics, "loads": loads}))
        self.gauges.step(step, metrics, loads)
        if self.mlflow is not None:
            ms = [self.mlflow.entities.Metric(k.replace("/", "."), float(v), int(time.time() * 1000), step)
                  for k, v in metrics.items()]  # fmt: skip
            self.client.log_batch(self.run_id, metrics=ms)

    def checkpoint(self, step: int, uri: str, loss: float, manifests: list[dict]) -> None:
        """Record a persisted checkpoint in the MLflow run: `checkpoints/<name>.json` (step, URI,
        loss, every rank's file checksums) and the `moray.checkpoint.*` tags of the newest, which
        `moray pretrain --resume-from` reads."""
        if self.mlflow is None:
            return
        name = posixpath.basename(uri)
        record = {"step": step, "uri": uri, "loss": loss, "world_size": len(manifests),
                  "files": {f"rank{m['rank']}": m["files"] for m in manifests}}  # fmt: skip
        self.client.log_dict(self.run_id, record, f"checkpoints/{name}.json")
        self.client.set_tag(self.run_id, "moray.checkpoint.latest", uri)
        self.client.set_tag(self.run_id, "moray.checkpoint.step", str(step))

    def flush(self) -> None:
        """Persist the rows so far: at each checkpoint and at the end. Rows after the last checkpoint
        need not survive a crash, since those steps are trained (and logged) again on resume."""
        if self.rank == 0:
            self.storage.write_bytes(self.path, ("\n".join(self.lines) + "\n").encode())


class TrainGauges:
    """The step's figures as Prometheus gauges, tagged with the run's name: losses, throughput, MFU,
    the step-time breakdown (`moray_train_step_seconds{phase}`), the capacity factor, the drop rate
    and each expert's share of its layer's tokens (`moray_train_expert_load{layer, expert}`, the
    heatmap). A no-op outside Ray."""

    SCALARS = {  # metric key -> (gauge name, description)
        "loss": ("moray_train_loss", "Training loss (LM + weighted balance losses) at the last step"),
        "lm_loss": ("moray_train_lm_loss", "Language-model loss at the last step"),
        "val_loss": ("moray_train_val_loss", "Validation loss at the last validation"),
        "tokens_per_s": ("moray_train_tokens_per_second", "Training tokens per second"),
        "mfu": ("moray_train_mfu", "Model FLOPs utilization"),
        "grad_norm": ("moray_train_grad_norm", "Gradient norm before clipping"),
        "lr": ("moray_train_learning_rate", "Learning rate"),
        "capacity_factor": ("moray_train_capacity_factor", "MoE capacity factor (the controller's)"),
        "drop_rate": ("moray_train_drop_rate", "Fraction of routed tokens dropped by capacity"),
    }
    PHASE_PREFIX = "time/"  # time/<phase>_s metrics: the step-time breakdown

    def __init__(self, run_name: str):
        self.tags = {"run": run_name}
        self._gauges = LazyGauges(self._build)

    @classmethod
    def _build(cls, rm) -> dict:
        g = {k: rm.Gauge(name, doc, tag_keys=("run",)) for k, (name, doc) in cls.SCALARS.items()}
        g["step"] = rm.Gauge("moray_train_step", "Optimizer steps done", tag_keys=("run",))
        g["phase"] = rm.Gauge("moray_train_step_seconds", "Step time by phase", tag_keys=("run", "phase"))
        g["load"] = rm.Gauge("moray_train_expert_load", "Share of a MoE layer's tokens per expert",
                             tag_keys=("run", "layer", "expert"))  # fmt: skip
        return g

    def step(self, step: int, metrics: dict, loads: dict) -> None:
        self._gauges.set("step", step + 1, self.tags)
        for key, value in metrics.items():
            if key in self.SCALARS:
                self._gauges.set(key, float(value), self.tags)
            elif key.startswith(self.PHASE_PREFIX):
                phase = key[len(self.PHASE_PREFIX) :].removesuffix("_s")
                self._gauges.set("phase", float(value), {**self.tags, "phase": phase})
        for layer, load in loads.items():
            total = sum(load) or 1
            for expert, n in enumerate(load):
                self._gauges.set("load", n / total, {**self.tags, "layer": str(layer), "expert": str(expert)})


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
