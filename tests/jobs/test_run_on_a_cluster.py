"""The README's "Run on a cluster", followed on a real head node (`ray start --head`, token
authentication on): curation, pre-training and evaluation through `ray job submit` with the
repository as the working directory, then serving the registered model through `serve deploy`."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from moray.platform.cluster import RAY_ENVIRONMENT
from moray.platform.ports import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture
def head_node():
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    # Token authentication on for the head and the clients (the token is ~/.ray/auth_token), and
    # moray's Ray settings, as the README exports them.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", **RAY_ENVIRONMENT}
    env.pop("RAY_ADDRESS", None)
    # A cluster of its own: nothing the test session exported (an MLflow server that an earlier test
    # set, the session's work directory) may reach the head node's jobs.
    for variable in [v for v in env if v.startswith("MLFLOW_") or v == "MORAY_HOME"]:
        env.pop(variable)
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={temp}", "--include-dashboard=true",
           # own ports for every agent: the defaults clash with any other Ray on this machine
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # `ray stop` would also stop the test session's own local Ray: end only this cluster's processes.
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, runtime_env: dict, *job: str) -> str:
    """`ray job submit --working-dir REPO -- python -m ...`; the job's output, after it succeeded."""
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
           f"--runtime-env-json={json.dumps(runtime_env)}", "--", sys.executable, "-m", *job]  # fmt: skip
    for _ in range(15):  # the job agent comes up a few seconds after `ray start` returns
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        out = done.stdout + done.stderr
        if "No available agent" not in out:
            break
        time.sleep(2)
    assert done.returncode == 0 and "succeeded" in out, out[-4000:]
    return out


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_curate_pretrain_evaluate_and_serve_on_a_head_node(head_node, tmp_path):
    """Curation, then pre-training on 4 workers (2 data-parallel x 2 tensor-parallel ranks, the routed
    experts split over the 2 data-parallel ones) on what it wrote, evaluation of the registered
    version, and `serve deploy` of that version answering the OpenAI API."""
    address, env = head_node
    auth = Path.home() / ".ray" / "auth_token"
    assert auth.is_file() or env.get("RAY_AUTH_TOKEN"), "token authentication should be on"
    home = tmp_path / "home"
    runtime_env = {"env_vars": {"MORAY_HOME": str(home)}, "excludes": [".moray"]}

    # The job runs in a copy of the repository: inputs and output by absolute path.
    curated = tmp_path / "curated"
    out = _submit(address, env, runtime_env, "moray.jobs.curate",
                  "--input", f"{SHARED / 'corpus' / 'code' / 'thealgorithms-python' / 'sorts'}=code",
                  "--output", str(curated), "--set", "semdedup.enabled=false",
                  "perplexity.enabled=false", "tokenizer.vocab_size=512", "pack.seq_len=64")  # fmt: skip
    manifest = json.loads((curated / "manifest.json").read_text())
    assert manifest["splits"]["train"]["sequences"] >= 32, manifest["splits"]

    out = _submit(address, env, runtime_env, "moray.jobs.pretrain", "--config", "configs/pretrain/tiny.yaml",
                  "--set", f"data.path={curated}", "parallel.tp=2", "parallel.ep=2", "scaling.num_workers=4",
                  "train.max_steps=4", "train.warmup_steps=1", "train.checkpoint_every=2", "train.val_every=2",
                  "run.name=submitted", "run.register_model=moray-submitted")  # fmt: skip
    assert "registered model:      models:/moray-submitted/1" in out
    assert (home / "runs" / "submitted" / "checkpoint-0000004").is_dir()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    version = client.get_model_version("moray-submitted", "1")
    # the version's lineage names the submitted curation run (found by the manifest's checksum)
    curation = client.get_run(version.tags["moray.lineage.curation_run"])
    assert curation.data.tags["moray.data.path"] == str(curated)

    # The evaluation job, submitted the same way, scores the registered model and logs to its run.
    out = _submit(address, env, runtime_env, "moray.jobs.eval", "--model", "models:/moray-submitted/1",
                  "--tasks", "wikitext,humaneval", "--limit", "1", "--max-gen-tokens", "humaneval=8",
                  "--data-dir", str(SHARED / "eval"))  # fmt: skip
    assert "wikitext   word_perplexity" in out and "model version moray-submitted/1" in out
    assert "eval/wikitext/word_perplexity" in client.get_run(version.run_id).data.metrics
    assert "eval.humaneval.pass_at_1" in client.get_model_version("moray-submitted", "1").tags

    # Serving: the repository's Serve config, pointed at the version, through `serve deploy`.
    config = yaml.safe_load((REPO / "configs" / "serve" / "moray.yaml").read_text())
    http = free_port()
    config["http_options"]["port"] = http
    (app,) = config["applications"]
    app["args"].update(model="models:/moray-submitted/1", served_model_name="moray-submitted")
    app["runtime_env"] = {"env_vars": {"MORAY_HOME": str(home)}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    deploy = subprocess.run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), f"--address={address}"],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    deadline = time.monotonic() + 240
    while True:  # `serve deploy` returns once the config is accepted; the replica starts after
        status = subprocess.run([str(BIN / "serve"), "status", f"--address={address}"], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        state = yaml.safe_load(status.stdout or "{}") or {}
        app_state = (state.get("applications") or {}).get("moray", {}).get("status")
        if app_state == "RUNNING":
            break
        assert app_state not in ("DEPLOY_FAILED", "UNHEALTHY"), status.stdout[-4000:]
        assert time.monotonic() < deadline, status.stdout[-4000:]
        time.sleep(2)
    completion = _post(f"http://127.0.0.1:{http}/v1/completions",
                       {"model": "moray-submitted", "prompt": "def sort(", "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert completion["model"] == "moray-submitted" and completion["usage"]["completion_tokens"] >= 1

    # Without the token the job API refuses the client.
    no_token = {**env, "RAY_AUTH_TOKEN": "wrong-token"}
    listing = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=no_token,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listing.returncode != 0
