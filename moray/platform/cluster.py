"""Connecting to Ray: `RAY_ADDRESS` when set (a cluster, `ray job submit`, KubeRay), else a local
Ray started in this process (token authentication on, as Ray's local default)."""

from __future__ import annotations

import os


def connect(**kwargs):
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({} if address else kwargs))
    return ray
