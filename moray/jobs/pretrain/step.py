"""One optimizer step of pre-training, and the MoE feedback that follows it. Plain PyTorch: no Ray.

train_step      grad-accumulated micro-batches: LM loss + lambda * the model's weighted balance
                losses (+ the enabled auxiliary objectives, each weighted); clipping; optimizer
                and schedule. Returns this rank's statistics.
reduce_stats    sums those statistics over the data-parallel group, so every rank sees the same.
moe_feedback    the capacity-factor controller and the aux-loss-free router bias, fed by the
                reduced statistics: every rank takes the same decision.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moray.jobs.pretrain.objectives import losses as objective_losses
from moray.jobs.pretrain.objectives import weighted
from moray.jobs.pretrain.optim import clip_gradients
from moray.jobs.pretrain.parallel import sync_gradients
from moray.model.transformer import lm_loss  # noqa: F401 (the loop's and the tests' import)
from moray.platform.pipeline_parallel import PipelinedModel, pipeline_group


@dataclass
class ClipSettings:
    per_layer: float | None = None
    per_expert: float | None = None
    global_norm: float | None = 1.0


@dataclass
class StepStats:
    """One step's statistics: this rank's before `reduce_stats`, the data-parallel group's after."""

    losses: dict[str, float]  # loss, lm_loss and each balance loss: mean over micro-batches
    tokens_per_expert: dict[int, torch.Tensor]  # MoE layer -> (E,) routed tokens
    dropped: float = 0.0  # routed (token, expert) pairs over capacity
    pairs: float = 0.0  # routed (token, expert) pairs
    grad_norm: float = 0.0
    lr: float = 0.0

    @property
    def drop_rate(self) -> float:
        return self.dropped / max(self.pairs, 1.0)

    def load_metrics(self) -> dict[str, float]:
        """Per MoE layer: max/min expert load and the load's normalized entropy (1 = uniform)."""
        out = {}
        for i, load in self.tokens_per_expert.items():
            out[f"layer{i}/load_max_min"] = float(load.max() / load.min().clamp_min(1))
            p = load / load.sum().clamp_min(1)
            out[f"layer{i}/load_entropy"] = float(-(p * p.clamp_min(1e-30).log()).sum() / math.log(len(p)))
        return out


def train_step(
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    micro_batches: list[tuple],  # [(inputs (b, T), targets (b, T))], or (.., AuxTargets) with objectives
    aux_loss_weight: float,
    clip: ClipSettings,
    autocast=contextlib.nullcontext,
    loss_parallel=contextlib.nullcontext,  # the layout's, around the loss and its backward
    working_weights=None,  # WorkingWeights: bf16 copies cast once for the step's micro-batches
    objectives=None,  # ObjectivesSection: the auxiliary objectives' weights
) -> StepStats:
    """A pipelined model (PipelinedModel) runs its micro-batches through its schedule and reports
    the whole pipeline's figures; its gradient norm is taken over every stage."""
    model.train()
    with working_weights or contextlib.nullcontext():
        stats = forward_backward(model, micro_batches, aux_loss_weight, autocast, loss_parallel, objectives)
    norms = clip_gradients(model, clip.per_layer, clip.per_expert, clip.global_norm, pipeline_group(model),
                           optimizer, working_weights.squares if working_weights else None)  # fmt: skip
    stats.lr = optimizer.param_groups[0]["lr"]
    stats.grad_norm = norms["grad_norm"]
    optimizer.step()
    optimizer.grad_scale = None  # the clip's, for this step only
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return stats


def forward_backward(
    model,
    micro_batches,
    aux_loss_weight: float,
    autocast=contextlib.nullcontext,
    loss_parallel=contextlib.nullcontext,
    objectives=None,
) -> StepStats:
    """Gradients of the micro-batches' mean loss, accumulated; this rank's statistics (the whole
    pipeline's, for a pipelined model)."""
    if isinstance(model, PipelinedModel):
        return StepStats(*model.forward_backward(micro_batches, aux_loss_weight, autocast, loss_parallel))
    n = len(micro_batches)
    losses: dict[str, float] = {"loss": 0.0, "lm_loss": 0.0}
    tokens: dict[int, torch.Tensor] = {}
    dropped = pairs = 0.0
    for k, (inputs, targets, *aux_targets) in enumerate(micro_batches):
        sync_gradients(model, now=k == n - 1)
        with loss_parallel():
            with autocast():
                out = model(inputs)
                named = objective_losses(objectives, model, out, aux_targets[0]) if aux_targets else {}
            lm = lm_loss(out.logits, targets)
            loss = lm + aux_loss_weight * out.aux_loss + weighted(objectives, named)
            (loss / n).backward()
        losses["loss"] += float(loss.detach()) / n
        losses["lm_loss"] += float(lm.detach()) / n
        for name, v in [*out.balance_losses.items(), *named.items()]:
            losses[name] = losses.get(name, 0.0) + float(v.detach()) / n
        for i, st in out.router_stats.items():
            tokens[i] = tokens.get(i, 0) + st.tokens_per_expert.detach().float().cpu()
            dropped += float(st.dropped)
            pairs += float(st.pairs)
    return StepStats(losses, tokens, dropped, pairs)


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def reduce_stats(stats: StepStats, dp: int, group=None, device: str | torch.device = "cpu") -> StepStats:
    """Losses averaged, loads and drop counts summed over the data-parallel group (one collective
    for the scalars, one per MoE layer for the loads), on `device` (NCCL reduces GPU tensors)."""
    names = sorted(stats.losses)
    values = [stats.losses[k] for k in names] + [stats.dropped, stats.pairs]
    scalars = all_reduce(torch.tensor(values, dtype=torch.float64, device=device), group).cpu()
    losses = dict(zip(names, (scalars[: len(names)] / dp).tolist()))
    loads = {i: all_reduce(t.to(device), group).cpu() for i, t in sorted(stats.tokens_per_expert.items())}
    return StepStats(losses, loads, float(scalars[-2]), float(scalars[-1]), stats.grad_norm, stats.lr)


def moe_feedback(model, reduced: StepStats, controller=None, bias_update: bool = True) -> None:
    """Feed the group's statistics back into routing: the capacity factor toward its target drop
    rate, and the score-correction bias of sigmoid routers toward balanced loads."""
    if controller is not None:
        controller.update(reduced.drop_rate)
        controller.apply(model)
    if bias_update:
        for i, moe in model.moe_layers():  # this rank's layers (a pipeline stage holds some)
            gate = moe.gate
            if gate.e_score_correction_bias is not None:  # a persistent buffer: checkpointed with the model
                gate.update_bias(reduced.tokens_per_expert[i].to(gate.e_score_correction_bias.device))
