"""`python -m moray.jobs.curate --config configs/curate/default.yaml [--set key=value ...]`
(the same line works under `ray job submit`)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from moray.jobs.curate.pipeline import load_config, run

    p = argparse.ArgumentParser(prog="python -m moray.jobs.curate", description=__doc__)
    p.add_argument("--config", default="configs/curate/default.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    p.add_argument("--output", help="output directory (overrides `output`)")
    args = p.parse_args(argv)
    overrides = list(args.set) + ([f"output={args.output}"] if args.output else [])
    manifest = run(load_config(args.config, overrides))
    print(json.dumps({"output": manifest["config"]["output"], "counts": manifest["counts"]["all"],
                      "train_sequences": manifest["splits"]["train"]["sequences"],
                      "val_sequences": manifest["splits"]["val"]["sequences"]}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
