"""The pre-training job's configuration, validated in full before any cluster work.

A YAML file (configs/pretrain/*.yaml) plus dotted overrides becomes a `PretrainConfig`;
`validate()` then checks everything that can be checked without a cluster: the layout against
the world size and the model, the dataset and tokenizer on disk, the values' ranges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moray.model import ModelConfig, preset
from moray.platform.config import ConfigError


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields

    def build(self, vocab_size: int | None = None) -> ModelConfig:
        overrides = dict(self.overrides)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        try:
            return preset(self.preset, **overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class DataSection:
    path: str = ".moray/curated"  # a curation output directory (manifest.json, train/, val/, tokenizer.json)
    # Sequences per optimizer step, fixed for the run whatever the world size (so an elastic or
    # restarted run sees the same batches); each rank takes global / dp of them, in micro-batches
    # of micro_batch_size, accumulating gradients.
    global_batch_size: int = 8
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.global_batch_size <= 0:
            raise ConfigError(f"global_batch_size={self.global_batch_size}: must be positive")
        if self.micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size}: must be positive")


@dataclass
class TrainSection:
    max_steps: int = 40
    seed: int = 0
    deterministic: bool = True  # deterministic algorithms: equal losses after a restart
    optimizer: str = "adamw"  # adamw | lamb_adam
    lr: float = 3e-3
    weight_decay: float = 0.1
    adaptive_weight_decay: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 5
    warmup_oscillation: float = 0.0
    min_lr_ratio: float = 0.1
    clip_global: float | None = 1.0
    clip_per_layer: float | None = None
    clip_per_expert: float | None = None
    aux_loss_weight: float = 1.0  # lambda on the model's weighted balance losses
    capacity_factor: float | None = 1.25  # initial; None: dropless
    capacity_target_drop_rate: float = 0.01
    capacity_bounds: list[float] = field(default_factory=lambda: [1.0, 4.0])
    router_bias_update: bool = True  # aux-loss-free bias (sigmoid routers only)
    val_every: int = 10
    val_batches: int = 2
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    log_every: int = 1
    peak_flops_per_worker: float = 140e9  # declared hardware peak for MFU (fp32 GEMM on 2 CPU cores)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        need(self.max_steps > 0, "max_steps", "must be positive")
        need(self.optimizer in ("adamw", "lamb_adam"), "optimizer", "use 'adamw' or 'lamb_adam'")
        need(self.lr > 0, "lr", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)")
        need(self.schedule in ("cosine", "wsd", "constant"), "schedule", "use 'cosine', 'wsd' or 'constant'")
        need(0 <= self.warmup_steps <= self.max_steps, "warmup_steps", "must be in [0, max_steps]")
        need(0 <= self.warmup_oscillation < 1, "warmup_oscillation", "must be in [0, 1)")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        for name in ("clip_global", "clip_per_layer", "clip_per_expert", "capacity_factor"):
            v = getattr(self, name)
            need(v is None or v > 0, name, "must be positive or null")
        need(self.aux_loss_weight >= 0, "aux_loss_weight", "must be >= 0")
        lo_hi = self.capacity_bounds
        need(
            len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], "capacity_bounds", "[min, max] with 0 < min <= max"
        )
        if self.capacity_factor is not None:
            need(lo_hi[0] <= self.capacity_factor <= lo_hi[1], "capacity_factor", f"must lie in {lo_hi}")
        for name in ("val_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            need(getattr(self, name) > 0, name, "must be positive")
        need(self.val_batches >= 0, "val_batches", "must be >= 0")
        need(self.peak_flops_per_worker > 0, "peak_flops_per_worker", "must be positive")


@dataclass
class ScalingSection:
    num_workers: int | list[int] = 2  # N, or [min, max] for an elastic run
    cpus_per_worker: float = 0.5  # fractional: Ray Data must keep CPUs for reading (DESIGN.md)
    use_gpu: bool = False
    max_failures: int = 2

    def __post_init__(self) -> None:
        w = self.num_workers
        if isinstance(w, list):
            if len(w) != 2 or not all(isinstance(x, int) for x in w) or not 1 <= w[0] <= w[1]:
                raise ConfigError(f"num_workers={w!r}: an elastic range is [min, max] with 1 <= min <= max")
        elif not isinstance(w, int) or w < 1:
            raise ConfigError(f"num_workers={w!r}: must be a positive integer or [min, max]")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker}: must be positive")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures={self.max_failures}: must be >= -1 (-1: unlimited)")

    @property
    def worker_range(self) -> tuple[int, int]:
        w = self.num_workers
        return (w[0], w[1]) if isinstance(w, list) else (w, w)


@dataclass
class ParallelSection:
    """Sizes of the device-mesh dimensions. Data parallelism fills whatever the others leave:
    dp = world_size / (tp * pp * ep). Only dp (FSDP2) is implemented yet."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
            if v != 1:
                raise ConfigError(f"{name}={v}: only data parallelism (tp=pp=ep=1) is implemented so far")


@dataclass
class RunSection:
    name: str = "pretrain"
    experiment: str = "moray-pretrain"
    storage_path: str | None = None  # Ray Train storage (any pyarrow URI); default: <MORAY_HOME>/runs
    register_model: str | None = "moray-tiny"  # MLflow registered model name; null: don't register


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)


def read_manifest(data_path: str) -> dict:
    path = Path(data_path)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"data.path={data_path!r}: no manifest.json (run `moray curate` first?)")
    m = json.loads(manifest.read_text())
    for key in ("seq_len", "vocab_size"):
        if key not in m:
            raise ConfigError(f"data.path={data_path!r}: manifest.json lacks {key!r}")
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"data.path={data_path!r}: no tokenizer.json")
    for split in ("train", "val"):
        if not list((path / split).glob("*.parquet")):
            raise ConfigError(f"data.path={data_path!r}: no {split}/*.parquet shards")
    return m


def validate(cfg: PretrainConfig) -> tuple[ModelConfig, dict]:
    """Everything checkable before the cluster: returns the model config and the data manifest."""
    manifest = read_manifest(cfg.data.path)
    model_config = cfg.model.build(vocab_size=manifest["vocab_size"])
    if model_config.vocab_size < manifest["vocab_size"]:
        raise ConfigError(
            f"model.overrides.vocab_size={model_config.vocab_size}: smaller than the tokenizer's "
            f"{manifest['vocab_size']}"
        )
    if manifest["seq_len"] > model_config.max_position_embeddings:
        raise ConfigError(
            f"data: seq_len {manifest['seq_len']} exceeds model max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    lo, hi = cfg.scaling.worker_range
    per_replica = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.ep
    for world in (lo, hi):
        if world % per_replica:
            raise ConfigError(f"scaling.num_workers={world}: not divisible by tp*pp*ep={per_replica}")
    if cfg.parallel.ep > 1 and model_config.n_routed_experts % cfg.parallel.ep:
        raise ConfigError(f"parallel.ep={cfg.parallel.ep}: must divide n_routed_experts")
    g, micro = cfg.data.global_batch_size, cfg.data.micro_batch_size
    for world in range(lo, hi + 1):
        dp = world // per_replica
        # each rank takes g / dp sequences, in micro-batches of micro (or fewer, if that is all it has)
        if world % per_replica == 0 and (g % dp or (g // dp) % min(micro, g // dp)):
            raise ConfigError(
                f"data.global_batch_size={g}: must split into {dp} data-parallel ranks x micro-batches "
                f"of {micro} (world size {world} is in scaling.num_workers)"
            )
    manifest["train_sequences"] = count_rows(cfg.data.path, "train")
    manifest["val_sequences"] = count_rows(cfg.data.path, "val")
    if manifest["train_sequences"] < g:
        raise ConfigError(
            f"data.global_batch_size={g}: more than the {manifest['train_sequences']} training sequences"
        )
    return model_config, manifest


def count_rows(data_path: str, split: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in sorted((Path(data_path) / split).glob("*.parquet")))
