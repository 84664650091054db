"""Parallelism applied from outside the model (torchtitan's `parallelize`), in a fixed order:

    1. tensor parallel      attention heads, MLP channels and the vocabulary split over "tp"
    2. expert parallel      routing decided over the whole batch; routed experts split over "ep"
    3. pipeline split       contiguous layers per stage over "pp"; this rank keeps its stages
                            (a PipelinedModel: the same modules under the same names)
    4. activation checkpointing
    5. data parallelism, FSDP2 `fully_shard`: routed experts over "dp_mod_ep" (the ranks that hold
       the same experts), every transformer block over "dp", then the root (each pipeline stage's);
       or, with the layout's dp_mode "replicate", DDP's `replicate` of the whole model (in bf16 on
       the CPU, the training loop's WorkingWeights average the gradients instead)

The model stays single-device code; the layout (moray.platform.parallel.ParallelLayout) says what
to apply. Tensor and expert parallelism go first, on the whole model: the split keeps the modules
they replaced, so it may as well come after them.
"""

from __future__ import annotations

import torch
from torch import nn

from moray.model.moe import MoE
from moray.platform.expert_parallel import apply_expert_parallel, install_global_tokens
from moray.platform.parallel import ParallelLayout
from moray.platform.pipeline_parallel import PipelinedModel, PipelineOptions
from moray.platform.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, layout: ParallelLayout, mesh, pipeline: PipelineOptions | None = None,
                device: torch.device | str = "cpu") -> nn.Module:  # fmt: skip
    """The model as this rank trains it: `model` itself, parallelized in place, or with pp > 1 a
    PipelinedModel of this rank's stages (scheduled by `pipeline`)."""
    if mesh is None:
        return model
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if layout.dp > 1:
        # Capacity and the balance losses over every data-parallel rank's tokens, as one process
        # would decide them on the whole batch (the tp ranks of a data-parallel rank share its tokens).
        install_global_tokens(model, mesh["dp"].get_group())
    if layout.ep > 1:
        apply_expert_parallel(model, mesh["ep"])
    roots = [model]
    if layout.pp > 1:
        model = PipelinedModel(model, layout, mesh, pipeline or PipelineOptions())
        roots = model.stages
    if layout.dp > 1 and layout.dp_mode == "replicate":
        if not layout.working_weights:  # (which average the replicas' gradients themselves)
            _apply_replicate(model, layout, mesh)
    elif layout.dp > 1:
        _apply_fsdp(roots, layout, mesh)
    if layout.pp > 1:
        model.build_schedule(torch.device(device))
    return model


def _mixed_precision(layout: ParallelLayout) -> dict:
    """On GPUs FSDP2's gathered parameters are cast to bf16 for compute; master weights,
    gradient reduction and optimizer state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if layout.compute_dtype == torch.float32:
        return {}
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=layout.compute_dtype, reduce_dtype=torch.float32)}


def _apply_replicate(model: nn.Module, layout: ParallelLayout, mesh) -> None:
    """Every data-parallel rank holds the whole model and its optimizer state; gradients are
    all-reduced once per step (`sync_gradients`), in 25 MB buckets as the backward fills them.

    This is DDP's C++ Reducer (the composable `replicate`, which keeps the module's class and
    names). Its all-reduces run on gloo's own threads while the backward goes on: FSDP2's
    `replicate` issues one blocking all-reduce per block on the CPU (no streams), measured here at
    2.0-2.3 s a step against DDP's 1.2-1.5 s. Buffers are not broadcast: every rank updates them
    from the same global token counts. bf16 compute is autocast's (the layout's), over fp32
    parameters, gradients and all-reduces, on GPUs; on the CPU bf16 replicas take the working
    weights instead (DDP takes only gradients of its parameters' dtype, and casting the weights
    each micro-batch costs the CPU most of bf16's gain)."""
    from torch.distributed._composable.replicate import replicate

    replicate(
        model,
        process_group=mesh["dp"].get_group(),
        bucket_cap_mb=25,
        gradient_as_bucket_view=True,  # no copy between the gradients and the buckets
        broadcast_buffers=False,
    )


def sync_gradients(model: nn.Module, now: bool) -> None:
    """Whether the coming backward reduces gradients over the data-parallel ranks. A replicated
    model accumulates its micro-batches locally and all-reduces after the last (DDP's `no_sync`);
    a sharded one reduce-scatters each micro-batch (holding whole gradients would undo the sharding)."""
    from torch.distributed._composable.replicate import DDP

    if isinstance(model, DDP):
        model.set_requires_gradient_sync(now)


def _apply_fsdp(roots: list[nn.Module], layout: ParallelLayout, mesh) -> None:
    """Shard parameters, gradients and optimizer state over the data-parallel ranks.

    Expert shards are sharded over "dp_mod_ep" only (the other ranks hold other experts). Their
    gradients arrive summed over the ep ranks that sent them tokens, so FSDP divides their sum over
    "dp_mod_ep" by the whole dp, not by its own size: the mean over every data-parallel rank."""
    from torch.distributed.fsdp import fully_shard

    options = _mixed_precision(layout)
    for root in roots:
        for block in root.layers.children():
            if layout.ep > 1 and isinstance(block.mlp, MoE):
                fully_shard(block.mlp.experts, mesh=mesh["dp_mod_ep"], **options)
                block.mlp.experts.set_gradient_divide_factor(layout.dp)
            fully_shard(block, mesh=mesh["dp"], **options)
        # A pipeline stage's root is resharded after its forward too (FSDP keeps a root's parameters
        # gathered otherwise): its parameters, seen through PipelinedModel, are then always shards.
        fully_shard(root, mesh=mesh["dp"], reshard_after_forward=layout.pp > 1, **options)
