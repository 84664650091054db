"""Parallelism applied from outside the model (torchtitan's `parallelize`), in a fixed order:

    1. tensor parallel      attention heads, MLP channels and the vocabulary split over "tp"
    2. expert parallel      routing decided over the whole batch; routed experts split over "ep"
    3. pipeline split       (issue: pipeline parallelism; not yet)
    4. activation checkpointing
    5. FSDP2 `fully_shard`: routed experts over "dp_mod_ep" (the ranks that hold the same
       experts), every transformer block over "dp", then the root

The model stays single-device code; the layout (moray.platform.parallel.ParallelLayout) says what
to apply. Until its plan lands, the config refuses pp above 1.
"""

from __future__ import annotations

import torch
from torch import nn

from moray.model.moe import MoE
from moray.platform.expert_parallel import apply_expert_parallel, install_global_tokens
from moray.platform.parallel import ParallelLayout
from moray.platform.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, layout: ParallelLayout, mesh) -> nn.Module:
    if layout.pp > 1:
        raise NotImplementedError(f"pipeline parallelism is not implemented; got {layout.describe()}")
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
    if layout.dp > 1:
        _apply_fsdp(model, layout, mesh)
    return model


def _apply_fsdp(model: nn.Module, layout: ParallelLayout, mesh) -> None:
    """Shard parameters, gradients and optimizer state over the data-parallel ranks. On GPUs the
    all-gathered parameters are cast to bf16 for compute; master weights, gradient reduction and
    optimizer state stay fp32.

    Expert shards are sharded over "dp_mod_ep" only (the other ranks hold other experts). Their
    gradients arrive summed over the ep ranks that sent them tokens, so FSDP divides their sum over
    "dp_mod_ep" by the whole dp, not by its own size: the mean over every data-parallel rank."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {}
    if layout.compute_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=layout.compute_dtype, reduce_dtype=torch.float32
        )
    for block in model.layers:
        if layout.ep > 1 and isinstance(block.mlp, MoE):
            fully_shard(block.mlp.experts, mesh=mesh["dp_mod_ep"], **options)
            block.mlp.experts.set_gradient_divide_factor(layout.dp)
        fully_shard(block, mesh=mesh["dp"], **options)
    fully_shard(model, mesh=mesh["dp"], **options)
