"""`python -m moray.jobs.serve --model PATH_OR_URI [--host 127.0.0.1] [--port 8000]` (also
`moray serve ...`): start Ray Serve with moray's HTTP (OpenAI) and gRPC APIs and serve until
interrupted. With `RAY_ADDRESS` set it deploys onto that cluster.

API keys: `--api-key KEY` (repeatable; visible in `ps`), `--api-key-file FILE` (one key per line),
or the comma-separated environment variable MORAY_API_KEYS. Every flag and the model are checked
before Ray starts."""

from __future__ import annotations

import argparse
import sys


def _int_in(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is not in [{low}, {high if high is not None else '...'}]"
            )
        return value

    return parse


def _replicas(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    lo = _int_in(1)(low)
    hi = _int_in(lo)(high) if high else lo
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--model", required=True, help="an HF directory or models:/NAME/VERSION | models:/NAME@ALIAS"
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: localhost only)")
    p.add_argument(
        "--port", type=_int_in(1, 65535), default=8000, help="HTTP port (the OpenAI API under /v1)"
    )
    p.add_argument(
        "--grpc-port", type=_int_in(0, 65535), default=0,
        help="serve gRPC (moray.MorayGenerate) on this port; off by default: Ray Serve's gRPC proxy listens "
        "on every interface ([::]), not only --host",
    )  # fmt: skip
    p.add_argument("--name", default=None, help="the model name clients send (default: from --model)")
    p.add_argument(
        "--api-key", action="append", default=[],
        help="require this bearer key (repeatable; shows in `ps`: prefer --api-key-file or $MORAY_API_KEYS)",
    )  # fmt: skip
    p.add_argument("--api-key-file", default=None, help="a file of keys, one per line (# starts a comment)")
    p.add_argument(
        "--replicas", type=_replicas, default=(1, 1),
        help="N replicas, or MIN:MAX to autoscale between them on ongoing requests",
    )  # fmt: skip
    p.add_argument(
        "--mode", default="vertical", choices=["vertical", "horizontal", "pipeline", "hybrid"],
        help="vertical: each replica holds the whole model on --cpus; horizontal: the routed experts live in "
        "--expert-shards actors that every replica sends its tokens to; pipeline: each replica's layers live "
        "in --stages actors; hybrid: vertical and horizontal, small requests to the vertical side and large "
        "ones or the overflow to the horizontal side",
    )  # fmt: skip
    p.add_argument("--cpus", type=float, default=1.0, help="each replica's CPUs (its torch threads follow)")
    p.add_argument("--expert-shards", type=_int_in(1), default=2, help="horizontal: expert shard actors")
    p.add_argument(
        "--redundant-experts", type=_int_in(0), default=0,
        help="horizontal: extra copies of the hottest experts per MoE layer (planned from --expert-loads)",
    )  # fmt: skip
    p.add_argument(
        "--expert-loads", default=None, help="horizontal: JSON {layer: [tokens per expert]} to plan from"
    )
    p.add_argument("--shard-cpus", type=float, default=1.0, help="horizontal: each expert shard's CPUs")
    p.add_argument("--stages", type=_int_in(1), default=2, help="pipeline: stage actors per replica")
    p.add_argument("--stage-cpus", type=float, default=1.0, help="pipeline: each stage's CPUs")
    p.add_argument(
        "--microbatches", type=_int_in(0), default=0,
        help="pipeline: pieces a decode step goes down the stages in (0: one per stage)",
    )  # fmt: skip
    p.add_argument("--kv-cache-mb", type=_int_in(1), default=64, help="paged latent cache per replica, MiB")
    p.add_argument("--max-request-mb", type=_int_in(1), default=8, help="larger request bodies get a 413")
    p.add_argument(
        "--quantize", default=None, choices=["int8", "int4"],
        help="weight-only quantization: int8 per channel, or int4 in groups of 32 (CPU, vertical mode)",
    )  # fmt: skip
    p.add_argument("--bf16", action="store_true", help="bf16 weights laid out for CPU decode (vertical mode)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per replica, bf16")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ (default: moray's)")
    return p


def settings_from_args(args: argparse.Namespace):
    """The one ServeSettings, from the flags (through the platform's from_dict, like a config file)."""
    from moray.jobs.serve.app import ServeSettings
    from moray.platform.config import from_dict

    s = {
        "model": args.model,
        "api_keys": list(args.api_key),
        "api_key_file": args.api_key_file,
        "max_request_bytes": args.max_request_mb << 20,
        "device": args.device,
        "mode": args.mode,
        "cpus": args.cpus,
        "torch_threads": max(1, int(args.cpus)),
        "expert_shards": {
            "num_shards": args.expert_shards,
            "redundant_experts": args.redundant_experts,
            "loads": args.expert_loads,
            "cpus": args.shard_cpus,
        },  # fmt: skip
        "pipeline": {
            "num_stages": args.stages,
            "microbatches": args.microbatches,
            "cpus": args.stage_cpus,
            "threads": max(1, int(args.stage_cpus)),
        },  # fmt: skip
        "engine": {"kv_cache_bytes": args.kv_cache_mb << 20, "quantize": args.quantize, "bf16": args.bf16},
    }
    if args.name:
        s["served_model_name"] = args.name
    if args.tracking_uri:
        s["tracking_uri"] = args.tracking_uri
    return from_dict(ServeSettings, s)


def prepare(args: argparse.Namespace):
    """Everything that can be refused, refused before Ray starts: the settings, the key file and
    the model source. The keys are resolved here, so replicas on a remote cluster get them too."""
    from moray.jobs.serve.loading import check_model_source

    check_model_source(args.model, args.tracking_uri)  # first: it needs neither torch nor Ray imported
    settings = settings_from_args(args)
    if settings.mode != "vertical":  # the expert placement and the stages' layers depend on the model
        from moray.jobs.serve.loading import model_config

        settings.check_model(model_config(args.model, args.tracking_uri))
    settings.api_keys, settings.api_key_file = settings.all_api_keys(), None
    return settings


def run(args: argparse.Namespace, blocking: bool = True, settings=None):
    settings = settings or prepare(args)
    from ray import serve
    from ray.serve.config import gRPCOptions

    from moray.jobs.serve.app import GRPC_SERVICER, application
    from moray.platform.cluster import connect

    connect()
    grpc = (
        gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]) if args.grpc_port else None
    )
    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc)
    low, high = args.replicas
    scaling = (
        {"num_replicas": low} if low == high
        else {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 8}}
    )  # fmt: skip
    app = application(settings, **scaling)
    print(f"moray: serving {settings.name()!r} at http://{args.host}:{args.port}/v1", flush=True)
    keys = len(settings.api_keys)
    print(
        f"moray: {keys} API key(s) required" if keys else "moray: no API key: open to anyone who can connect"
    )
    if args.grpc_port:
        print(  # Ray Serve's gRPC proxy has no host setting
            f"moray: gRPC moray.MorayGenerate on port {args.grpc_port}, on every interface (same API keys)",
            flush=True,
        )
    try:
        return serve.run(app, name="moray", route_prefix="/", blocking=blocking)
    except KeyboardInterrupt:
        print("moray: shutting down", flush=True)
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moray serve", description=__doc__, allow_abbrev=False)
    args = add_arguments(parser).parse_args(argv)
    try:
        settings = prepare(args)
    except (OSError, ValueError) as e:  # ConfigError is a ValueError; a missing model an OSError
        print(f"moray serve: error: {e}", file=sys.stderr)
        return 2
    run(args, settings=settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
