"""`make demo`: the platform end to end on one machine with a local Ray.

1. the model's accounting (`moray model info tiny`);
2. curation of a small slice of ../shared/data on Ray Data (configs/curate/smoke.yaml);
3. pre-training of the tiny model on 2 Ray Train workers, tracked in MLflow, registered as a model;
4. the registered model, downloaded from MLflow, generating text through the latent cache;
5. the same registered model served on Ray Serve, answering a chat request from the `openai` client;
6. an evaluation of that model (WikiText-2, MMLU, GSM8K, HumanEval), logged to its training run;
7. where to look next.

Everything lands under the work directory (MORAY_HOME, default .moray/). The terminal shows the
demo's own banners and results; everything else written to stdout and stderr (Ray's log lines, its
workers' output, progress bars, library warnings) goes to <MORAY_HOME>/demo.log, named at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from moray.model import SamplingParams, generate, load_pretrained, preset
from moray.model.accounting import account, format_accounting
from moray.platform.workdir import work_dir

_terminal = sys.stdout  # main() points it at the terminal once stdout goes to the log


def say(*args) -> None:
    print(*args, file=_terminal, flush=True)


def banner(text: str) -> None:
    say(f"\n{'=' * 8} {text} {'=' * max(0, 70 - len(text))}")


def main() -> int:
    """Run the demo with file descriptors 1 and 2 on demo.log (Ray's processes and workers inherit
    or stream to them); the demo's own lines go to a copy of the terminal's stdout."""
    global _terminal
    home = work_dir()
    log_path = home / "demo.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _terminal = os.fdopen(os.dup(1), "w")
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            demo(home)
            status = 0
        except Exception:
            traceback.print_exc()  # into the log, after whatever led to it
            say("\n" + traceback.format_exc().rstrip())
            status = 1
        finally:
            import ray

            ray.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    say(f"\nRay's log lines and everything else the run printed: {log_path}")
    if status:
        say("the demo failed (the traceback above; the log has the details)")
    return status


def demo(home: Path) -> None:
    torch.manual_seed(0)
    banner("1. the model: moray model info tiny")
    say(format_accounting("tiny", account(preset("tiny"))))

    banner("2. curation on Ray Data (configs/curate/smoke.yaml)")
    from moray.jobs.curate.pipeline import load_config as curate_config
    from moray.jobs.curate.pipeline import run as curate
    from moray.platform.cluster import connect

    connect(include_dashboard=False)  # workers' output streams to this process's stdout: the log
    t0 = time.time()
    ccfg = curate_config("configs/curate/smoke.yaml", [f"output={home / 'curated' / 'demo'}"])
    manifest = curate(ccfg)
    say(
        f"curated in {time.time() - t0:.0f}s: {json.dumps(manifest['counts']['all'])}; "
        f"{manifest['splits']['train']['sequences']} train / {manifest['splits']['val']['sequences']} val "
        f"sequences of {manifest['seq_len']} tokens; report: {ccfg.output}/report.md"
    )

    banner("3. pre-training on Ray Train: 2 workers, FSDP2, MLflow (configs/pretrain/tiny.yaml)")
    from moray.jobs.pretrain.job import load_config as pretrain_config
    from moray.jobs.pretrain.job import run as pretrain

    t0 = time.time()
    pcfg = pretrain_config(
        "configs/pretrain/tiny.yaml",
        [
            f"data.path={ccfg.output}",
            "run.name=demo",
            "train.max_steps=60",
            "train.lr=5e-3",
            "scaling.num_workers=2",
        ],
    )
    summary = pretrain(pcfg)
    final = summary["final"]
    say(
        f"trained {summary['steps']} steps in {time.time() - t0:.0f}s: LM loss {final['lm_loss']:.3f}, "
        f"val loss {final.get('val_loss', float('nan')):.3f}, capacity factor {final['capacity_factor']:.2f}, "
        f"drop rate {final['drop_rate']:.3f}"
    )
    say(f"registered {summary['registered_model']} (MLflow run {summary['mlflow_run_id']})")

    banner("4. the registered model, from MLflow, generating with the latent cache")
    import mlflow
    from tokenizers import Tokenizer

    mlflow.set_tracking_uri(summary["tracking_uri"])
    local = Path(mlflow.artifacts.download_artifacts(summary["registered_model"]))
    model = load_pretrained(local)
    tok = Tokenizer.from_file(str(local / "tokenizer.json"))
    prompts = ["Call me Ishmael.", "def bubble_sort(arr):"]
    params = SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, seed=0)
    for prompt, out in zip(prompts, generate(model, [tok.encode(p).ids for p in prompts], params)):
        say(f"{prompt!r} -> {tok.decode(out)!r}")

    banner("5. serving it on Ray Serve: OpenAI-compatible API, continuous batching")
    import argparse

    from openai import OpenAI
    from ray import serve

    from moray.jobs.serve.__main__ import add_arguments
    from moray.jobs.serve.__main__ import run as serve_run

    port = 8000
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", summary["registered_model"], "--port", str(port), "--name", "moray-tiny",
         "--tracking-uri", summary["tracking_uri"]]
    )  # fmt: skip
    serve_run(args, blocking=False)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="moray-tiny", messages=[{"role": "user", "content": "Tell me about the whale."}], max_tokens=24,
            temperature=0.7, seed=0,
        )  # fmt: skip
        say(f"POST /v1/chat/completions -> {reply.choices[0].message.content!r}")
        say(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
    finally:
        serve.shutdown()

    banner("6. evaluating it: moray eval (WikiText-2, MMLU 5-shot, GSM8K, HumanEval; small slices)")
    from moray.jobs.eval.__main__ import format_results
    from moray.jobs.eval.config import EvalConfig
    from moray.jobs.eval.job import run as evaluate

    t0 = time.time()
    results = evaluate(
        EvalConfig(
            model=summary["registered_model"], limit=2, tracking_uri=summary["tracking_uri"],
            max_gen_tokens={"gsm8k": 32, "humaneval": 32}, output=home / "eval" / "demo.json",
        )
    )  # fmt: skip
    say(format_results(results))
    say(
        f"evaluated in {time.time() - t0:.0f}s (MMLU: 2 questions of each of the 57 subjects); the figures are on "
        f"MLflow run {results['mlflow']['run_id']} and tags of {results['mlflow']['model_version']}"
    )

    banner("7. where to look")
    say(f"work directory:    {home}")
    say(f"curation report:   {ccfg.output}/report.md (ledger.parquet says why each record was dropped)")
    say(f"checkpoints:       {summary['run_dir']}")
    say(f"MLflow:            {summary['tracking_uri']} -> `make mlflow-ui`, then http://127.0.0.1:5000")
    say(
        "serve it yourself: moray serve --model "
        + summary["registered_model"]
        + " (http://127.0.0.1:8000/v1)"
    )
    say(f"evaluation:        {home / 'eval' / 'demo.json'} (every sample); moray eval --help")
    say("tests, benchmarks: `make test`, `make bench`")


if __name__ == "__main__":
    sys.exit(main())
