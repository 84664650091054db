"""The Serve config file validates against Ray's ServeDeploySchema and its args against moray's
settings; `moray serve` parses its flags (binding to localhost by default)."""

from pathlib import Path

import pytest
import yaml

from moray.actors.engine import EngineConfig
from moray.jobs.serve.app import GRPC_SERVICER, ServeSettings
from moray.platform.config import ConfigError, from_dict

CONFIG = Path(__file__).parents[3] / "configs" / "serve" / "moray.yaml"


def test_config_file_validates():
    from ray.serve.schema import ServeDeploySchema

    text = CONFIG.read_text()
    data = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1"
    assert "grpc_options" not in data  # Serve's gRPC proxy binds every interface: opt-in only
    # ... and the commented-out block validates once uncommented
    grpc = "\n".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    block = yaml.safe_load(grpc[grpc.index("grpc_options:") :])
    assert GRPC_SERVICER in block["grpc_options"]["grpc_servicer_functions"]
    ServeDeploySchema.model_validate({**data, **block})
    (app,) = data["applications"]
    s = from_dict(ServeSettings, app["args"])
    assert s.name() == "moray-tiny" and s.model.startswith("models:/")
    assert s.engine == EngineConfig()  # the file spells out the engine's own defaults


def test_settings_refuse_unknown_and_name_defaults():
    with pytest.raises(ConfigError, match="max_tokenz"):
        from_dict(ServeSettings, {"model": "x", "max_tokenz": 3})
    with pytest.raises(ConfigError, match="model"):
        from_dict(ServeSettings, {})
    assert from_dict(ServeSettings, {"model": "models:/moe@champion"}).name() == "moe"
    assert from_dict(ServeSettings, {"model": "/a/b/tiny-hf/"}).name() == "tiny-hf"
    assert from_dict(ServeSettings, {"model": "x", "api_keys": "a,b"}).api_keys == ["a", "b"]


def test_engine_settings_are_one_nested_dataclass_with_dotted_errors():
    s = from_dict(ServeSettings, {"model": "x", "engine": {"max_waiting": 7}})
    assert s.engine == EngineConfig(max_waiting=7)
    assert ServeSettings(model="x").engine.max_waiting == EngineConfig().max_waiting == 256
    with pytest.raises(ConfigError, match=r"engine\.max_waiting='many': expected int"):
        from_dict(ServeSettings, {"model": "x", "engine": {"max_waiting": "many"}})
    with pytest.raises(ConfigError, match=r"engine.*block_size=0: must be positive"):
        from_dict(ServeSettings, {"model": "x", "engine": {"block_size": 0}})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) in engine: max_wait"):
        from_dict(ServeSettings, {"model": "x", "engine": {"max_wait": 1}})


def test_cli_flags():
    import argparse

    from moray.jobs.serve.__main__ import add_arguments, settings_from_args
    from moray.platform.cli import JOBS

    assert JOBS["serve"][0] == "moray.jobs.serve.__main__"
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "d", "--api-key", "k", "--quantize", "int8"]
    )
    assert args.host == "127.0.0.1" and args.port == 8000 and args.grpc_port == 0
    s = settings_from_args(args)
    assert s.api_keys == ["k"] and s.engine.quantize == "int8" and s.engine.kv_cache_bytes == 64 << 20


def test_grafana_dashboard_queries_only_metrics_the_engine_exports():
    """dashboards/moray-serving.json: every query names a metric EngineMetrics defines, the
    scheduled evaluation's score or the hybrid policy's (with the ray_ prefix and the suffix
    Prometheus gives its type), and every such metric has a panel."""
    import json
    import re

    from moray.actors.engine import metrics
    from moray.jobs.eval import job
    from moray.jobs.serve import hybrid

    root = Path(__file__).parents[3]
    dash = json.loads((root / "dashboards" / "moray-serving.json").read_text())
    defined = set(re.findall(r'"(moray_[a-z_]+)"', Path(metrics.__file__).read_text()))
    defined |= set(re.findall(r'Gauge\(\s*"(moray_[a-z_]+)"', Path(job.__file__).read_text()))
    defined |= set(re.findall(r'"(moray_hybrid_[a-z_]+)"', Path(hybrid.__file__).read_text()))
    assert {"moray_eval_score", "moray_hybrid_requests_total", "moray_hybrid_vertical_limit"} <= defined
    queried = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"ray_(moray_[a-z_]+?)(?:_bucket)?\{", target["expr"]))
    assert queried == defined


def test_the_replica_takes_its_device_and_precision_from_the_parallel_layout():
    import torch

    cpu = from_dict(ServeSettings, {"model": "x"})
    assert cpu.layout.device_type == "cpu" and cpu.layout.compute_dtype == torch.float32
    assert cpu.actor_options() == {"num_cpus": 1}
    gpu = from_dict(ServeSettings, {"model": "x", "device": "cuda"})
    assert gpu.layout.compute_dtype == torch.bfloat16 and gpu.actor_options()["num_gpus"] == 1
    with pytest.raises(ConfigError, match="device_type='tpu'"):
        from_dict(ServeSettings, {"model": "x", "device": "tpu"})
