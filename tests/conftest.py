import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the whole test session (starting Ray costs 5-10 s on 2 CPUs).

    4 logical CPUs on a 2-core machine so a trainer's workers, Ray Data's tasks and a Serve
    replica can coexist without starving each other (see DESIGN.md on ResourceBudget hangs)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("MORAY_HOME", str(tmp_path_factory.mktemp("moray_home")))
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
