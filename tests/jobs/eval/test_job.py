"""The evaluation job on Ray: requests fanned out over two actors give what one process gives, and the
results land in MLflow, on the registered model's own training run and as tags on its version."""

from __future__ import annotations

import json

import pytest

from moray.jobs.eval.__main__ import main
from moray.jobs.eval.config import EvalConfig
from moray.jobs.eval.job import evaluate
from moray.jobs.eval.scorer import Scorer

GEN = ["--max-gen-tokens", "gsm8k=8", "--max-gen-tokens", "humaneval=8"]


def test_two_ray_actors_give_what_one_process_gives(ray_local, eval_model_dir, eval_data, tmp_path):
    out = tmp_path / "results.json"
    argv = ["--model", str(eval_model_dir), "--tasks", "wikitext,mmlu,gsm8k,humaneval", "--limit", "2",
            "--data-dir", str(eval_data), "--workers", "2", "--cpus-per-worker", "1", "--threads", "1",
            "--output", str(out), "--no-mlflow", *GEN]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(out.read_text())

    config = EvalConfig(model=str(eval_model_dir), limit=2, data_dir=eval_data,
                        max_gen_tokens={"gsm8k": 8, "humaneval": 8})  # fmt: skip
    want = evaluate(config, eval_model_dir, scorer=Scorer(eval_model_dir, threads=1))

    assert set(got["tasks"]) == {"wikitext", "mmlu", "gsm8k", "humaneval"}
    assert got["tasks"]["mmlu"]["questions"] == 2 * 57 and got["tasks"]["mmlu"]["subjects"] == 57
    assert got["tasks"]["wikitext"]["documents"] == 2
    assert got["tasks"]["gsm8k"]["questions"] == got["tasks"]["humaneval"]["problems"] == 2
    for a, b in zip(got["samples"]["mmlu"], want["samples"]["mmlu"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    assert got["tasks"]["mmlu"]["acc"] == want["tasks"]["mmlu"]["acc"]
    for a, b in zip(got["samples"]["wikitext"], want["samples"]["wikitext"]):
        assert a["loglikelihood"] == pytest.approx(b["loglikelihood"], rel=1e-6)
    assert [s["completion"] for s in got["samples"]["gsm8k"]] == [
        s["completion"] for s in want["samples"]["gsm8k"]
    ]
    assert [s["completions"] for s in got["samples"]["humaneval"]] == [
        s["completions"] for s in want["samples"]["humaneval"]
    ]
    assert all(
        len(s["completions"]) == 1 and s["status"][0] in ("failed", "passed")
        for s in got["samples"]["humaneval"]
    )


def test_results_go_to_the_registered_models_run_and_version(
    ray_local, eval_model_dir, eval_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlflow import MlflowClient

    from moray.platform.tracking import register_hf_model, setup_mlflow

    mlflow = setup_mlflow("pretrain")
    with mlflow.start_run(run_name="trained") as run:
        mlflow.log_metric("lm_loss", 3.0)
    version = register_hf_model(eval_model_dir, "eval-tiny", run.info.run_id)
    client = MlflowClient()
    client.set_registered_model_alias("eval-tiny", "champion", str(version))

    argv = ["--model", "models:/eval-tiny@champion", "--tasks", "wikitext,gsm8k", "--limit", "1",
            "--data-dir", str(eval_data), "--threads", "1", *GEN[:2]]  # fmt: skip
    assert main(argv) == 0

    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"lm_loss", "eval/wikitext/word_perplexity", "eval/wikitext/token_perplexity",
            "eval/gsm8k/exact_match_strict"} <= set(metrics)  # fmt: skip
    assert metrics["eval/wikitext/word_perplexity"] > 1
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
    assert len(artifacts) == 1 and artifacts[0].endswith(".json")
    tags = client.get_model_version("eval-tiny", str(version)).tags
    assert float(tags["eval.wikitext.word_perplexity"]) == pytest.approx(
        metrics["eval/wikitext/word_perplexity"], rel=1e-5
    )
    assert tags["eval.tasks"] == "wikitext,gsm8k" and tags["eval.limit"] == "1"
