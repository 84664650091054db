"""`moray model ...`: look at a model without a cluster.

    moray model info deepseek-v2 [--json] [--seq-len 4096] [--cache-dtype bfloat16]
    moray model generate tiny --max-new-tokens 8      # a preset runs with random weights

The model is a preset (tiny, small, deepseek-v2-lite, deepseek-v2), a YAML config or an HF directory.
"""

from __future__ import annotations

import argparse
import json
import sys


def _load_config(name_or_path: str):
    from moray.platform.config import load_model_config

    return load_model_config(name_or_path)


def cmd_info(args: argparse.Namespace) -> int:
    from moray.model.accounting import account, format_accounting

    a = account(_load_config(args.model), seq_len=args.seq_len, cache_dtype=args.cache_dtype)
    if args.json:
        print(json.dumps({"model": args.model, **a.as_dict()}, indent=2))
    else:
        print(format_accounting(args.model, a))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moray.model import SamplingParams, Transformer, generate, load_pretrained
    from moray.model.presets import PRESETS

    torch.manual_seed(args.seed)
    if args.model in PRESETS:
        model = Transformer(_load_config(args.model)).eval()  # random weights: a smoke test
    else:
        model = load_pretrained(args.model)
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )  # fmt: skip
    print(json.dumps({"prompt": prompt, "generated": generate(model, [prompt], params)[0]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moray model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # fmt: skip
    cmds = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    info = cmds.add_parser(
        "info", help="parameters, activated parameters, FLOPs and KV-cache size", allow_abbrev=False
    )
    info.add_argument(
        "model",
        help="a preset (tiny, small, deepseek-v2-lite, deepseek-v2), a YAML config or an HF directory",
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--seq-len", type=int, default=4096, help="context length for the FLOPs figure")
    info.add_argument("--cache-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16", "int8"])
    info.set_defaults(func=cmd_info)

    gen = cmds.add_parser(
        "generate", help="generate token ids (a preset runs with random weights)", allow_abbrev=False
    )
    gen.add_argument("model", help="a preset or an HF directory")
    gen.add_argument("--prompt-ids", default="1,5,6,7", help="comma-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad config or arguments: one clear line, no traceback
        print(f"moray model: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
