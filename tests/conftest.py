import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ray gives its node 30 s to come up; a loaded 2-core machine (a benchmark or a build beside the
# tests) can take longer to start the dashboard agent, and the whole session would fail.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


def pytest_sessionstart(session):
    """Build moray's CPU kernels once, up front: bf16 training and decode use them in Ray's workers
    and replicas too, which would otherwise wait out the 30-60 s compile inside a test."""
    from moray.model import cpu_kernels

    cpu_kernels.kernel()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the whole test session (starting Ray costs 5-10 s on 2 CPUs).

    4 logical CPUs on a 2-core machine so a trainer's workers, Ray Data's tasks and a Serve
    replica can coexist without starving each other (see DESIGN.md on ResourceBudget hangs).
    Ray's Prometheus endpoint is on a free port, `ray_local.metrics_url` (see test_prometheus)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("MORAY_HOME", str(tmp_path_factory.mktemp("moray_home")))
    from moray.platform.cluster import connect
    from moray.platform.ports import free_port

    port = free_port()

    connect(  # the jobs' own way in: a local Ray on loopback (tests/jobs/serve/test_listeners.py checks it)
        num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
        _metrics_export_port=port,
    )  # fmt: skip
    ray.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield ray
    ray.shutdown()
