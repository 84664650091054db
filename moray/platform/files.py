"""File helpers shared by the jobs: checksums for shard manifests and checkpoint manifests."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_stream(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)
