"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), verified on load.

Each rank writes its DCP shard (rank 0 also the metadata) into its own staging directory and
reports it to Ray Train, which merges the ranks' files into one checkpoint directory in run
storage. Every rank also writes `manifest-rank{r}.json` with the sha256 of its files; rank 0's
names the world size and the training state that is not a tensor (step, RNG, the capacity
controller, the MLflow run). On load, a checkpoint counts as valid only if every rank's manifest
is there and every checksum matches; otherwise the next older one is used, with a warning.

DCP reshards on load, so a checkpoint written by N ranks restores onto M (elastic runs).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from moray.platform.files import sha256_file
from moray.platform.storage import Storage

log = logging.getLogger("moray.pretrain")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Optimizer state keyed by parameter name, its hyper-parameters too: pipeline ranks hold different
# parameter groups, and DCP would keep only one rank's copy of an unflattened `param_groups` list.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def save(directory: Path, model, optimizer, extra: dict, rank: int, world_size: int, group=None) -> dict:
    """Collective over `group` (default: every rank): each rank calls it with its own (empty)
    staging directory. Returns this rank's manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_FLAT)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory), process_group=group)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = {"rank": rank, "world_size": world_size, "files": files}
    if rank == 0:
        manifest["state"] = extra
    (directory / f"manifest-rank{rank}.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def verify(storage: Storage, directory: str) -> dict:
    """Rank 0's manifest if the checkpoint is complete and intact; raises ValueError otherwise."""
    head = posixpath.join(directory, "manifest-rank0.json")
    if not storage.exists(head):
        raise ValueError(f"{directory}: no manifest-rank0.json (partial checkpoint)")
    m0 = json.loads(storage.read_bytes(head))
    for r in range(m0["world_size"]):
        mf = posixpath.join(directory, f"manifest-rank{r}.json")
        if not storage.exists(mf):
            raise ValueError(f"{directory}: rank {r}'s manifest is missing (partial checkpoint)")
        for name, digest in json.loads(storage.read_bytes(mf))["files"].items():
            path = posixpath.join(directory, name)
            if not storage.exists(path):
                raise ValueError(f"{directory}: {name} is missing")
            if storage.sha256(path) != digest:
                raise ValueError(f"{directory}: {name} fails its checksum (corrupt)")
    return m0


def latest_valid(storage: Storage, run_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint under run_dir that verifies; warns about each one skipped."""
    found = sorted(
        (int(m[1]), name) for name in storage.list_dirs(run_dir) if (m := CHECKPOINT_RE.match(name))
    )
    for _, name in reversed(found):
        path = posixpath.join(run_dir, name)
        try:
            return path, verify(storage, path)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            log.warning("skipping checkpoint %s: %s; trying the previous one", name, e)
    return None


def load(storage: Storage, directory: str, model, optimizer, group=None) -> None:
    """Collective over `group` (default: every rank): restore model and optimizer, resharding onto
    the current layout. A checkpoint on remote storage is downloaded to a local staging directory first."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_FLAT)
    state = {"model": model_sd, "optim": optim_sd}
    if storage.is_local:
        dcp.load(state, checkpoint_id=directory, process_group=group)
    else:
        with tempfile.TemporaryDirectory() as local:
            dcp.load(
                state, checkpoint_id=str(storage.download_dir(directory, Path(local))), process_group=group
            )
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_FLAT
    )


def full_model_state(model, pipeline_group=None, group=None) -> dict[str, torch.Tensor]:
    """The unsharded model weights on CPU, on every rank of `group` (default: all; collective under
    FSDP); with a `pipeline_group`, every stage's weights, gathered from the group's ranks."""
    # (cpu_offload=True would gather on global rank 0 only, and a pipeline's other stages live elsewhere)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}  # a copy, not the live weights
    if pipeline_group is not None:
        parts = [None] * dist.get_world_size(pipeline_group)
        dist.all_gather_object(parts, state, group=pipeline_group)
        state = {k: v for part in parts for k, v in part.items()}
    if dist.is_initialized():
        dist.barrier(group=group)
    return state
