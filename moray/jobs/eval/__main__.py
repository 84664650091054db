"""`python -m moray.jobs.eval --model PATH_OR_URI --tasks wikitext,mmlu,gsm8k,humaneval [--limit N]
[--output results.json]` (also `moray eval ...`, and what `ray job submit` runs).

`--endpoint http://HOST:PORT/v1` runs the generation tasks against a deployment instead; with
`--every SECONDS` it does so again and again (watching a deployment's accuracy drift). Every flag,
the tasks' data files, the model and the endpoint are checked before Ray starts."""

from __future__ import annotations

import argparse
import sys

from moray.jobs.eval.config import DEFAULT_DATA, EvalConfig
from moray.jobs.eval.tasks import TASK_NAMES


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{value} must be positive")
        return value

    return parse


def _task_tokens(text: str) -> tuple[str, int]:
    task, sep, n = text.partition("=")
    if not sep or not n.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected TASK=TOKENS, as gsm8k=256")
    return task, int(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moray eval", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_argument_group("what to evaluate (one of)")
    src.add_argument("--model", help="an HF directory, models:/NAME/VERSION or models:/NAME@ALIAS")
    src.add_argument(
        "--endpoint", help="a running deployment's OpenAI API, http://HOST:PORT/v1 (generation tasks)"
    )
    p.add_argument(
        "--served-model", default=None, help="the endpoint's model name (default: the first it lists)"
    )
    p.add_argument(
        "--api-key", default=None, help="the endpoint's key (default: $MORAY_API_KEY or $OPENAI_API_KEY)"
    )
    p.add_argument(
        "--tasks", default=",".join(TASK_NAMES), help=f"comma-separated, of {', '.join(TASK_NAMES)}"
    )
    p.add_argument(
        "--limit", type=_positive(int), default=None, help="documents per task (MMLU: per subject)"
    )
    p.add_argument("--output", default=None, help="write the results with every sample to this JSON file")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="the evaluation sets (default: %(default)s)")
    p.add_argument("--workers", type=_positive(int), default=1, help="Ray actors holding the model")
    p.add_argument("--cpus-per-worker", type=_positive(float), default=1.0)
    p.add_argument("--threads", type=_positive(int), default=None, help="torch threads per worker")
    p.add_argument("--max-batch-tokens", type=_positive(int), default=8192)
    p.add_argument("--samples", type=_positive(int), default=1, help="HumanEval completions per problem")
    p.add_argument("--k", default="1", help="HumanEval pass@k, comma-separated (each <= --samples)")
    p.add_argument(
        "--temperature", type=_positive(float), default=0.8, help="HumanEval sampling when --samples > 1"
    )
    p.add_argument("--max-gen-tokens", type=_task_tokens, action="append", default=[], metavar="TASK=N",
                   help="new tokens for a generation task (default gsm8k=256, humaneval=512)")  # fmt: skip
    p.add_argument(
        "--sandbox-timeout", type=_positive(float), default=10.0, help="seconds per HumanEval program"
    )
    p.add_argument("--sandbox-memory-mb", type=_positive(int), default=1024)
    p.add_argument("--tracking-uri", default=None, help="MLflow (default: moray's)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--run-name", default=None, help="the MLflow run's name when the model has no run of its own"
    )
    p.add_argument("--every", type=_positive(float), default=None, metavar="SECONDS",
                   help="with --endpoint: evaluate again every SECONDS (accuracy drift)")  # fmt: skip
    p.add_argument("--rounds", type=_positive(int), default=None, help="with --every: stop after N rounds")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    try:
        k = tuple(int(x) for x in args.k.split(","))
    except ValueError:
        raise ValueError(f"--k {args.k!r}: expected comma-separated integers") from None
    return EvalConfig(
        model=args.model, endpoint=args.endpoint, served_model=args.served_model, api_key=args.api_key,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), limit=args.limit,
        output=args.output, data_dir=args.data_dir, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        threads=args.threads, max_batch_tokens=args.max_batch_tokens, samples=args.samples, k=k,
        temperature=args.temperature, max_gen_tokens=dict(args.max_gen_tokens),
        sandbox_timeout_s=args.sandbox_timeout, sandbox_memory_mb=args.sandbox_memory_mb,
        tracking_uri=args.tracking_uri, mlflow=not args.no_mlflow, run_name=args.run_name,
        every_s=args.every, rounds=args.rounds,
    )  # fmt: skip


def format_results(results: dict) -> str:
    lines = [f"{'task':<10} {'metric':<22} {'value':>10}"]
    for task, metrics in results["tasks"].items():
        for name, value in metrics.items():
            if isinstance(value, int | float):
                lines.append(
                    f"{task:<10} {name:<22} {value:>10.4f}"
                    if isinstance(value, float)
                    else f"{task:<10} {name:<22} {value:>10}"
                )
    lines.append(f"in {results['seconds']['total']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moray.jobs.eval.endpoint import EndpointError
    from moray.jobs.eval.job import run

    try:
        config = config_from_args(args)
        results = run(config, on_round=lambda r: print(format_results(r), flush=True))
    except (ValueError, FileNotFoundError, EndpointError) as e:
        print(f"moray eval: error: {e}", file=sys.stderr)
        return 2
    if "mlflow" in results:
        print(f"MLflow run {results['mlflow']['run_id']}"
              + (f", model version {results['mlflow']['model_version']}" if results["mlflow"]["model_version"] else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
