"""Connecting to Ray: `RAY_ADDRESS` when set (a cluster, `ray job submit`, KubeRay), else a local
Ray started in this process: on 127.0.0.1 only, with token authentication (Ray's local default).

A local Ray is for this machine, so its servers (GCS, raylet, object manager, every worker's and
actor's gRPC server, the dashboard agent with its Prometheus metrics, the runtime-env agent) listen
on loopback. `MORAY_RAY_NODE_IP=10.0.0.5` gives the local Ray that node address instead; Ray then
listens on every interface (it knows only "loopback" and "all"), and its token guards the RPCs."""

from __future__ import annotations

import contextlib
import os

NODE_IP_VARIABLE = "MORAY_RAY_NODE_IP"
LOOPBACK = "127.0.0.1"

# Ray's settings for every process of a Ray that moray runs on: a local one inherits them from the
# process that starts it (`ray_environment`), a deployed cluster's pods have them in their
# environment (moray.platform.deploy). A cluster of your own `ray start`s needs them exported first.
RAY_ENVIRONMENT = {
    # Serve's proxies send each request to its replica and take the streamed response back over
    # gRPC, not as Ray actor calls with an object per streamed chunk: a streamed token costs the
    # proxy and the replica less CPU (bench_serve, all at once: moray-bf16 +16% output tokens/s).
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


def ray_environment() -> None:
    """Put RAY_ENVIRONMENT into this process's environment, for the Ray processes it starts to
    inherit; a variable already set (say, to turn one off) is left alone."""
    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def local_node_ip() -> str:
    return os.environ.get(NODE_IP_VARIABLE, "").strip() or LOOPBACK


@contextlib.contextmanager
def _loopback_node():
    """Ray turns a node IP of 127.0.0.1 into the machine's address (`resolve_ip_for_localhost`) unless
    its clusters are switched off, and then binds everything to all interfaces. With them off, the node
    IP stays 127.0.0.1 and Ray's C++ and Python servers bind to it. The variable is read on import, by
    the processes `ray.init` starts (they inherit it) and by this one (hence the constant); both are
    put back afterwards, so a later connection to a real cluster from this process is unaffected."""
    from ray._private import ray_constants

    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(variable), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved_env


def connect(**kwargs):
    """`ray.init` once per process. `kwargs` (num_cpus, include_dashboard, ...) apply to a local Ray
    only; with `RAY_ADDRESS` set the cluster's own settings hold."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return ray
    from ray._private.services import canonicalize_bootstrap_address

    node_ip = local_node_ip()
    if canonicalize_bootstrap_address(None) is not None:  # a `ray start` on this machine: join it
        ray.init()
        return ray
    ray_environment()
    if node_ip == LOOPBACK:
        with _loopback_node():
            ray.init(**kwargs)
    else:
        ray.init(_node_ip_address=node_ip, **kwargs)
    return ray


def known_cpus() -> float | None:
    """The CPUs of the Ray that `connect` uses, where known before connecting: the connected Ray's,
    or this machine's for a local Ray still to start. None for a cluster by address, which may
    autoscale."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 0.0))
    from ray._private.services import canonicalize_bootstrap_address

    if os.environ.get("RAY_ADDRESS") or canonicalize_bootstrap_address(None) is not None:
        return None
    from ray._private.utils import get_num_cpus

    return float(get_num_cpus())
