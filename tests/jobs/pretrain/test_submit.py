"""`ray job submit` to a real head node (started with `ray start --head`, token authentication on),
running the pre-training job from the repository as its working directory."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash, agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    # Token authentication on for the head and the clients (the token is ~/.ray/auth_token).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
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


def test_ray_job_submit_runs_pretraining(head_node, packed_data, tmp_path):
    """On 4 workers: 2 data-parallel x 2 tensor-parallel ranks, the routed experts split over the
    2 data-parallel ones."""
    address, env = head_node
    auth = Path.home() / ".ray" / "auth_token"
    assert auth.is_file() or env.get("RAY_AUTH_TOKEN"), "token authentication should be on"
    runtime_env = {"env_vars": {"MORAY_HOME": str(tmp_path / "home")}, "excludes": [".moray"]}
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
           f"--runtime-env-json={json.dumps(runtime_env)}", "--",
           sys.executable, "-m", "moray.jobs.pretrain", "--config", "configs/pretrain/tiny.yaml", "--set",
           f"data.path={packed_data}", "parallel.tp=2", "parallel.ep=2", "scaling.num_workers=4", "train.max_steps=4", "train.warmup_steps=1", "train.checkpoint_every=2", "train.val_every=2",
           "run.name=submitted", "run.register_model=moray-submitted"]  # fmt: skip
    for _ in range(15):  # the job agent comes up a few seconds after `ray start` returns
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        out = done.stdout + done.stderr
        if "No available agent" not in out:
            break
        time.sleep(2)
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out and "registered model:      models:/moray-submitted/1" in out
    assert (tmp_path / "home" / "runs" / "submitted" / "checkpoint-0000004").is_dir()

    # The evaluation job, submitted the same way, scores the registered model and logs to its run.
    data = REPO.parent / "shared" / "data" / "eval"
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
           f"--runtime-env-json={json.dumps(runtime_env)}", "--",
           sys.executable, "-m", "moray.jobs.eval", "--model", "models:/moray-submitted/1",
           "--tasks", "wikitext,humaneval", "--limit", "1", "--max-gen-tokens", "humaneval=8",
           "--data-dir", str(data)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "wikitext   word_perplexity" in out and "model version moray-submitted/1" in out
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    version = client.get_model_version("moray-submitted", "1")
    assert "eval/wikitext/word_perplexity" in client.get_run(version.run_id).data.metrics
    assert "eval.humaneval.pass_at_1" in version.tags

    # Without the token the job API refuses the client.
    no_token = {**env, "RAY_AUTH_TOKEN": "wrong-token"}
    listing = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=no_token,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listing.returncode != 0
