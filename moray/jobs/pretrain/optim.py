"""Optimizers, gradient clipping and the learning-rate schedule for pre-training.

- `adamw`: torch.optim.AdamW.
- `lamb_adam`: Adam's element-wise update m_hat / (sqrt(v_hat) + eps), scaled per parameter
  tensor (a "layer") by LAMB's trust ratio ||w|| / ||update||, with decoupled weight decay
  (applied to the weight directly, not through the update). Optionally the decay adapts per
  parameter group to the gradient statistics: lambda_t = lambda * EMA(||g|| / ||w||) /
  EMA_0, so groups whose gradients are large relative to their weights are decayed harder.
- Clipping per layer (each transformer block's parameters) and per expert (each routed expert's
  slice of the stacked weights), and optionally globally.
- Schedule: linear warmup, optionally with a sinusoidal oscillation on top of the ramp, then
  cosine decay or warmup-stable-decay (WSD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class LambAdam(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        max_trust_ratio: float = 10.0,
        adaptive_weight_decay: bool = False,
        awd_beta: float = 0.99,
        norm_group=None,  # the pipeline's group: the adaptive decay's norms span every stage
    ):
        self.norm_group = norm_group
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(
                f"bad LambAdam hyper-parameters: lr={lr} betas={betas} eps={eps} wd={weight_decay}"
            )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio,
                        adaptive_weight_decay=adaptive_weight_decay, awd_beta=awd_beta)  # fmt: skip
        super().__init__(params, defaults)

    @staticmethod
    def _norm(t: torch.Tensor) -> float:
        """Norm of the whole tensor, also when FSDP2 shards it (a DTensor)."""
        n = torch.linalg.vector_norm(t)
        return float(n.full_tensor() if hasattr(n, "full_tensor") else n)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            wd = group["weight_decay"]
            if group["adaptive_weight_decay"] and wd > 0:
                wd = self._adaptive_decay(group, wd)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                w_norm, u_norm = self._norm(p), self._norm(update)
                trust = min(w_norm / u_norm, group["max_trust_ratio"]) if w_norm > 0 and u_norm > 0 else 1.0
                if wd > 0:  # decoupled: decay the weight itself, not through the adaptive update
                    p.mul_(1 - group["lr"] * wd)
                p.add_(update, alpha=-group["lr"] * trust)
        return loss

    def _adaptive_decay(self, group: dict, wd: float) -> float:
        squares = torch.tensor([sum(self._norm(p.grad) ** 2 for p in group["params"] if p.grad is not None),
                                sum(self._norm(p) ** 2 for p in group["params"])], dtype=torch.float64,
                               device=group["params"][0].device)  # fmt: skip
        if self.norm_group is not None:
            dist.all_reduce(squares, group=self.norm_group)
        g_norm, w_norm = squares.sqrt().tolist()
        ratio = g_norm / max(w_norm, 1e-12)
        ema = group.get("awd_ema")
        group["awd_ema"] = ratio if ema is None else group["awd_beta"] * ema + (1 - group["awd_beta"]) * ratio
        group.setdefault("awd_ref", group["awd_ema"])
        return wd * group["awd_ema"] / max(group["awd_ref"], 1e-12)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW that also refreshes bf16 working copies of its parameters
    (moray.jobs.pretrain.working_weights) in its CPU step: `copies` maps a parameter to its copy,
    written from the updated fp32 weight in the same pass (moray.model.cpu_kernels.adamw_step_, torch's
    fused update op for op: 66 ms a step for the small preset's 84M parameters, against 61 for torch's
    update and 29 for the separate cast of its 80M working weights). After each
    such step `refreshed` holds the parameters' (version, storage) when their copies were written:
    any later change to a parameter shows as another version. Without copies, or where the kernel
    cannot run (GPU tensors, DTensors, amsgrad or maximize), torch's own step; the state is torch's
    either way (checkpoints interchange). One difference: a clip's `grad_scale` scales the gradients
    as the kernel reads them, where torch's writes the scaled gradients back.

    Replicas on one machine split the step between them (`shared_update`, set by the working
    weights: moray.jobs.pretrain.shared_update): this rank's part of the shared weights."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copies: dict[torch.Tensor, torch.Tensor] = {}
        self.refreshed: dict[torch.Tensor, tuple[int, int]] = {}
        self.shared_update = None  # SharedUpdate

    def _kernel_takes(self, params: list[torch.Tensor]) -> bool:
        from moray.model import cpu_kernels

        return self.plain() and cpu_kernels.adamw_usable(*params, *(p.grad for p in params))

    def plain(self) -> bool:
        """Without the options the kernel does not run (a loaded state dict may bring them)."""
        return all(not (g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"])
                   for g in self.param_groups)  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        if self.shared_update is not None:
            loss = closure() if closure is not None else None
            self.shared_update.step(getattr(self, "grad_scale", None))
            self.refreshed = {p: (p._version, p.data_ptr()) for p in self.copies}
            return loss
        with_grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not self.copies or not with_grads or not self._kernel_takes(with_grads):
            self.refreshed.clear()
            return super().step(closure)
        from moray.model import cpu_kernels

        loss = closure() if closure is not None else None
        scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:  # as torch initializes it
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            beta1, beta2 = group["betas"]
            cpu_kernels.adamw_step_(
                params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params], [self.copies.get(p) for p in params],
                [float(self.state[p]["step"]) for p in params], float(group["lr"]), beta1, beta2,
                group["weight_decay"], group["eps"], 1.0 if scale is None else float(scale),
            )  # fmt: skip
        self.refreshed = {p: (p._version, p.data_ptr()) for p in with_grads if p in self.copies}
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8,
                    adaptive_weight_decay: bool = False, pipeline_group=None) -> torch.optim.Optimizer:  # fmt: skip
    """Two groups: matrices decay, vectors (norms, biases, router biases, betas, scales) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        # fused: one kernel per step instead of a dozen passes over every tensor (foreach), 5x
        # faster on the CPU at 100M parameters (92 vs 474 ms). It takes all DTensors or none: tensor
        # parallelism leaves some parameters plain, and those layouts keep foreach.
        kinds = {type(p) for p in decay + no_decay}
        return AdamW(groups, lr=lr, betas=betas, eps=eps, fused=len(kinds) == 1 or None)
    if name == "lamb_adam":
        return LambAdam(groups, lr=lr, betas=betas, eps=eps, adaptive_weight_decay=adaptive_weight_decay,
                        norm_group=pipeline_group)  # fmt: skip
    raise ValueError(f"optimizer {name!r}: use 'adamw' or 'lamb_adam'")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def total_norm(grads: list[torch.Tensor], group=None, squares: float = 0.0) -> float:
    """The 2-norm of all these whole tensors together, when some are sharded (DTensors, possibly on
    different meshes: FSDP's "dp", the expert shards' "dp_mod_ep" x "ep"), and, with a `group` (the
    pipeline's), with the tensors the group's other ranks pass; `squares`: other tensors' sum of
    squares, known already. Tensors sharing a mesh and placements are reduced together, one
    collective per kind."""
    kinds: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        kinds.setdefault((getattr(g, "device_mesh", None), tuple(getattr(g, "placements", ()))), []).append(g)
    for gs in kinds.values():
        if all(type(g) is torch.Tensor and g.is_cpu and g.dtype == torch.float32 for g in gs):
            # BLAS's dot: 3x faster than vector_norm's reduction on the CPU (1.3 against 3.9 ms for
            # 16.8M values on 2 cores), the sum of squares it is after
            squares += float(sum(torch.dot(g.reshape(-1), g.reshape(-1)) for g in gs))
            continue
        n = torch.nn.utils.get_total_norm(gs, 2.0)
        squares += float(n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2
    if group is not None:  # on the gradients' device: NCCL reduces GPU tensors only
        device = grads[0].device if grads else ("cuda" if torch.cuda.is_available() else "cpu")
        total = torch.tensor(squares, dtype=torch.float64, device=device)
        dist.all_reduce(total, group=group)
        squares = float(total)
    return math.sqrt(squares)


def takes_grad_scale(optimizer) -> bool:
    """Whether `optimizer`'s step divides the gradients by a `grad_scale` on its way through them
    (fused Adam/AdamW: the attribute torch.amp.GradScaler hands it)."""
    if getattr(optimizer, "shared_update", None) is not None:
        return True
    # the groups' own flags: a loaded state dict brings the saving optimizer's
    return isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in optimizer.param_groups)


def _clip_(params: list[torch.Tensor], max_norm: float, group=None, optimizer=None, squares=None) -> float:
    """Scales the gradients of `params` to a total norm of at most `max_norm`; or, given an optimizer
    that `takes_grad_scale`, leaves the scaling to its next step (one pass over the gradients fewer:
    20 of a bf16 step's 570 ms on the small preset). `squares`: id(parameter) -> its gradient's sum
    of squares, where known (WorkingWeights.squares). Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    shared = getattr(optimizer, "shared_update", None)  # the gradient's parts are on their ranks
    if not grads and group is None and shared is None:
        return 0.0
    if shared is not None:
        norm = shared.grad_norm()
    else:
        squares = squares or {}
        rest = [p.grad for p in params if p.grad is not None and id(p) not in squares]
        known = sum(squares[id(p)] for p in params if p.grad is not None and id(p) in squares)
        norm = total_norm(rest, group, known)
    clipped = norm > max_norm
    if optimizer is not None:
        device = grads[0].device if grads else "cpu"
        optimizer.grad_scale = torch.tensor((norm + 1e-6) / max_norm, device=device) if clipped else None
    elif clipped:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            _local(g).mul_(scale)
    return norm


def clip_gradients(model: nn.Module, per_layer: float | None, per_expert: float | None,
                   global_norm: float | None, pipeline_group=None, optimizer=None,
                   squares: dict | None = None) -> dict[str, float]:  # fmt: skip
    """Clip per routed expert (each expert's rows of the stacked weights), then per transformer
    block, then globally (over every pipeline stage's parameters when `pipeline_group` is given;
    by `optimizer`'s next step where it `takes_grad_scale`; taking the gradients' sums of squares
    from `squares` where the working weights computed them). Returns the global grad norm before
    clipping and the clip counts."""
    stats = {"experts_clipped": 0, "layers_clipped": 0}
    if getattr(optimizer, "shared_update", None) is not None and (per_layer, per_expert) != (None, None):
        raise ValueError(
            "clipping per layer or per expert needs every rank to hold the whole mean gradient: "
            "build the working weights with shard_optimizer=False"
        )
    if per_expert is not None:
        for module in model.modules():
            if hasattr(module, "gate_up_proj") and isinstance(
                getattr(module, "gate_up_proj", None), nn.Parameter
            ):
                gu, down = module.gate_up_proj.grad, module.down_proj.grad
                if gu is None or down is None:
                    continue
                # Sharded or not, a rank holds whole experts (the stacks are split on dim 0).
                gu, down = _local(gu), _local(down)
                norms = (gu.flatten(1).pow(2).sum(1) + down.flatten(1).pow(2).sum(1)).sqrt()  # (E,)
                scale = (per_expert / (norms + 1e-6)).clamp(max=1.0)
                stats["experts_clipped"] += int((scale < 1).sum())
                gu.mul_(scale[:, None, None])
                down.mul_(scale[:, None, None])
    if per_layer is not None:
        for block in model.layers.children():
            norm = _clip_(list(block.parameters()), per_layer)
            stats["layers_clipped"] += int(norm > per_layer)
    stats["grad_norm"] = _clip_(
        list(model.parameters()), global_norm if global_norm is not None else math.inf, pipeline_group,
        optimizer if optimizer is not None and takes_grad_scale(optimizer) else None,
        squares if (per_layer, per_expert) == (None, None) else None,  # else the gradients have changed
    )  # fmt: skip
    return stats


@dataclass
class Schedule:
    """lr multiplier at a step: warmup (with optional oscillation), then cosine or WSD decay."""

    max_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"  # "cosine" | "wsd" | "constant"
    min_ratio: float = 0.1  # floor of the decay, as a fraction of the peak lr
    decay_fraction: float = 0.2  # WSD: the last fraction of training decays
    warmup_oscillation: float = 0.0  # amplitude of the sinusoid on the warmup ramp (0: off)
    warmup_periods: float = 2.0  # full sine periods over the warmup

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "wsd", "constant"):
            raise ValueError(f"kind={self.kind!r}: use 'cosine', 'wsd' or 'constant'")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps}]")
        if not 0 <= self.warmup_oscillation < 1:
            raise ValueError(f"warmup_oscillation={self.warmup_oscillation} must be in [0, 1)")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            ramp = (step + 1) / self.warmup_steps
            wave = 1 + self.warmup_oscillation * math.sin(2 * math.pi * self.warmup_periods * ramp)
            return ramp * wave
        if self.kind == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        start = 1 - self.decay_fraction  # WSD: stable until `start`, then linear decay to the floor
        if progress <= start:
            return 1.0
        return 1 - (1 - self.min_ratio) * (progress - start) / self.decay_fraction
