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
import re
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

log = logging.getLogger("moray.pretrain")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def save(directory: Path, model, optimizer, extra: dict, rank: int, world_size: int) -> None:
    """Collective: every rank calls it with its own (empty) staging directory."""
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = {"rank": rank, "world_size": world_size, "files": files}
    if rank == 0:
        manifest["state"] = extra
    (directory / f"manifest-rank{rank}.json").write_text(json.dumps(manifest, indent=1))


def verify(directory: Path) -> dict:
    """Rank 0's manifest if the checkpoint is complete and intact; raises ValueError otherwise."""
    head = directory / "manifest-rank0.json"
    if not head.is_file():
        raise ValueError(f"{directory}: no manifest-rank0.json (partial checkpoint)")
    m0 = json.loads(head.read_text())
    for r in range(m0["world_size"]):
        mf = directory / f"manifest-rank{r}.json"
        if not mf.is_file():
            raise ValueError(f"{directory}: rank {r}'s manifest is missing (partial checkpoint)")
        for name, digest in json.loads(mf.read_text())["files"].items():
            path = directory / name
            if not path.is_file():
                raise ValueError(f"{directory}: {name} is missing")
            if sha256_file(path) != digest:
                raise ValueError(f"{directory}: {name} fails its checksum (corrupt)")
    return m0


def latest_valid(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint under run_dir that verifies; warns about each one skipped."""
    if not run_dir.is_dir():
        return None
    found = sorted(
        (int(m[1]), p) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    )
    for _, path in reversed(found):
        try:
            return path, verify(path)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            log.warning("skipping checkpoint %s: %s; trying the previous one", path.name, e)
    return None


def load(directory: Path, model, optimizer) -> None:
    """Collective: restore model and optimizer, resharding onto the current world size."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The unsharded model weights on CPU, on every rank (collective under FSDP)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.is_initialized():
        dist.barrier()
    return state
