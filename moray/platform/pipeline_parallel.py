"""Pipeline parallelism: contiguous blocks of layers on the ranks of the "pp" mesh dimension,
run by torch.distributed.pipelining's schedules (GPipe, 1F1B, interleaved 1F1B).

    stages      pp * virtual_stages, each a contiguous range of layers; the embedding goes with the
                first, the final norm and the output head with the last; boundaries balance the
                training FLOPs of the stages (`stage_ranges`)
    rank r      holds stages r, r + pp, r + 2 pp ... (the looped placement interleaving needs)

Each stage is a `StageModule` built from the whole single-device Transformer: it keeps the
model's own submodules under the model's parameter names (`layers.7.mlp...`), so checkpoints,
exports and optimizer state are keyed as in one process and reshard between any layouts. A rank's
stages are gathered in one `PipelinedModel` (the same modules, the same names), which is what the
optimizer, clipping, checkpoints and the MoE feedback see; its `forward_backward` runs the schedule.

MoE losses computed inside a stage never reach the schedule's loss (the last stage's cross-entropy),
so each stage adds the gradient of its own weighted balance losses at its output (`_AddAuxGrad`,
as Megatron's MoEAuxLossAutoScaler), and records its routing statistics for the step's metrics and
the capacity controller; `forward_backward` sums them over the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moray.model.config import ModelConfig
from moray.model.transformer import (
    HoldsMoE,
    Transformer,
    balance_weights,
    causal_inputs,
    lm_loss,
    router_outputs,
)
from moray.platform.plan import balanced_split, layer_costs

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


# ---- where the stages split --------------------------------------------------------------------
def stage_ranges(config: ModelConfig, n_stages: int, seq_len: int) -> list[range]:
    """The layers of each stage, balancing their training FLOPs (the head's counted in the last
    stage; the embedding is a lookup), as `moray plan` splits them."""
    b = balanced_split(layer_costs(config, seq_len), n_stages)
    return [range(b[s], b[s + 1]) for s in range(n_stages)]


def check_pipeline(
    config: ModelConfig, pp: int, virtual_stages: int, schedule: str, n_microbatches: int
) -> None:
    """Raises ValueError naming the limit when this model and schedule cannot be pipelined so."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: use one of {SCHEDULES}")
    if virtual_stages < 1:
        raise ValueError(f"parallel.virtual_stages={virtual_stages}: must be a positive integer")
    if (schedule == "interleaved_1f1b") != (virtual_stages > 1):
        raise ValueError(f"parallel.pp_schedule={schedule!r} with parallel.virtual_stages={virtual_stages}: "
                         "interleaved_1f1b takes 2 or more virtual stages per rank, gpipe and 1f1b one")  # fmt: skip
    if pp * virtual_stages > config.num_hidden_layers:
        raise ValueError(f"parallel.pp={pp} x virtual_stages={virtual_stages} stages: more than the model's "
                         f"{config.num_hidden_layers} layers")  # fmt: skip
    if config.tie_word_embeddings:
        raise ValueError(
            f"parallel.pp={pp}: tied embeddings live on the first and the last stage; untie them"
        )
    if config.rope_learned_wavelengths:
        raise ValueError(f"parallel.pp={pp}: learned RoPE wavelengths are shared by every stage's layers")
    if schedule == "1f1b" and n_microbatches < pp:
        raise ValueError(f"parallel.pp={pp} with 1f1b needs at least {pp} micro-batches per step; "
                         f"each rank has {n_microbatches} (data.global_batch_size / dp / data.micro_batch_size)")  # fmt: skip
    if schedule == "interleaved_1f1b" and n_microbatches % max(1, n_microbatches // pp):
        raise ValueError(f"interleaved_1f1b needs the {n_microbatches} micro-batches per rank to be a "
                         f"multiple of rounds of pp={pp}")  # fmt: skip


# ---- the stages --------------------------------------------------------------------------------
class _AddAuxGrad(torch.autograd.Function):
    """Identity on the stage's output; its backward also feeds `weight` into the stage's balance
    loss, so the loss reaches the routers though the schedule never sees it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.clone()  # not a view: FSDP hooks a stage's output for its backward

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_full((), ctx.weight, dtype=torch.float32), None


class StageModule(HoldsMoE, nn.Module):
    """Layers [start, stop) of a Transformer, under the model's names; with the embedding on the
    first stage (input: token ids (b, T)) and the norm and head on the last (output: logits
    (b, T, vocab), this rank's vocabulary shard under tensor parallelism)."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.rotary = model.rotary
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.needs_mask = model._needs_mask
        self.aux_loss_weight = 0.0  # lambda, set per step by PipelinedModel.forward_backward
        self.records: list[tuple[dict, dict]] = []  # per forward: (balance losses, router stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # (b, T) -> (b, T, H)
        B, T = x.shape[:2]
        inp = causal_inputs(self.rotary, B, T, x.device, self.needs_mask)
        for block in self.layers.values():
            x = block(x, inp)
        aux, totals, stats = router_outputs(self.config, self.moe_layers(), x.device)
        self.records.append(({k: v.detach() for k, v in totals.items()}, stats))
        if aux.requires_grad:
            x = _AddAuxGrad.apply(x, aux, self.aux_loss_weight)
        if self.lm_head is None:
            return x  # (b, T, H)
        logits = self.lm_head(self.norm(x))  # (b, T, vocab[/tp])
        return logits.to_local() if hasattr(logits, "to_local") else logits


@dataclass
class PipelineOptions:
    schedule: str = "1f1b"
    virtual_stages: int = 1
    n_microbatches: int = 1  # per rank and step
    seq_len: int = 4096  # for the FLOP balance (attention grows with it)


class PipelinedModel(HoldsMoE, nn.Module):
    """This pp rank's stages, as one module under the whole model's parameter names (what the
    optimizer, clipping, checkpoints and exports see), and the schedule that runs them. It has
    no forward: training goes through `forward_backward`, validation through `evaluate`."""

    def __init__(self, model: Transformer, layout, mesh, options: PipelineOptions):
        super().__init__()
        pp, v = layout.pp, options.virtual_stages
        self.config = model.config
        self.options = options
        self.pp_group = mesh["pp"].get_group()
        self.tp_mesh = mesh["tp"] if layout.tp > 1 else None
        rank, n_stages = mesh["pp"].get_local_rank(), pp * v
        ranges = stage_ranges(model.config, n_stages, options.seq_len)
        self.stage_ids = [rank + k * pp for k in range(v)]
        self.stages = [StageModule(model, ranges[s], s == 0, s == n_stages - 1) for s in self.stage_ids]
        self.n_stages = n_stages
        self.rotary = model.rotary
        self.embed_tokens = model.embed_tokens if 0 in self.stage_ids else None
        self.layers = nn.ModuleDict({k: b for s in self.stages for k, b in s.layers.items()})
        last = n_stages - 1 in self.stage_ids
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.schedule = None  # built by `build_schedule`, after the other plans wrapped the stages
        self.device = torch.device("cpu")  # where the stages compute (NCCL reduces tensors there)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def train(self, mode: bool = True):
        for s in self.stages:
            s.train(mode)
        return super().train(mode)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipelined model runs through its schedule: forward_backward or evaluate")

    def build_schedule(self, device: torch.device) -> None:
        self.device = torch.device(device)
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        # torch's PipelineStage objects, one per stage module (what the schedule drives)
        self.pipeline_stages = [PipelineStage(m, s, self.n_stages, device, group=self.pp_group)
                                for m, s in zip(self.stages, self.stage_ids)]  # fmt: skip
        stages = self.pipeline_stages
        n = self.options.n_microbatches
        if self.options.schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(stages, n, loss_fn=self._loss)
        else:
            kind = Schedule1F1B if self.options.schedule == "1f1b" else ScheduleGPipe
            self.schedule = kind(stages[0], n, loss_fn=self._loss)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tp_mesh is not None:  # the head's vocabulary shards, for the loss_parallel cross-entropy
            from torch.distributed.tensor import DTensor, Shard

            logits = DTensor.from_local(logits, self.tp_mesh, [Shard(-1)], run_check=False)
        return lm_loss(logits, targets)

    def _run(self, micro_batches, evaluate: bool, autocast, loss_parallel) -> list[torch.Tensor]:
        for s in self.stages:
            s.records.clear()
        if len(micro_batches) != self.options.n_microbatches:
            raise ValueError(
                f"the schedule takes {self.options.n_microbatches} micro-batches, got {len(micro_batches)}"
            )
        inputs = torch.cat([i for i, _ in micro_batches])  # the schedule splits them back, evenly
        targets = torch.cat([t for _, t in micro_batches])
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        run = self.schedule.eval if evaluate else self.schedule.step
        with loss_parallel(), autocast():
            run(*args, target=targets, losses=losses)
        return losses

    def forward_backward(self, micro_batches, aux_loss_weight: float, autocast, loss_parallel):
        """One step's forward and backward over the micro-batches (gradients accumulated as their
        mean). Returns the step's losses (means over micro-batches), tokens per expert of every MoE
        layer, dropped and routed pairs: summed over the pipeline (every rank gets them), as the
        one-process step reports them."""
        for s in self.stages:
            s.aux_loss_weight = aux_loss_weight
        lm = self._run(micro_batches, False, autocast, loss_parallel)
        return self._pipeline_stats(lm, aux_loss_weight)

    def evaluate(self, micro_batches, autocast, loss_parallel) -> torch.Tensor:
        """The summed cross-entropy of the micro-batches (no gradients), on every pp rank."""
        lm = self._run(micro_batches, True, autocast, loss_parallel)
        n_tokens = sum(t.numel() for _, t in micro_batches)
        total = sum(float(x) for x in lm) * n_tokens / len(micro_batches)
        total = torch.tensor(total, dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.pp_group)
        return total.cpu()

    def _pipeline_stats(self, lm: list[torch.Tensor], aux_loss_weight: float):
        n = self.options.n_microbatches
        weights = balance_weights(self.config)
        names = sorted(weights)
        moe_ids = [i for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i)]
        # [lm, each balance loss, each one's presence, dropped, pairs] and the (MoE layers, E) loads
        scalars = torch.zeros(1 + 2 * len(names) + 2, dtype=torch.float64)
        loads = torch.zeros(len(moe_ids), self.config.n_routed_experts, dtype=torch.float64)
        scalars[0] = sum(float(x.detach()) for x in lm) / n
        for s in self.stages:
            # the last n: the schedule's first step also runs a forward to infer the stages' shapes
            for totals, stats in s.records[-n:]:
                for k, name in enumerate(names):
                    if name in totals:
                        scalars[1 + k] += float(totals[name]) / n
                        scalars[1 + len(names) + k] = 1.0
                for i, st in stats.items():
                    loads[moe_ids.index(i)] += st.tokens_per_expert.detach().double().cpu()
                    scalars[-2] += float(st.dropped)
                    scalars[-1] += float(st.pairs)
        scalars, loads = scalars.to(self.device), loads.to(self.device)
        dist.all_reduce(scalars, group=self.pp_group)
        dist.all_reduce(loads, group=self.pp_group)
        scalars, loads = scalars.cpu(), loads.cpu()
        losses = {"lm_loss": float(scalars[0])}
        aux = 0.0
        for k, name in enumerate(names):
            if scalars[1 + len(names) + k] > 0:
                losses[name] = float(scalars[1 + k])
                aux += weights[name] * losses[name]
        losses["loss"] = losses["lm_loss"] + aux_loss_weight * aux
        tokens = {i: loads[j].float() for j, i in enumerate(moe_ids)}
        return losses, tokens, float(scalars[-2]), float(scalars[-1])


def pipeline_group(model):
    """The group of ranks holding the model's other stages; None when it is not pipelined."""
    return model.pp_group if isinstance(model, PipelinedModel) else None
