"""The `moray` command line: `moray COMMAND ARGS...` runs COMMAND's own module with ARGS.

Each command is one module with a `main(argv)` and its own argparse parser; this dispatcher imports
it only when that command runs, so `moray.platform` imports no job (and `moray --help` starts fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with main(argv), one line of help)
COMMANDS = {
    "curate": ("moray.jobs.curate.__main__", "curate a corpus into packed token shards on Ray Data"),
    "pretrain": ("moray.jobs.pretrain.job", "pre-train a model on Ray Train from a curated dataset"),
    "serve": ("moray.jobs.serve.__main__", "serve a model with an OpenAI-compatible API on Ray Serve"),
    "eval": (
        "moray.jobs.eval.__main__",
        "evaluate a model or a deployment: perplexity, MMLU, GSM8K, HumanEval",
    ),
    "deploy": (
        "moray.platform.deploy",
        "render KubeRay manifests (RayCluster, RayJobs, RayService) and apply them",
    ),
    "models": (
        "moray.platform.registry",
        "list registered model versions (lineage, evaluations) and promote aliases",
    ),
    "model": ("moray.platform.model_command", "inspect a model (parameters, FLOPs, KV cache) and generate"),
    "plan": ("moray.platform.plan", "plan a training layout: memory per device, communication, step time"),
}
JOBS = COMMANDS  # the old name, still read by tests/jobs/serve/test_config.py; drop once that reads COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moray",
        description="moray: curate, train, serve and track DeepSeek-V2-style MoE models on one Ray cluster.",
        epilog="`moray COMMAND --help` shows a command's arguments.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():  # listed here; their own parsers take the arguments
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    build_parser().parse_args(argv)  # --help, or an error naming the commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
