"""Curate a corpus into packed token shards on Ray Data.

    python -m moray.jobs.curate --config configs/curate/default.yaml [--set pack.seq_len=512 ...]
    moray curate --input data/*.jsonl=web --input src/=code --output out/   # ad-hoc inputs

The same lines work under `ray job submit` (RAY_ADDRESS set: the job joins that cluster).
"""

from __future__ import annotations

import argparse
import json
import sys

from moray.jobs.curate.readers import CODE_EXTENSIONS


def _source(spec: str) -> dict:
    """`PATH[=DOMAIN]`; without a domain, code files are `code` and everything else `web`."""
    path, _, domain = spec.rpartition("=") if "=" in spec else (spec, "", "")
    if not domain:
        low = path.lower().rstrip("/")
        domain = "code" if any(low.endswith(ext) for ext in CODE_EXTENSIONS) else "web"
    return {"path": path, "domain": domain}


def main(argv: list[str] | None = None) -> int:
    from moray.jobs.curate.pipeline import EmptyCurationError, load_config, run
    from moray.platform.config import load_yaml

    p = argparse.ArgumentParser(
        prog="moray curate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", help="YAML config (default: configs/curate/default.yaml when no --input)")
    p.add_argument("--input", action="append", default=[], metavar="PATH[=DOMAIN]",
                   help="a file, folder, glob or URI; repeatable; replaces the config's sources")  # fmt: skip
    p.add_argument("--output", help="output directory (overrides `output`)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    args = p.parse_args(argv)
    overrides = list(args.set) + ([f"output={args.output}"] if args.output else [])
    if args.input:
        data = load_yaml(args.config) if args.config else {}
        data["sources"] = [_source(s) for s in args.input]
        cfg = load_config(data=data, overrides=overrides)
    else:
        cfg = load_config(args.config or "configs/curate/default.yaml", overrides)
    try:
        manifest = run(cfg)
    except EmptyCurationError as e:  # a result, not a crash: the ledger and report are written
        print(f"moray curate: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"output": cfg.output, "counts": manifest["counts"]["all"],
                      "train_sequences": manifest["splits"]["train"]["sequences"],
                      "val_sequences": manifest["splits"]["val"]["sequences"],
                      "report": f"{cfg.output}/report.md"}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
