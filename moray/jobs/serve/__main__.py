"""`python -m moray.jobs.serve --model PATH_OR_URI [--host 127.0.0.1] [--port 8000]` (also
`moray serve ...`): start Ray Serve with moray's HTTP (OpenAI) and gRPC APIs and serve until
interrupted. With `RAY_ADDRESS` set it deploys onto that cluster."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--model", required=True, help="an HF directory or models:/NAME/VERSION | models:/NAME@ALIAS"
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (the OpenAI API under /v1)")
    p.add_argument(
        "--grpc-port", type=int, default=0,
        help="serve gRPC (moray.MorayGenerate) on this port; off by default: Ray Serve's gRPC proxy listens "
        "on every interface ([::]), not only --host",
    )  # fmt: skip
    p.add_argument("--name", default=None, help="the model name clients send (default: from --model)")
    p.add_argument("--api-key", action="append", default=[], help="require this bearer key (repeatable)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--kv-cache-mb", type=int, default=64, help="paged latent cache per replica, MiB")
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantization")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ (default: moray's)")
    return p


def settings_from_args(args: argparse.Namespace) -> dict:
    s = {
        "model": args.model,
        "api_keys": list(args.api_key),
        "kv_cache_bytes": args.kv_cache_mb << 20,
        "quantize_int8": args.int8,
    }
    if args.name:
        s["served_model_name"] = args.name
    if args.tracking_uri:
        s["tracking_uri"] = args.tracking_uri
    return s


def run(args: argparse.Namespace, blocking: bool = True):
    from ray import serve
    from ray.serve.config import gRPCOptions

    from moray.jobs.serve.app import GRPC_SERVICER, MorayServer, ServeSettings
    from moray.platform.cluster import connect

    settings = ServeSettings.from_dict(settings_from_args(args))
    connect()
    grpc = (
        gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]) if args.grpc_port else None
    )
    serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc)
    app = MorayServer.options(num_replicas=args.replicas).bind(settings.__dict__)
    print(f"moray: serving {settings.name()!r} at http://{args.host}:{args.port}/v1", flush=True)
    if args.grpc_port:
        print(f"moray: gRPC moray.MorayGenerate on port {args.grpc_port} (all interfaces)", flush=True)
    try:
        return serve.run(app, name="moray", route_prefix="/", blocking=blocking)
    except KeyboardInterrupt:
        print("moray: shutting down", flush=True)
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(
        argparse.ArgumentParser(prog="python -m moray.jobs.serve", description=__doc__)
    ).parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
