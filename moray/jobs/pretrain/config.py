"""The pre-training job's configuration, validated in full before any cluster work.

A YAML file (configs/pretrain/*.yaml) plus dotted overrides becomes a `PretrainConfig`;
`validate()` then checks everything that can be checked without a cluster: the layout against
the world size and the model, the dataset and tokenizer on disk, the values' ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moray.jobs.pretrain.objectives import ObjectivesSection
from moray.model import ModelConfig
from moray.model.accounting import account
from moray.platform.config import ConfigError, ModelSpec
from moray.platform.data_contract import ContractError, Manifest, count_rows, read_manifest
from moray.platform.parallel import DP_MODES, PRECISIONS, ParallelLayout, resolve_dp_mode
from moray.platform.pipeline_parallel import SCHEDULES, check_pipeline

# Model fields that have one home elsewhere: the parallel layout, the train section.
SET_ELSEWHERE = {
    "capacity_factor": "train.capacity_factor",
    "ep_size": "parallel.ep",
    "aux_heads": "objectives.<name>.enabled",
    "span_boundary_max_len": "objectives.span_boundary.max_span",
}


def build_model_config(
    spec: ModelSpec,
    manifest: Manifest,
    capacity_factor: float | None,
    objectives: ObjectivesSection | None = None,
) -> ModelConfig:
    """The preset with the overrides, the tokenizer's vocabulary size and special-token ids from
    the manifest (an override that disagrees is refused, naming both values), the initial
    capacity factor from the train section, and the heads of the enabled auxiliary objectives."""
    for name, home in SET_ELSEWHERE.items():
        if name in spec.overrides:
            raise ConfigError(f"model.overrides.{name}: set it as {home} (one place for each setting)")
    contract = {"vocab_size": manifest.vocab_size, **manifest.special_tokens.model_fields()}
    for name, want in contract.items():
        got = spec.overrides.get(name, want)
        if got != want:
            raise ConfigError(
                f"model.overrides.{name}={got!r} conflicts with the curated data's {name}={want} "
                "(manifest.json and tokenizer.json); drop the override"
            )
    objectives = objectives or ObjectivesSection()
    heads = dict(aux_heads=objectives.enabled, span_boundary_max_len=objectives.span_boundary.max_span)
    return spec.build(**contract, capacity_factor=capacity_factor, **heads)


@dataclass
class DataSection:
    path: str = ".moray/curated"  # a curation output directory (manifest.json, train/, val/, tokenizer.json)
    # Sequences per optimizer step, fixed for the run whatever the world size (so an elastic or
    # restarted run sees the same batches); each rank takes global / dp of them, in micro-batches
    # of micro_batch_size, accumulating gradients.
    global_batch_size: int = 8
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        self.path = str(self.path)
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
    # fp32 | bf16 | auto. bf16: matmuls in bf16, with fp32 master weights, optimizer state, router
    # and loss. auto (the default): bf16 on GPUs and on CPUs with AMX or AVX-512 BF16, where
    # bench_pretrain measures a train_step at 2.1-3.1x fp32's speed (an AMD EPYC with AVX-512 BF16;
    # 1.4x on an Intel Xeon with AMX, whose fp32 products are twice as fast); fp32 elsewhere. null:
    # the layout's device default, bf16 on GPUs and fp32 on every CPU.
    precision: str | None = "auto"

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        need(self.max_steps > 0, "max_steps", "must be positive")
        need(self.optimizer in ("adamw", "lamb_adam"), "optimizer", "use 'adamw' or 'lamb_adam'")
        need(self.precision in (None, *PRECISIONS), "precision", f"use one of {PRECISIONS} or null")
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
    # how Ray places the workers: PACK (fewest nodes), SPREAD (across nodes, so losing one node loses
    # fewest workers), STRICT_PACK / STRICT_SPREAD (refuse to start otherwise)
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        if self.placement_strategy not in strategies:
            raise ConfigError(
                f"placement_strategy={self.placement_strategy!r}: use one of {', '.join(strategies)}"
            )
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
    """Degrees of the device mesh (see moray.platform.parallel.ParallelLayout): data parallelism
    takes what pp and tp leave of the world size; ep is borrowed from the data-parallel ranks.
    Pipeline stages run a torch.distributed.pipelining schedule over each rank's micro-batches."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    virtual_stages: int = 1  # pipeline stages per pp rank (2 or more: interleaved_1f1b)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    # How data-parallel ranks hold the model: shard (FSDP2) | replicate (every rank a whole copy,
    # gradients all-reduced once a step) | auto (replicate on the CPU for a pure data-parallel
    # layout of a model that fits, shard elsewhere; moray.platform.parallel.resolve_dp_mode)
    dp_mode: str = "auto"

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "virtual_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
        if self.dp_mode not in DP_MODES:
            raise ConfigError(f"dp_mode={self.dp_mode!r}: use one of {DP_MODES}")
        if self.pp_schedule not in SCHEDULES:
            raise ConfigError(f"pp_schedule={self.pp_schedule!r}: use one of {SCHEDULES}")
        if self.virtual_stages > 1 and self.pp == 1:
            raise ConfigError(
                f"virtual_stages={self.virtual_stages}: virtual stages split pipeline ranks; set pp > 1"
            )

    def layout(self, world_size: int, use_gpu: bool = False, precision: str | None = None,
               params: int = 0) -> ParallelLayout:  # fmt: skip
        """The layout of `world_size` ranks for a model of `params` parameters."""
        device = "cuda" if use_gpu else "cpu"
        try:
            dp_mode = resolve_dp_mode(self.dp_mode, device, self.tp, self.pp, self.ep, params)
            return ParallelLayout.for_world(world_size, pp=self.pp, tp=self.tp, ep=self.ep, device_type=device,
                                            precision=precision, dp_mode=dp_mode)  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"scaling.num_workers={world_size}: {e}") from None


@dataclass
class RunSection:
    name: str = "pretrain"
    experiment: str = "moray-pretrain"
    storage_path: str | None = None  # Ray Train storage (any pyarrow URI); default: <MORAY_HOME>/runs
    register_model: str | None = "moray-tiny"  # MLflow registered model name; null: don't register


@dataclass
class PretrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)
    objectives: ObjectivesSection = field(default_factory=ObjectivesSection)


@dataclass
class Plan:
    """What validation settles before any cluster work."""

    model_config: ModelConfig
    manifest: Manifest
    train_sequences: int
    val_sequences: int


def layout_for(cfg: PretrainConfig, world: int, model_config: ModelConfig) -> ParallelLayout:
    """The layout of exactly `world` ranks, checked against the model and the batch arithmetic."""
    g, micro = cfg.data.global_batch_size, cfg.data.micro_batch_size
    params = account(model_config).total_params
    layout = cfg.parallel.layout(world, cfg.scaling.use_gpu, cfg.train.precision, params)
    if model_config.n_routed_experts % layout.ep:
        raise ConfigError(f"parallel.ep={layout.ep}: must divide n_routed_experts")
    # each rank takes g / dp sequences, in whole micro-batches of `micro`
    if g % layout.dp or (g // layout.dp) % micro:
        raise ConfigError(
            f"data.global_batch_size={g}: must split into {layout.dp} data-parallel ranks x whole "
            f"micro-batches of data.micro_batch_size={micro} (world size {world} is in scaling.num_workers)"
        )
    p = cfg.parallel
    try:
        layout.configure_model(model_config)
        if layout.pp > 1:
            check_pipeline(model_config, layout.pp, p.virtual_stages, p.pp_schedule, g // layout.dp // micro)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return layout


def run_layout(cfg: PretrainConfig, workers: int, model_config: ModelConfig) -> ParallelLayout:
    """The layout a run takes on `workers` Ray Train workers. A fixed worker count must fit its layout
    exactly. An elastic run takes the most data-parallel ranks that fit (dp shrinks to what divides
    the batch and takes ep; pp and tp stay): the workers beyond them are spare, idle until a
    restart can use them (Ray Train may start any count in the range)."""
    lo, hi = cfg.scaling.worker_range
    if lo == hi:
        return layout_for(cfg, workers, model_config)
    per_dp = cfg.parallel.pp * cfg.parallel.tp
    first_error = None
    for dp in range(workers // per_dp, 0, -1):
        try:
            return layout_for(cfg, dp * per_dp, model_config)
        except ConfigError as e:
            first_error = first_error or e
    raise first_error or ConfigError(f"scaling.num_workers={workers}: fewer workers than pp x tp = {per_dp}")


def _check_objectives(cfg: PretrainConfig, manifest: Manifest) -> None:
    on = cfg.objectives.enabled
    if not on:
        return
    p = cfg.parallel
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(
            f"objectives {on}: the auxiliary heads run with data and expert parallelism only (parallel.tp and "
            "parallel.pp must be 1)"
        )
    if cfg.objectives.nsp.enabled and cfg.data.global_batch_size // max(cfg.scaling.worker_range) < 2:
        raise ConfigError(
            "objectives.nsp: next-sentence negatives come from another sequence of the rank's batch; "
            f"data.global_batch_size={cfg.data.global_batch_size} leaves fewer than 2 per data-parallel rank"
        )
    if cfg.objectives.code_exec.enabled and not manifest.exec_labels:
        raise ConfigError(
            f"objectives.code_exec: the data at {cfg.data.path} has no code-execution labels; curate it with "
            "code_exec.enabled: true"
        )


def validate(cfg: PretrainConfig) -> Plan:
    """Everything checkable before the cluster: the data contract, the model, the layouts of every
    world size the run may take, the batch arithmetic."""
    try:
        manifest = read_manifest(cfg.data.path)
    except ContractError as e:
        raise ConfigError(f"data.path={cfg.data.path!r}: {e}") from None
    model_config = build_model_config(cfg.model, manifest, cfg.train.capacity_factor, cfg.objectives)
    _check_objectives(cfg, manifest)
    if manifest.seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"data: seq_len {manifest.seq_len} exceeds model max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    lo, hi = cfg.scaling.worker_range
    for world in range(lo, hi + 1):
        run_layout(cfg, world, model_config)
    train_sequences, g = count_rows(cfg.data.path, "train"), cfg.data.global_batch_size
    if train_sequences < g:
        raise ConfigError(f"data.global_batch_size={g}: more than the {train_sequences} training sequences")
    return Plan(model_config, manifest, train_sequences, count_rows(cfg.data.path, "val"))
