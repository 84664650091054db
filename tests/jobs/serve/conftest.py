from types import SimpleNamespace

import pytest

from moray.platform.ports import free_port
from tests.actors.engine_fixtures import make_model_dir

API_KEY = "sk-moray-test"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_hf_serve"))


@pytest.fixture(scope="package")
def serve_app(ray_local, tiny_model_dir):
    """One moray Serve application (HTTP + gRPC) for this test package, on localhost ports; shut down
    when the package is done so later Ray tests in the session get the CPUs back."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from moray.jobs.serve.app import GRPC_SERVICER, build_app

    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    settings = {
        "model": str(tiny_model_dir),
        "served_model_name": "tiny",
        "api_keys": [API_KEY],
        "engine": {"max_num_seqs": 4, "max_waiting": 4},
        "torch_threads": 1,
    }
    serve.run(build_app(settings), name="moray", route_prefix="/moray")
    try:
        yield SimpleNamespace(
            base_url=f"http://127.0.0.1:{http_port}/moray/v1",
            root=f"http://127.0.0.1:{http_port}/moray",
            grpc_target=f"127.0.0.1:{grpc_port}",
            api_key=API_KEY,
            model="tiny",
        )
    finally:
        serve.shutdown()
