"""The per-worker training function that Ray Train runs on every rank.

One step: grad-accumulated micro-batches of this rank's slice of the global batch, LM loss +
lambda * balance losses, clipping, optimizer and schedule, then the MoE feedback loops (the
capacity-factor controller and the aux-loss-free router bias), all from statistics summed over
the data-parallel group so every rank takes the same decision.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import posixpath
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from moray.jobs.pretrain import checkpoint as ckpt
from moray.jobs.pretrain.config import PretrainConfig
from moray.jobs.pretrain.data import iterate_split, step_batches
from moray.jobs.pretrain.optim import Schedule, build_optimizer, clip_gradients
from moray.jobs.pretrain.parallel import build_mesh_shape, parallelize
from moray.model import CapacityController, ModelConfig, Transformer
from moray.model.accounting import account
from moray.platform.config import from_dict
from moray.platform.storage import Storage

log = logging.getLogger("moray.pretrain")
METRICS_FILE = "metrics.jsonl"


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(s: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8))


def train_func(loop_config: dict) -> None:
    import ray.train

    cfg: PretrainConfig = from_dict(PretrainConfig, loop_config["config"])
    model_config = from_dict(ModelConfig, loop_config["model_config"])
    manifest = loop_config["manifest"]
    storage = Storage(loop_config["storage"])
    run_dir = storage.path(cfg.run.name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = cfg.train
    torch.manual_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    dims, names = build_mesh_shape(cfg.parallel, world)
    mesh = init_device_mesh("cpu", dims, mesh_dim_names=names) if dist.is_initialized() else None
    dp = dims[0]
    dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0
    global_batch = loop_config["global_batch"]
    per_rank = global_batch // dp
    micro = min(cfg.data.micro_batch_size, per_rank)
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} is not divisible by micro_batch_size {micro}")

    model = Transformer(model_config)
    model = parallelize(model, mesh, cfg.parallel)
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, tuple(tc.betas), 1e-8,
                                tc.adaptive_weight_decay)  # fmt: skip
    schedule = Schedule(
        tc.max_steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, 0.2, tc.warmup_oscillation
    )
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    controller = None
    if tc.capacity_factor is not None:
        controller = CapacityController(tc.capacity_factor, tc.capacity_target_drop_rate, *tc.capacity_bounds)
        controller.apply(model)
    else:
        model.set_capacity_factor(None)

    # ---- resume ------------------------------------------------------------------------------
    start_step, mlflow_run_id = 0, loop_config.get("mlflow_run_id")
    found = ckpt.latest_valid(storage, run_dir)
    if found is not None:
        path, m0 = found
        ckpt.load(storage, path, model, optimizer)
        state = m0["state"]
        start_step = state["step"]
        lr_sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if controller is not None and state.get("capacity"):
            controller.load_state_dict(state["capacity"])
            controller.apply(model)
        for i, bias in (state.get("router_bias") or {}).items():
            model.layers[int(i)].mlp.gate.e_score_correction_bias.copy_(torch.tensor(bias))
        if rank == 0:
            log.warning("resuming from %s at step %d (saved by %d ranks, now %d)", path, start_step,
                        m0["world_size"], world)  # fmt: skip

    tracker = _Tracker(rank, loop_config, mlflow_run_id, storage, run_dir)
    flops_per_token = account(model_config, seq_len=manifest["seq_len"]).train_flops_per_token
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    steps_per_epoch = loop_config["train_sequences"] // global_batch
    batches = step_batches(iterate_split(train_shard, global_batch), start_step, tc.max_steps, steps_per_epoch,
                           global_batch, dp_rank, dp)  # fmt: skip
    fault = loop_config.get("fault_injection") or {}

    for batch in batches:
        step = batch.step
        if fault and rank == fault.get("rank", 0) and step == fault.get("step"):
            marker = Path(fault["marker"])
            if not marker.exists():  # die once, hard, like a lost node
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        model.train()
        sums = {"loss": 0.0, "lm_loss": 0.0}
        layer_tokens: dict[int, torch.Tensor] = {}
        dropped = pairs = 0
        n_micro = per_rank // micro
        for m in range(n_micro):
            inputs = batch.inputs[m * micro : (m + 1) * micro]
            targets = batch.targets[m * micro : (m + 1) * micro]
            out = model(inputs)
            lm_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
            loss = lm_loss + tc.aux_loss_weight * out.aux_loss
            (loss / n_micro).backward()
            sums["loss"] += float(loss.detach()) / n_micro
            sums["lm_loss"] += float(lm_loss.detach()) / n_micro
            for name, v in out.balance_losses.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach()) / n_micro
            for i, st in out.router_stats.items():
                layer_tokens[i] = layer_tokens.get(i, 0) + st.tokens_per_expert.float()
                dropped += st.dropped
                pairs += st.pairs
        clip = clip_gradients(model, tc.clip_per_layer, tc.clip_per_expert, tc.clip_global)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_sched.step()

        # ---- MoE feedback from statistics summed over data-parallel ranks --------------------------
        names = sorted(sums)
        reduced = _all_reduce(torch.tensor([sums[n] for n in names], dtype=torch.float64)) / dp
        sums = dict(zip(names, reduced.tolist()))
        drop = _all_reduce(torch.tensor([dropped, pairs], dtype=torch.float64))
        drop_rate = float(drop[0] / drop[1].clamp_min(1))
        loads = {i: _all_reduce(t.clone()) for i, t in sorted(layer_tokens.items())}
        if controller is not None:
            controller.update(drop_rate)
            controller.apply(model)
        if tc.router_bias_update:
            for i, load in loads.items():
                model.layers[i].mlp.gate.update_bias(load)
        step_time = time.perf_counter() - t0
        tokens = global_batch * manifest["seq_len"]
        metrics = {
            **sums,
            "grad_norm": clip["grad_norm"],
            "lr": lr,
            "tokens_per_s": tokens / step_time,
            "mfu": tokens / step_time * flops_per_token / (tc.peak_flops_per_worker * world),
            "drop_rate": drop_rate,
            "capacity_factor": controller.factor if controller is not None else 0.0,
            # Which sequences this step consumed: the global index of its first one, and a content
            # checksum summed over ranks (equal across runs <=> the same sequences, exactly once each).
            "sample_start": float(step * global_batch),
            "batch_token_sum": float(_all_reduce(batch.inputs.sum().double())),
        }
        for i, load in loads.items():
            metrics[f"layer{i}/load_max_min"] = float(load.max() / load.min().clamp_min(1))
            p = load / load.sum().clamp_min(1)
            metrics[f"layer{i}/load_entropy"] = float(
                -(p * p.clamp_min(1e-30).log()).sum() / math.log(len(p))
            )
        done = step + 1
        if tc.val_batches and (done % tc.val_every == 0 or done == tc.max_steps):
            metrics["val_loss"] = _validate(
                model, val_shard, global_batch, dp_rank, dp, micro, tc.val_batches
            )
        tracker.step(step, metrics, {i: load.tolist() for i, load in loads.items()})

        if done % tc.checkpoint_every == 0 or done == tc.max_steps:
            extra = {
                "step": done,
                "scheduler": lr_sched.state_dict(),
                "rng": _rng_state(),
                "capacity": controller.state_dict() if controller is not None else None,
                "router_bias": {
                    str(i): moe.gate.e_score_correction_bias.tolist()
                    for i, moe in model.moe_layers()
                    if moe.gate.e_score_correction_bias is not None
                },
                "samples_consumed": done * global_batch,
                "mlflow_run_id": tracker.run_id,
            }
            tracker.flush()
            with tempfile.TemporaryDirectory() as staging:
                ckpt.save(Path(staging), model, optimizer, extra, rank, world)
                ray.train.report(
                    {"step": done, "loss": sums["loss"]},
                    checkpoint=ray.train.Checkpoint.from_directory(staging),
                    checkpoint_dir_name=ckpt.checkpoint_name(done),
                )

    tracker.flush()
    _finish(model, model_config, loop_config, storage, run_dir, rank)


@torch.no_grad()
def _validate(
    model, val_shard, global_batch: int, dp_rank: int, dp: int, micro: int, max_batches: int
) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(step_batches(iterate_split(val_shard, global_batch), 0, max_batches, max_batches,
                                           global_batch, dp_rank, dp)):  # fmt: skip
        for m in range(0, batch.inputs.shape[0], micro):
            logits = model(batch.inputs[m : m + micro]).logits
            targets = batch.targets[m : m + micro]
            total[0] += F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"
            ).item()
            total[1] += targets.numel()
        if i + 1 >= max_batches:
            break
    total = _all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp_min(1))


class _Tracker:
    """Rank 0's metrics: MLflow (every step) and metrics.jsonl in run storage, which survives
    restarts and feeds the end-of-run plots. Written whole at each checkpoint (object stores cannot
    append); MLflow gets every step as it happens."""

    def __init__(self, rank: int, loop_config: dict, run_id: str | None, storage: Storage, run_dir: str):
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

            mlflow.set_tracking_uri(loop_config["tracking_uri"])
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


def _finish(
    model, model_config: ModelConfig, loop_config: dict, storage: Storage, run_dir: str, rank: int
) -> None:
    """Gather the full weights, export the HF directory and plots into run storage (rank 0)."""
    state = ckpt.full_model_state(model)
    if rank != 0:
        return
    from moray.jobs.pretrain.report import write_plots
    from moray.model import save_pretrained

    export = Transformer(model_config)
    export.load_state_dict(state)
    with tempfile.TemporaryDirectory() as staging:
        out = Path(staging)
        save_pretrained(
            export.eval(), out / "model", tokenizer=Path(loop_config["data_path"]) / "tokenizer.json"
        )
        write_plots(read_metrics(run_dir, storage), out / "plots")
        storage.upload_dir(out, posixpath.join(run_dir, "export"))
