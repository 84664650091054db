"""The Ray Serve application: one deployment whose replicas each hold an engine (model + paged
latent cache + continuous-batching loop) and serve the OpenAI HTTP API (FastAPI ingress) and the
gRPC API (`moray.MorayGenerate`, through Serve's gRPC proxy).

`build_app(args)` is the application builder named in configs/serve/*.yaml (`serve run` /
`serve deploy`); `moray serve` and `python -m moray.jobs.serve` call it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from moray.actors.engine import EngineConfig
from moray.platform.config import from_dict
from moray.platform.parallel import ParallelLayout

GRPC_SERVICER = "moray.jobs.serve.proto.moray_pb2_grpc.add_MorayGenerateServicer_to_server"
API_KEYS_ENV = "MORAY_API_KEYS"  # comma-separated keys, read where the server runs


@dataclass
class ServeSettings:
    """All a replica needs: parsed once by the platform's `from_dict` (a bad field is a ConfigError
    naming it, `engine.max_waiting=...`) from the config file's `args` or `moray serve`'s flags, and
    handed to the replicas as this object."""

    model: str = ""  # an HF directory or models:/NAME/VERSION, models:/NAME@ALIAS
    served_model_name: str | None = None  # the `model` clients send; default: the directory/registry name
    # Keys clients must send; with none here, in api_key_file or in $MORAY_API_KEYS: no authentication.
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = None  # one key per line (# comments); kept out of `ps` and Serve's config
    tracking_uri: str | None = None  # MLflow, for models:/ URIs (default: moray's)
    torch_threads: int = 0  # 0: torch's default
    max_request_bytes: int = 8 << 20  # a larger body is refused (413) before it is read
    device: str = "cpu"  # "cuda": the replica takes a GPU, bf16 weights (see ParallelLayout)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: required (an HF directory or models:/NAME/VERSION)")
        if isinstance(self.api_keys, str):  # "k1,k2", as an environment variable would give it
            self.api_keys = [k for k in self.api_keys.split(",") if k]
        if not all(isinstance(k, str) for k in self.api_keys):
            raise ValueError("api_keys: must be a list of strings")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads={self.torch_threads}: must be >= 0")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes={self.max_request_bytes}: must be positive")
        ParallelLayout(device_type=self.device)  # refuses an unknown device, naming it

    @property
    def layout(self) -> ParallelLayout:
        """One replica's layout (the same object pre-training reads): device and precision."""
        return ParallelLayout(device_type=self.device)

    def actor_options(self) -> dict:
        """What a replica asks Ray for: a CPU, and a GPU when it serves on one."""
        return {"num_cpus": 1, **({"num_gpus": 1} if self.device == "cuda" else {})}

    def all_api_keys(self) -> list[str]:
        """api_keys, the lines of api_key_file and the comma-separated $MORAY_API_KEYS, in that order.
        Raises OSError naming the file if it cannot be read."""
        keys = list(self.api_keys)
        if self.api_key_file:
            try:
                lines = Path(self.api_key_file).read_text().splitlines()
            except OSError as e:
                raise OSError(f"api_key_file {self.api_key_file!r}: {e.strerror or e}") from None
            keys += [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
        keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return list(dict.fromkeys(keys))

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
    def __init__(self, settings: ServeSettings):
        import torch

        from moray.actors.engine import AsyncEngine, Engine
        from moray.actors.engine.metrics import EngineMetrics
        from moray.jobs.serve.loading import load_for_serving
        from moray.jobs.serve.server import OpenAIServer

        s = settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.metrics = EngineMetrics(s.name())

        def build_engine() -> Engine:
            layout = s.layout
            model, tok, _ = load_for_serving(
                s.model, s.tracking_uri, dtype=layout.compute_dtype, device=layout.device_type
            )
            return Engine(model, tok, s.engine, metrics=self.metrics)

        self.engine = AsyncEngine(build_engine)  # loads the model on the engine's thread (see there)
        # keys read here, in the replica: a key file or variable on the cluster never passes through
        # Serve's config (which the dashboard shows)
        self.server = OpenAIServer(self.engine, s.name(), s.all_api_keys(), s.max_request_bytes)

    def __serve_build_asgi_app__(self):
        return self.server.build_app()

    # ------------------------------------------------------------ gRPC (moray.MorayGenerate)
    def _grpc_request(self, request, grpc_context):
        import grpc

        from moray.actors.engine import EngineError, Overloaded, RequestParams

        tok = self.server.tokenizer
        header = dict(grpc_context.invocation_metadata()).get("authorization", "")
        if not self.server.authorized(header):  # the same keys as HTTP, as `authorization: Bearer KEY`
            grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            grpc_context.set_details("Incorrect API key provided.")
            raise PermissionError("incorrect API key")
        try:
            if request.prompt_ids:
                ids = list(request.prompt_ids)
            elif request.prompt and tok is not None:
                ids = self.engine.engine.encode(request.prompt)
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
        except (EngineError, ValueError) as e:  # ValueError: RequestParams' own checks
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
    settings = from_dict(ServeSettings, dict(args))
    return MorayServer.options(ray_actor_options=settings.actor_options()).bind(settings)
