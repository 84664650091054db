"""Parallelism applied from outside the model (torchtitan's `parallelize`), in a fixed order:

    1. tensor parallel      (issue: expert and tensor parallelism)
    2. expert parallel      (same)
    3. pipeline split       (issue: pipeline parallelism)
    4. activation checkpointing
    5. FSDP2 `fully_shard` over the data-parallel ranks, per transformer block then the root

The model stays single-device code; the layout (moray.platform.parallel.ParallelLayout) says what
to apply. Until their plans land, the config refuses tp, pp and ep above 1.
"""

from __future__ import annotations

import torch
from torch import nn

from moray.platform.parallel import ParallelLayout


def parallelize(model: nn.Module, layout: ParallelLayout, mesh) -> nn.Module:
    if layout.tp > 1 or layout.ep > 1 or layout.pp > 1:
        raise NotImplementedError(f"only data parallelism is implemented; got {layout.describe()}")
    if mesh is not None and layout.dp > 1:
        _apply_fsdp(model, layout, mesh["dp"])
    return model


def _apply_fsdp(model: nn.Module, layout: ParallelLayout, dp_mesh) -> None:
    """Shard parameters, gradients and optimizer state over the data-parallel ranks. On GPUs the
    all-gathered parameters are cast to bf16 for compute; master weights, gradient reduction and
    optimizer state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {}
    if layout.compute_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=layout.compute_dtype, reduce_dtype=torch.float32
        )
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, **options)
    fully_shard(model, mesh=dp_mesh, **options)
