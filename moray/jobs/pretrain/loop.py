"""The per-worker training function that Ray Train runs on every rank: setup, resume, the step
loop, checkpoints, export. The step itself is `step.train_step` (plain PyTorch); what a checkpoint
restores is `state.TrainState` plus the model and optimizer tensors (`checkpoint.py`).
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moray.jobs.pretrain import checkpoint as ckpt
from moray.jobs.pretrain.config import PretrainConfig, run_layout
from moray.jobs.pretrain.data import iterate_split, step_batches
from moray.jobs.pretrain.objectives import prepare as prepare_objectives
from moray.jobs.pretrain.optim import Schedule, build_optimizer
from moray.jobs.pretrain.parallel import parallelize
from moray.jobs.pretrain.state import CapacityState, DataPosition, RNGState, TrainState
from moray.jobs.pretrain.step import ClipSettings, all_reduce, lm_loss, moe_feedback, reduce_stats, train_step
from moray.jobs.pretrain.tracker import Tracker, read_metrics
from moray.jobs.pretrain.working_weights import WorkingWeights
from moray.model import CapacityController, ModelConfig, Transformer
from moray.model.accounting import account
from moray.platform.config import from_dict
from moray.platform.data_contract import TOKENIZER_FILE
from moray.platform.expert_parallel import ALL_TO_ALL
from moray.platform.parallel import ParallelLayout
from moray.platform.pipeline_parallel import PipelinedModel, PipelineOptions, pipeline_group
from moray.platform.storage import Storage

log = logging.getLogger("moray.pretrain")


@dataclass
class Worker:
    """Where this rank stands: its layout, mesh, device and data-parallel coordinates."""

    rank: int
    layout: ParallelLayout
    mesh: object  # DeviceMesh, or None in a single process without a process group
    device: torch.device

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    @property
    def group(self):
        """The layout's ranks (None: every rank): what checkpoints and exports synchronize."""
        return self.mesh.active_group if self.mesh is not None else None

    @property
    def spare(self) -> bool:
        return self.mesh is not None and self.mesh.spare


def _setup_worker(cfg: PretrainConfig, threads: int, model_config: ModelConfig) -> Worker:
    import ray.train

    ctx = ray.train.get_context()
    layout = run_layout(cfg, ctx.get_world_size(), model_config)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(max(1, threads))
    if layout.device_type == "cuda":
        from ray.train.torch import get_device

        device = get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Worker(ctx.get_world_rank(), layout, layout.build_mesh(), device)


def train_func(loop_config: dict) -> None:
    import ray.train

    cfg: PretrainConfig = from_dict(PretrainConfig, loop_config["config"])
    tc = cfg.train
    model_config = from_dict(ModelConfig, loop_config["model_config"])
    w = _setup_worker(cfg, loop_config.get("threads_per_worker", 1), model_config)
    model_config = w.layout.configure_model(model_config)
    storage = Storage(loop_config["storage"])
    run_dir = storage.path(cfg.run.name)
    if w.spare:
        _wait_as_spare(cfg, storage, run_dir, w)
        return
    global_batch, seq_len = cfg.data.global_batch_size, loop_config["seq_len"]

    micro = cfg.data.micro_batch_size
    pipeline = PipelineOptions(cfg.parallel.pp_schedule, cfg.parallel.virtual_stages,
                               global_batch // w.layout.dp // micro, seq_len)  # fmt: skip
    model = parallelize(Transformer(model_config).to(w.device), w.layout, w.mesh, pipeline, w.device)
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, tuple(tc.betas), 1e-8,
                                tc.adaptive_weight_decay, pipeline_group(model))  # fmt: skip
    schedule = Schedule(
        tc.max_steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, 0.2, tc.warmup_oscillation
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # bf16: cast once a step; replicas on one machine split the update unless clipping needs whole gradients
    whole_gradients = tc.clip_per_layer is not None or tc.clip_per_expert is not None
    working_weights = WorkingWeights.for_layout(model, w.layout, w.dp_group, optimizer, not whole_gradients)
    gradient_mean = working_weights.mean if working_weights is not None else None
    if gradient_mean is not None and w.rank == 0:
        log.info("bf16 replicas: gradients averaged through %s%s", gradient_mean.transport,
                 ", the update split between them" if working_weights.shared else "")  # fmt: skip
    controller = None
    if tc.capacity_factor is not None:
        controller = CapacityController(tc.capacity_factor, tc.capacity_target_drop_rate, *tc.capacity_bounds)
        controller.apply(model)
    position = DataPosition(global_batch)
    state = TrainState(data=position, scheduler=scheduler, rng=RNGState(),
                       capacity=CapacityState(controller, model) if controller else None)  # fmt: skip
    _resume(storage, run_dir, model, optimizer, state, w)

    tracker = Tracker(w.rank, loop_config["tracking_uri"], loop_config.get("mlflow_run_id"), storage, run_dir,
                      cfg.run.name)  # fmt: skip
    flops_per_token = account(model_config, seq_len=seq_len).train_flops_per_token
    val_shard = ray.train.get_dataset_shard("val")
    steps_per_epoch = loop_config["train_sequences"] // global_batch
    batches = step_batches(iterate_split(ray.train.get_dataset_shard("train"), global_batch), position.step,
                           tc.max_steps, steps_per_epoch, global_batch, w.dp_rank, w.layout.dp)  # fmt: skip
    callbacks = loop_config.get("callbacks") or []
    clip = ClipSettings(tc.clip_per_layer, tc.clip_per_expert, tc.clip_global)
    objectives = cfg.objectives
    # whole global batches only: a validation split smaller than one (curation allows it) is skipped
    val_batches = min(tc.val_batches, loop_config["val_sequences"] // global_batch)

    checkpoint_steps = set(_checkpoint_steps(cfg, position.step))
    checkpoint_s, t_done = 0.0, time.perf_counter()  # the last checkpoint's time; the last step's end
    for batch in batches:
        for cb in callbacks:
            cb.on_step_start(batch.step, w.rank)
        ALL_TO_ALL.reset()
        t0 = time.perf_counter()
        data_s = t0 - t_done  # waiting for Ray Data (and the callbacks)
        inputs, targets = batch.inputs, batch.targets
        aux = None
        if objectives.enabled:  # corrupted inputs and the objectives' labels, the same on a resume
            generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + batch.first_sample)
            seqs = torch.cat([inputs, targets[:, -1:]], dim=1)  # (b, T + 1) the packed windows
            inputs, targets, aux = prepare_objectives(objectives, seqs, batch.exec_labels, model_config.pad_token_id,
                                                      generator)  # fmt: skip
        inputs, targets = inputs.to(w.device), targets.to(w.device)
        micro_batches = [
            (
                inputs[m : m + micro],
                targets[m : m + micro],
                *([aux.rows(m, m + micro).to(w.device)] if aux else []),
            )
            for m in range(0, len(inputs), micro)
        ]
        stats = train_step(
            model,
            optimizer,
            scheduler,
            micro_batches,
            tc.aux_loss_weight,
            clip,
            w.layout.autocast,
            w.layout.loss_parallel,
            working_weights,
            objectives,
        )
        t_compute = time.perf_counter()
        reduced = reduce_stats(stats, w.layout.dp, w.dp_group, w.device)
        moe_feedback(model, reduced, controller, tc.router_bias_update)
        position.step = done = batch.step + 1
        t_sync = time.perf_counter()
        step_time = t_sync - t0
        tokens = global_batch * seq_len
        metrics = {
            **reduced.losses,
            "grad_norm": reduced.grad_norm,
            "lr": reduced.lr,
            "tokens_per_s": tokens / step_time,
            "mfu": tokens / step_time * flops_per_token / (tc.peak_flops_per_worker * w.layout.world_size),
            "drop_rate": reduced.drop_rate,
            "capacity_factor": controller.factor if controller is not None else 0.0,
            # Which sequences this step consumed: the global index of its first one, and a content
            # checksum summed over ranks (equal across runs <=> the same sequences, exactly once each).
            "sample_start": float(batch.step * global_batch),
            "batch_token_sum": float(all_reduce(inputs.sum().double(), w.dp_group)),
            # expert dispatch on this rank (rank 0's figures; 0 without expert parallelism)
            "all_to_all_mb": ALL_TO_ALL.bytes_sent / 1e6,
            "all_to_all_s": ALL_TO_ALL.seconds,
            # an elastic run's workers beyond its layout (they wait for a restart that can use them)
            "spare_workers": float(ray.train.get_context().get_world_size() - w.layout.world_size),
            # where the step's time went (rank 0's clock): the dashboard's step-time breakdown
            "time/data_s": data_s,
            "time/compute_s": t_compute - t0,  # forward, backward, optimizer (dispatch included)
            "time/dispatch_s": ALL_TO_ALL.seconds,
            "time/sync_s": t_sync - t_compute,  # statistics over dp, capacity and bias feedback
            "time/gradient_mean_s": gradient_mean.seconds if gradient_mean else 0.0,  # within compute_s
            "time/checkpoint_s": checkpoint_s,  # the last checkpoint's
            **reduced.load_metrics(),
        }
        if val_batches and (done % tc.val_every == 0 or done == tc.max_steps):
            metrics["val_loss"] = _validate(model, val_shard, global_batch, micro, val_batches, w)
        metrics["time/validation_s"] = time.perf_counter() - t_sync
        tracker.step(batch.step, metrics, {i: load.tolist() for i, load in reduced.tokens_per_expert.items()})
        if done in checkpoint_steps:
            t_checkpoint = time.perf_counter()
            tracker.flush()
            _save(model, optimizer, state, w, done, reduced.losses["loss"], tracker, storage.uri_of(run_dir))
            checkpoint_s = time.perf_counter() - t_checkpoint
        t_done = time.perf_counter()

    tracker.flush()
    _export(model, model_config, loop_config, storage, run_dir, w)


def _checkpoint_steps(cfg: PretrainConfig, start: int) -> list[int]:
    """The steps after which the run checkpoints, from `start` on."""
    tc = cfg.train
    return [
        s for s in range(start + 1, tc.max_steps + 1) if s % tc.checkpoint_every == 0 or s == tc.max_steps
    ]


def _wait_as_spare(cfg: PretrainConfig, storage: Storage, run_dir: str, w: Worker) -> None:
    """A worker beyond the layout (an elastic run started more than its layout takes) trains
    nothing; it joins the report at every checkpoint, which Ray Train holds as a barrier on all
    workers, so the run goes on and a restart can use it."""
    import ray.train

    found = ckpt.latest_valid(storage, run_dir)
    start = found[1]["state"]["data"]["step"] if found else 0
    log.warning("worker %d is spare: the layout %s takes %d workers", w.rank, w.layout.describe(),
                w.layout.world_size)  # fmt: skip
    for step in _checkpoint_steps(cfg, start):
        ray.train.report({"step": step, "spare": 1.0})


def _resume(storage: Storage, run_dir: str, model, optimizer, state: TrainState, w: Worker) -> None:
    """Restore the newest intact checkpoint, if any (DCP reshards it onto this world size)."""
    found = ckpt.latest_valid(storage, run_dir)
    if found is None:
        return
    path, m0 = found
    ckpt.load(storage, path, model, optimizer, w.group)
    state.load_state_dict(m0["state"])
    if w.rank == 0:
        log.warning("resuming from %s at step %d (saved by %d ranks, now %d)", path, state.parts["data"].step,
                    m0["world_size"], w.layout.world_size)  # fmt: skip


def _save(model, optimizer, state: TrainState, w: Worker, step: int, loss: float, tracker: Tracker,
          run_uri: str) -> None:  # fmt: skip
    """Every rank writes its shard; Ray Train persists them as one checkpoint in run storage; rank 0
    records it (its URI and every rank's checksums) in the MLflow run."""
    import ray.train

    with tempfile.TemporaryDirectory() as staging:
        extra = {**state.state_dict(), "mlflow_run_id": tracker.run_id}
        manifest = ckpt.save(Path(staging), model, optimizer, extra, w.rank, w.layout.world_size, w.group)
        manifests = [manifest]
        if dist.is_initialized():
            manifests = [None] * dist.get_world_size(w.group)
            dist.all_gather_object(manifests, manifest, group=w.group)
        name = ckpt.checkpoint_name(step)
        ray.train.report(
            {"step": step, "loss": loss},
            checkpoint=ray.train.Checkpoint.from_directory(staging),
            checkpoint_dir_name=name,
        )
    tracker.checkpoint(step, f"{run_uri.rstrip('/')}/{name}", loss, manifests)


@torch.no_grad()
def _validate(model, val_shard, global_batch: int, micro: int, max_batches: int, w: Worker) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=w.device)
    batches = step_batches(iterate_split(val_shard, global_batch), 0, max_batches, max_batches, global_batch,
                           w.dp_rank, w.layout.dp)  # fmt: skip
    for batch in batches:
        micro_batches = [(batch.inputs[m : m + micro].to(w.device), batch.targets[m : m + micro].to(w.device))
                         for m in range(0, batch.inputs.shape[0], micro)]  # fmt: skip
        if isinstance(model, PipelinedModel):
            total[0] += model.evaluate(micro_batches, w.layout.autocast, w.layout.loss_parallel).to(w.device)
        else:
            for inputs, targets in micro_batches:
                with w.layout.loss_parallel():
                    with w.layout.autocast():
                        logits = model(inputs).logits
                    total[0] += lm_loss(logits, targets, reduction="sum").double()
        total[1] += batch.targets.numel()
    total = all_reduce(total, w.dp_group).cpu()
    model.train()
    return float(total[0] / total[1].clamp_min(1))


def _export(
    model, model_config: ModelConfig, loop_config: dict, storage: Storage, run_dir: str, w: Worker
) -> None:
    """Gather the full weights; rank 0 exports the HF directory (with the curated tokenizer) and
    the plots into run storage."""
    state = ckpt.full_model_state(model, pipeline_group(model), w.group)
    if w.rank != 0:
        return
    from moray.jobs.pretrain.report import write_plots
    from moray.model import save_pretrained

    export = Transformer(model_config)
    export.load_state_dict(state)
    with tempfile.TemporaryDirectory() as staging:
        out = Path(staging)
        data = Storage(loop_config["data_path"])  # the curated tokenizer, wherever the data lives
        tokenizer = out / TOKENIZER_FILE
        tokenizer.write_bytes(data.read_bytes(data.path(TOKENIZER_FILE)))
        save_pretrained(export.eval(), out / "model", tokenizer=tokenizer)
        tokenizer.unlink()
        write_plots(read_metrics(run_dir, storage), out / "plots")
        storage.upload_dir(out, posixpath.join(run_dir, "export"))
