"""Parallelism applied from outside the model (torchtitan style).

The device mesh has the named dimensions (dp, pp, ep, tp); data parallelism takes what the
others leave. Data parallelism is FSDP2 (`fully_shard`), per transformer block then the root.
Tensor, pipeline and expert plans plug in here, each as a function of (model, mesh), applied
before FSDP; until they land, the config refuses sizes other than 1 for them.
"""

from __future__ import annotations

from torch import nn

from moray.jobs.pretrain.config import ParallelSection

MESH_DIMS = ("dp", "pp", "ep", "tp")


def build_mesh_shape(parallel: ParallelSection, world_size: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    other = parallel.pp * parallel.ep * parallel.tp
    if world_size % other:
        raise ValueError(f"world size {world_size} is not divisible by pp*ep*tp={other}")
    return (world_size // other, parallel.pp, parallel.ep, parallel.tp), MESH_DIMS


def parallelize(model: nn.Module, mesh, parallel: ParallelSection) -> nn.Module:
    if mesh is None or mesh["dp"].size() == 1:
        return model  # one data-parallel rank: plain single-device training
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["dp"]
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model
