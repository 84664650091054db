"""The Ray Serve application: one deployment whose replicas each hold an engine (model + paged
latent cache + continuous-batching loop) and serve the OpenAI HTTP API (FastAPI ingress) and the
gRPC API (`moray.MorayGenerate`, through Serve's gRPC proxy).

`build_app(args)` is the application builder named in configs/serve/*.yaml (`serve run` /
`serve deploy`); `moray serve` and `python -m moray.jobs.serve` call it too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

from ray import serve

from moray.platform.config import ConfigError

GRPC_SERVICER = "moray.jobs.serve.proto.moray_pb2_grpc.add_MorayGenerateServicer_to_server"


@dataclass
class ServeSettings:
    model: str  # an HF directory or models:/NAME/VERSION, models:/NAME@ALIAS
    served_model_name: str | None = None  # the `model` clients send; default: the directory/registry name
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    tracking_uri: str | None = None  # MLflow, for models:/ URIs (default: moray's)
    kv_cache_bytes: int = 64 << 20
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefill_chunk: int = 256
    max_waiting: int = 256
    quantize_int8: bool = False
    torch_threads: int = 0  # 0: torch's default

    @classmethod
    def from_dict(cls, d: dict) -> ServeSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown serve settings: {sorted(unknown)} (known: {sorted(known)})")
        if "model" not in d:
            raise ConfigError("serve settings need `model` (an HF directory or models:/NAME/VERSION)")
        s = cls(**d)
        if isinstance(s.api_keys, str):
            s.api_keys = [k for k in s.api_keys.split(",") if k]
        return s

    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        m = self.model.rstrip("/")
        if m.startswith("models:/"):
            return m[len("models:/") :].split("/")[0].split("@")[0]
        return os.path.basename(m) or "moray"


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class MorayServer:
    def __init__(self, settings: dict):
        import torch

        from moray.actors.engine import AsyncEngine, Engine, EngineConfig
        from moray.actors.engine.metrics import EngineMetrics
        from moray.jobs.serve.loading import load_for_serving
        from moray.jobs.serve.server import OpenAIServer

        s = ServeSettings.from_dict(settings)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        cfg = EngineConfig(
            kv_cache_bytes=s.kv_cache_bytes, block_size=s.block_size, max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens, prefill_chunk=s.prefill_chunk,
            max_waiting=s.max_waiting, quantize_int8=s.quantize_int8,
        )  # fmt: skip
        self.metrics = EngineMetrics(s.name())

        def build_engine() -> Engine:
            model, tok, _ = load_for_serving(s.model, s.tracking_uri)
            return Engine(model, tok, cfg, metrics=self.metrics)

        self.engine = AsyncEngine(build_engine)  # loads the model on the engine's thread (see there)
        self.server = OpenAIServer(self.engine, s.name(), s.api_keys)

    def __serve_build_asgi_app__(self):
        return self.server.build_app()

    # ------------------------------------------------------------ gRPC (moray.MorayGenerate)
    def _grpc_request(self, request, grpc_context):
        import grpc

        from moray.actors.engine import EngineError, Overloaded, RequestParams

        tok = self.server.tokenizer
        try:
            if request.prompt_ids:
                ids = list(request.prompt_ids)
            elif request.prompt and tok is not None:
                ids = tok.encode(request.prompt)
            else:
                raise ValueError("send prompt (text) or prompt_ids")
            params = RequestParams(
                max_tokens=request.max_tokens or 16,
                temperature=request.temperature if request.HasField("temperature") else 1.0,
                top_p=request.top_p if request.HasField("top_p") else 1.0,
                top_k=request.top_k,
                seed=request.seed if request.HasField("seed") else None,
                stop=tuple(request.stop),
                ignore_eos=request.ignore_eos,
            )
            if params.stop and tok is None:
                raise ValueError("stop strings need a tokenizer")
            rid, q = self.engine.add(ids, params)
        except (Overloaded, EngineError, ValueError) as e:
            overloaded = isinstance(e, Overloaded)
            grpc_context.set_code(
                grpc.StatusCode.RESOURCE_EXHAUSTED if overloaded else grpc.StatusCode.INVALID_ARGUMENT
            )
            grpc_context.set_details(str(e))
            raise
        return len(ids), self.engine.stream(rid, q)

    async def Generate(self, request, grpc_context):  # noqa: N802 (the gRPC method name)
        from moray.jobs.serve.proto import moray_pb2

        n_prompt, stream = self._grpc_request(request, grpc_context)
        outs = [o async for o in stream]
        return moray_pb2.GenerateResponse(
            text="".join(o.new_text for o in outs),
            token_ids=[t for o in outs for t in o.new_token_ids],
            finish_reason=outs[-1].finish_reason or "",
            prompt_tokens=n_prompt,
            completion_tokens=outs[-1].num_output_tokens,
        )

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        from moray.jobs.serve.proto import moray_pb2

        n_prompt, stream = self._grpc_request(request, grpc_context)
        async for o in stream:
            yield moray_pb2.GenerateChunk(
                text=o.new_text,
                token_ids=o.new_token_ids,
                finish_reason=o.finish_reason or "",
                prompt_tokens=n_prompt,
                completion_tokens=o.num_output_tokens,
            )

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine loop has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_app(args: dict) -> serve.Application:
    """The application builder (`import_path: moray.jobs.serve.app:build_app` with `args`).
    Deployment options (replicas, resources) come from the config file's `deployments` section."""
    settings = ServeSettings.from_dict(dict(args))
    return MorayServer.bind(asdict(settings))
