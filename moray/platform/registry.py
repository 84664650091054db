"""`moray models ...`: the MLflow model registry, as moray's jobs fill it.

    moray models list [NAME] [--json]              versions, aliases, lineage, evaluation figures
    moray models promote NAME VERSION [--alias champion]

Pre-training registers each export as a new version whose tags name its lineage (the curation run,
the pre-training run, the data manifest's checksum, the resolved config) and evaluation adds its
figures (`eval.<task>.<metric>`). An alias moves from version to version: `moray serve --model
models:/NAME@champion` and `moray eval --model models:/NAME@champion` follow it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

LINEAGE_TAGS = ("moray.lineage.curation_run", "moray.lineage.pretrain_run", "moray.data.manifest_sha256")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME -> (name, version, alias)."""
    ref = uri.removeprefix("models:/").strip("/")
    name, _, version = ref.partition("/")
    name, _, alias = name.partition("@")
    return name, version or None, alias or None


def model_version(client, uri: str):
    """The ModelVersion a models:/ URI names (the newest version for models:/NAME). Raises
    MlflowException when the registry has no such model, version or alias."""
    name, version, alias = parse_model_uri(uri)
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if version:
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        client.get_registered_model(name)  # raises: no such model
        raise LookupError(f"model {name!r} has no version")
    return max(versions, key=lambda v: int(v.version))


def _versions(client, name: str | None) -> list:
    models = [client.get_registered_model(name)] if name else client.search_registered_models()
    rows = []
    for m in sorted(models, key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, version in (m.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(client.search_model_versions(f"name='{m.name}'"), key=lambda v: int(v.version)):
            rows.append(
                {
                    "name": m.name,
                    "version": int(v.version),
                    "aliases": sorted(aliases.get(str(v.version), [])),
                    "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                    "run_id": v.run_id,
                    "lineage": {k.split(".")[-1]: v.tags[k] for k in LINEAGE_TAGS if k in v.tags},
                    "eval": {
                        k.removeprefix("eval."): v.tags[k] for k in sorted(v.tags) if k.startswith("eval.")
                    },
                }
            )
    return rows


def format_versions(rows: list[dict]) -> str:
    if not rows:
        return "no registered model"
    out = [f"{'MODEL':<20} {'VER':>4}  {'ALIASES':<16} {'CREATED':<16}  RUN / LINEAGE / EVALUATION"]
    for r in rows:
        aliases = ",".join("@" + a for a in r["aliases"]) or "-"
        out.append(f"{r['name']:<20} {r['version']:>4}  {aliases:<16} {r['created']:<16}  run {r['run_id']}")
        lineage = r["lineage"]
        if lineage:
            parts = [f"curation run {lineage.get('curation_run', '?')}"]
            if "manifest_sha256" in lineage:
                parts.append(f"data {lineage['manifest_sha256'][:12]}")
            out.append(" " * 61 + ", ".join(parts))
        figures = {k: v for k, v in r["eval"].items() if _is_number(v)}
        if figures:
            out.append(" " * 61 + ", ".join(f"{k} {float(v):.4g}" for k, v in list(figures.items())[:6]))
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cmd_list(args, client) -> int:
    rows = _versions(client, args.name)
    print(json.dumps(rows, indent=2) if args.json else format_versions(rows))
    return 0


def cmd_promote(args, client) -> int:
    client.get_model_version(args.name, str(args.version))  # raises: no such model or version
    before = {a: v for a, v in (client.get_registered_model(args.name).aliases or {}).items()}
    client.set_registered_model_alias(args.name, args.alias, str(args.version))
    was = f" (was version {before[args.alias]})" if args.alias in before else ""
    print(f"models:/{args.name}@{args.alias} -> version {args.version}{was}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moray models", description="List registered model versions and promote one to an alias.",
        allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: moray's)")
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("list", help="versions with their aliases, lineage and evaluation figures",
                             allow_abbrev=False)  # fmt: skip
    ls.add_argument("name", nargs="?", help="one registered model (default: all)")
    ls.add_argument("--json", action="store_true")
    promote = commands.add_parser("promote", help="point an alias (default @champion) at a version",
                                  allow_abbrev=False)  # fmt: skip
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", default="champion")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from moray.platform.tracking import tracking_uri

    where = args.tracking_uri or tracking_uri()
    try:
        return {"list": cmd_list, "promote": cmd_promote}[args.command](args, MlflowClient(where))
    except MlflowException as e:
        print(f"moray models: {e.message.splitlines()[0]} (registry at {where})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
