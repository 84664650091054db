"""`moray eval --endpoint`: the generation tasks through a running deployment's OpenAI API give what the
model files give, and `--every` watches the deployment: each round a step of one MLflow run and the
latest figures on Ray's metrics endpoint (the serving dashboard's accuracy panel)."""

from __future__ import annotations

import json
import re
import time
import urllib.request

from moray.jobs.eval.__main__ import main
from moray.jobs.eval.config import EvalConfig
from moray.jobs.eval.job import evaluate
from moray.jobs.eval.scorer import Scorer

TOKENS = ["--max-gen-tokens", "humaneval=8", "--max-gen-tokens", "gsm8k=8"]


def test_generation_tasks_through_the_deployment_match_the_model_files(
    serve_app, tiny_model_dir, eval_data, tmp_path
):
    out = tmp_path / "results.json"
    argv = ["--endpoint", serve_app.base_url, "--api-key", serve_app.api_key, "--tasks", "humaneval,gsm8k",
            "--limit", "2", "--data-dir", str(eval_data), "--output", str(out), "--no-mlflow", *TOKENS]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(out.read_text())
    config = EvalConfig(model=str(tiny_model_dir), tasks=("humaneval", "gsm8k"), limit=2, data_dir=eval_data,
                        max_gen_tokens={"humaneval": 8, "gsm8k": 8})  # fmt: skip
    want = evaluate(config, tiny_model_dir, scorer=Scorer(tiny_model_dir, threads=1))

    assert got["tasks"]["humaneval"]["refused_requests"] == 0
    assert [s["completions"] for s in got["samples"]["humaneval"]] == [
        s["completions"] for s in want["samples"]["humaneval"]
    ]
    assert got["tasks"]["humaneval"]["pass_at_1"] == want["tasks"]["humaneval"]["pass_at_1"]
    # GSM8K's 8-shot prompt is longer than this model's 1,024-token context: the deployment refuses
    # it with a 400, which is counted and scored as an empty answer (model files are left-truncated).
    refused = got["tasks"]["gsm8k"]["refused_requests"]
    assert got["tasks"]["gsm8k"]["questions"] == 2 and refused in (0, 2)
    if refused == 0:
        assert [s["completion"] for s in got["samples"]["gsm8k"]] == [
            s["completion"] for s in want["samples"]["gsm8k"]
        ]


def test_every_watches_the_deployment_in_mlflow_and_prometheus(
    serve_app, ray_local, eval_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = ["--endpoint", serve_app.base_url, "--api-key", serve_app.api_key, "--tasks", "humaneval",
            "--limit", "1", "--data-dir", str(eval_data), "--every", "0.1", "--rounds", "2",
            "--run-name", "watch tiny", *TOKENS[:2]]  # fmt: skip
    assert main(argv) == 0

    from mlflow import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("moray-eval").experiment_id])
    assert run.info.run_name == "watch tiny" and run.data.tags["moray.eval.target"] == serve_app.base_url
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/humaneval/pass_at_1")]
    assert steps == [0, 1]

    deadline, found = time.monotonic() + 90, None
    while time.monotonic() < deadline and found is None:  # Ray exports metrics every few seconds
        body = urllib.request.urlopen(ray_local.metrics_url, timeout=10).read().decode()
        found = next((float(m.group(2)) for m in re.finditer(r"^ray_moray_eval_score\{(.*)\} (\S+)$", body, re.M)
                      if 'metric="pass_at_1"' in m.group(1) and 'task="humaneval"' in m.group(1)), None)  # fmt: skip
        time.sleep(0 if found is not None else 2)
    assert found is not None, "moray_eval_score never reached Ray's metrics endpoint"
    assert found == client.get_run(run.info.run_id).data.metrics["eval/humaneval/pass_at_1"]
