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
from moray.jobs.serve.hybrid import HybridSettings
from moray.platform.config import from_dict
from moray.platform.parallel import ParallelLayout

GRPC_SERVICER = "moray.jobs.serve.proto.moray_pb2_grpc.add_MorayGenerateServicer_to_server"
API_KEYS_ENV = "MORAY_API_KEYS"  # comma-separated keys, read where the server runs


MODES = ("vertical", "horizontal", "pipeline", "hybrid")
SHARDED = ("horizontal", "hybrid")  # the modes with expert shards


@dataclass
class ExpertShardSettings:
    """Horizontal mode: the routed experts in ExpertShard actors (moray/actors/expert_shard.py)."""

    num_shards: int = 2
    redundant_experts: int = 0  # extra copies for the hottest experts (EPLB), per MoE layer
    loads: str | None = None  # a JSON file {layer: [tokens per expert]} to plan from; None: uniform
    cpus: float = 1.0  # each shard's Ray CPUs
    threads: int = 1  # each shard's torch threads
    placement_strategy: str = "SPREAD"  # Ray placement group strategy: SPREAD puts shards on different nodes
    replan_every_s: float = 0.0  # re-plan from the load replicas report this often (0: only on request)

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"expert_shards.num_shards={self.num_shards}: must be >= 1")
        if self.replan_every_s < 0:
            raise ValueError(f"expert_shards.replan_every_s={self.replan_every_s}: must be >= 0")
        if self.cpus < 0 or self.threads < 1:
            raise ValueError("expert_shards.cpus must be >= 0 and expert_shards.threads >= 1")
        _check_strategy("expert_shards", self.placement_strategy)

    def placement(self, config, measured: dict | None = None):
        """The plan for a model config, from `measured` load ({layer: (E,) tokens}) when given, else
        from `loads`' file, else uniform: refused (PlacementError) when it cannot serve the model."""
        import json

        import torch

        from moray.actors.expert_shard import check_shardable
        from moray.actors.placement import PlacementError, plan_placement

        layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        loads = None
        if self.loads:
            try:
                raw = json.loads(Path(self.loads).read_text())
            except (OSError, ValueError) as e:
                raise PlacementError(f"expert_shards.loads {self.loads!r}: {e}") from None
            loads = {int(layer): torch.tensor(v, dtype=torch.float64) for layer, v in raw.items()}
            bad = [layer for layer, v in loads.items() if v.shape != (config.n_routed_experts,)]
            if bad:
                raise PlacementError(f"expert_shards.loads: layers {bad} do not give one count per expert "
                                     f"({config.n_routed_experts})")  # fmt: skip
        if measured:
            loads = measured
        plan = plan_placement(loads, config.n_routed_experts, self.num_shards, layers, self.redundant_experts)
        check_shardable(config, plan)
        return plan


def _check_strategy(section: str, strategy: str) -> None:
    from moray.actors.group import STRATEGIES

    if strategy not in STRATEGIES:
        raise ValueError(f"{section}.placement_strategy={strategy!r}: one of {', '.join(STRATEGIES)}")


@dataclass
class PipelineSettings:
    """Pipeline mode: each replica's decoder layers in PipelineStage actors (moray/actors/pipeline_stage.py)."""

    num_stages: int = 2
    microbatches: int = 0  # pieces a step's rows go down the stages in (0: one per stage)
    cpus: float = 1.0  # each stage's Ray CPUs
    threads: int = 1  # each stage's torch threads
    placement_strategy: str = "SPREAD"  # SPREAD puts a replica's stages on different nodes

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.microbatches < 0:
            raise ValueError("pipeline.num_stages must be >= 1 and pipeline.microbatches >= 0")
        if self.cpus < 0 or self.threads < 1:
            raise ValueError("pipeline.cpus must be >= 0 and pipeline.threads >= 1")
        _check_strategy("pipeline", self.placement_strategy)


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
    # vertical: each replica holds the whole model, on `cpus` CPUs (threads follow);
    # horizontal: replicas hold attention, routers and shared experts, the routed experts live in
    # `expert_shards` that every replica attaches to; pipeline: each replica's layers live in its
    # own `pipeline` stages
    mode: str = "vertical"
    cpus: float = 1.0  # each replica's Ray CPUs
    expert_shards: ExpertShardSettings = field(default_factory=ExpertShardSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    hybrid: HybridSettings = field(default_factory=HybridSettings)  # hybrid: both, and a policy between
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
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: one of {', '.join(MODES)}")
        if self.cpus <= 0:
            raise ValueError(f"cpus={self.cpus}: must be positive")
        actors = "expert shards" if self.mode in SHARDED else "pipeline stages"
        for fmt in ("quantize", "bf16"):
            if self.mode != "vertical" and getattr(self.engine, fmt):
                raise ValueError(
                    f"mode={self.mode}: the {actors} serve the model's own weights, not {fmt}={getattr(self.engine, fmt)}"
                )
        if self.engine.quantize == "int4" and self.device != "cpu":
            raise ValueError(f"device={self.device}: int4 weights run on the CPU's kernel only")
        if self.mode != "vertical" and self.device != "cpu":
            raise ValueError(f"mode={self.mode}: {actors} run on CPUs for now (device=cpu)")

    def check_model(self, config) -> None:
        """What depends on the model: the expert placement of horizontal mode, the stages' layers."""
        if self.mode in SHARDED:
            self.expert_shards.placement(config)
        if self.mode == "pipeline":
            from moray.actors.pipeline_stage import stage_layers

            try:
                stage_layers(config, self.pipeline.num_stages)
            except ValueError as e:
                raise ValueError(f"pipeline.num_stages: {e}") from None

    @property
    def layout(self) -> ParallelLayout:
        """One replica's layout (the same object pre-training reads): device and precision."""
        return ParallelLayout(device_type=self.device)

    def actor_options(self) -> dict:
        """What a replica asks Ray for: a CPU, and a GPU when it serves on one."""
        return {"num_cpus": self.cpus, **({"num_gpus": 1} if self.device == "cuda" else {})}

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


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class ExpertPool:
    """Horizontal mode: owns the expert shards (a ShardPool: they end with the application) and their
    placement; replicas fetch it, report the load they route, and follow re-plans between steps.
    `replan()` re-plans now; `expert_shards.replan_every_s` does it periodically."""

    def __init__(self, settings: ServeSettings):
        import asyncio

        from moray.actors.expert_shard import ShardPool
        from moray.jobs.serve.loading import model_config

        e = settings.expert_shards
        config = model_config(settings.model, settings.tracking_uri)
        self.pool = ShardPool(settings.model, lambda loads: e.placement(config, loads), e.cpus, e.threads,
                              e.placement_strategy, settings.tracking_uri)  # fmt: skip
        self.every = e.replan_every_s
        if self.every:
            self.task = asyncio.get_event_loop().create_task(self._replan_periodically())

    async def _replan_periodically(self):
        import asyncio

        while True:
            await asyncio.sleep(self.every)
            await asyncio.to_thread(self.pool.replan)

    def fetch(self) -> tuple[int, str, list]:
        return self.pool.fetch()

    def version(self) -> int:
        return self.pool.version

    def report(self, loads: dict[int, list[int]], replica: str = "", version: int = 0) -> None:
        self.pool.report(loads, replica, version)

    def status(self) -> dict:
        """The placement version and plan, the load reported, each replica's version."""
        return self.pool.status()

    def replan(self) -> int:
        """Re-plan from the load reported so far; the placement version in use afterwards."""
        self.pool.replan()
        return self.pool.version

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()


class _ServePoolClient:
    """A replica's view of the ExpertPool deployment (moray.actors.expert_shard.PoolClient)."""

    def __init__(self, handle):
        self.handle = handle

    def fetch(self):
        return self.handle.fetch.remote().result()

    def version(self) -> int:
        return self.handle.version.remote().result()

    def report(self, loads, replica: str, version: int) -> None:
        self.handle.report.remote(loads, replica, version)


class _ForwardedContext:
    """The parts of a gRPC servicer context MorayReplica uses, for a forwarded call."""

    def __init__(self, metadata):
        self.metadata, self.code, self.details = tuple(metadata), None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class MorayReplica:
    """One replica: an engine and the OpenAI server over it. Deployed as MorayServer (the HTTP
    ingress of the vertical, horizontal and pipeline modes) or as MorayBackend (hybrid's horizontal
    side, reached through `asgi` and `grpc` calls: an application has one HTTP ingress)."""

    def __init__(self, settings: ServeSettings, expert_pool=None):
        import torch

        from moray.actors.engine import AsyncEngine, Engine
        from moray.actors.engine.metrics import EngineMetrics
        from moray.jobs.serve.loading import load_for_serving
        from moray.jobs.serve.server import OpenAIServer

        s = settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.metrics = EngineMetrics(s.name())

        self.shard_set = self.pipeline = None

        def build_engine() -> Engine:
            layout = s.layout
            parts = {"layers": (), "ends": True} if s.mode == "pipeline" else {}  # the stages hold the layers
            model, tok, _ = load_for_serving(
                s.model, s.tracking_uri, dtype=layout.compute_dtype, device=layout.device_type,
                routed_experts=expert_pool is None, **parts,
            )  # fmt: skip
            if expert_pool is not None:
                self.shard_set = attach_expert_pool(model, expert_pool)
            if s.mode == "pipeline":
                self.pipeline = start_pipeline(model, s)
            engine = Engine(model, tok, s.engine, metrics=self.metrics, runner=self.pipeline)
            if self.shard_set is not None:
                engine.repair = self.shard_set.repair  # a lost shard: re-attach once Ray restarted it
                engine.before_step = self.shard_set.sync  # report load, follow re-plans
                engine.extra_stats = self.shard_set.stats
            if self.pipeline is not None:
                engine.repair = self.pipeline.repair  # a lost stage: wait for Ray's restart
            return engine

        self.engine = AsyncEngine(build_engine)  # loads the model on the engine's thread (see there)
        # keys read here, in the replica: a key file or variable on the cluster never passes through
        # Serve's config (which the dashboard shows)
        self.server = OpenAIServer(self.engine, s.name(), s.all_api_keys(), s.max_request_bytes)

    def __serve_build_asgi_app__(self):
        return self.server.build_app()

    async def asgi(self, method: str, path: str, headers: list, body: bytes):
        """One HTTP request through this replica's OpenAI server, streamed back: (status, headers),
        then the body's chunks. What a hybrid vertical replica calls to forward a request here."""
        from moray.jobs.serve.hybrid import call_asgi

        if getattr(self, "_app", None) is None:
            self._app = self.server.build_app()
        async for item in call_asgi(self._app, method, path, headers, body):
            yield item

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

    @staticmethod
    def _grpc_unavailable(grpc_context, e) -> None:
        import grpc

        grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
        grpc_context.set_details(f"the model is temporarily unavailable: {e}; retry later")

    async def Generate(self, request, grpc_context):  # noqa: N802 (the gRPC method name)
        from moray.actors.engine import Unavailable
        from moray.jobs.serve.proto import moray_pb2

        n_prompt, stream = self._grpc_request(request, grpc_context)
        try:
            outs = [o async for o in stream]
        except Unavailable as e:
            self._grpc_unavailable(grpc_context, e)
            raise
        return moray_pb2.GenerateResponse(
            text="".join(o.new_text for o in outs),
            token_ids=[t for o in outs for t in o.new_token_ids],
            finish_reason=outs[-1].finish_reason or "",
            prompt_tokens=n_prompt,
            completion_tokens=outs[-1].num_output_tokens,
        )

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        from moray.actors.engine import Unavailable
        from moray.jobs.serve.proto import moray_pb2

        n_prompt, stream = self._grpc_request(request, grpc_context)
        try:
            async for o in stream:
                yield moray_pb2.GenerateChunk(
                    text=o.new_text,
                    token_ids=o.new_token_ids,
                    finish_reason=o.finish_reason or "",
                    prompt_tokens=n_prompt,
                    completion_tokens=o.num_output_tokens,
                )
        except Unavailable as e:
            self._grpc_unavailable(grpc_context, e)
            raise

    async def grpc(self, method: str, request, metadata):
        """A gRPC call a hybrid vertical replica forwards (it holds the client's context): yields the
        messages, and on a refusal a final ("error", status code name, details)."""
        context = _ForwardedContext(metadata)
        try:
            if method == "Generate":
                yield await self.Generate(request, context)
            else:
                async for chunk in self.GenerateStream(request, context):
                    yield chunk
        except Exception as e:
            yield ("error", context.code.name if context.code else "INTERNAL", context.details or str(e))

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine loop has stopped")

    def pipeline_stages(self) -> list:
        """Pipeline mode: this replica's PipelineStage actors, in layer order."""
        return list(self.pipeline.stages) if self.pipeline is not None else []

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close()  # the stages' CPUs go back to the cluster


MorayServer = serve.deployment(
    name="MorayServer", max_ongoing_requests=512, ray_actor_options={"num_cpus": 1}
)(serve.ingress()(MorayReplica))
MorayBackend = serve.deployment(
    name="MorayBackend", max_ongoing_requests=512, ray_actor_options={"num_cpus": 1}
)(MorayReplica)


def start_pipeline(model, settings: ServeSettings):
    """This replica's pipeline stages (their cache holds as many blocks as the engine's budget
    gives it), and the runner that sends its steps through them."""
    from moray.actors.engine.block_cache import BlockPool
    from moray.actors.pipeline_stage import PipelineRunner, start_pipeline_stages

    p, e = settings.pipeline, settings.engine
    dtype = settings.layout.compute_dtype
    blocks = BlockPool.blocks_in_budget(model.config, e.kv_cache_bytes, e.block_size, dtype)
    stages, group = start_pipeline_stages(
        settings.model, model.config, p.num_stages, blocks, e.block_size, p.cpus, p.threads,
        str(dtype).removeprefix("torch."), p.placement_strategy, settings.tracking_uri,
    )  # fmt: skip
    return PipelineRunner(model, stages, group, p.microbatches)


def attach_expert_pool(model, expert_pool):
    """This replica's links to the pool's shards, installed in `model`'s MoE layers."""
    import uuid

    from moray.actors.expert_shard import ShardSet, use_expert_shards

    shard_set = ShardSet.from_pool(_ServePoolClient(expert_pool), uuid.uuid4().hex[:12])
    use_expert_shards(model, shard_set)
    return shard_set


class HybridReplica(MorayReplica):
    """Hybrid mode's ingress and vertical side: a whole-model replica whose OpenAI app and gRPC
    methods first ask the policy (moray/jobs/serve/hybrid.py) whether to serve a request here or to
    forward it to the horizontal deployment."""

    def __init__(self, settings: ServeSettings, horizontal):
        from moray.jobs.serve.hybrid import HybridMetrics, HybridPolicy

        super().__init__(settings)
        self.policy = HybridPolicy(settings.hybrid, capacity=settings.engine.max_num_seqs)
        self.horizontal = horizontal
        self.metrics_hybrid = HybridMetrics(settings.name())
        self.max_request_bytes = settings.max_request_bytes
        self._threads = 0  # lent torch threads in use (0: the replica's own)

    def lend(self) -> None:
        """Before a request is served here: the threads the policy lends this side now, if any."""
        threads = self.policy.threads("vertical")
        if threads is not None and threads != self._threads:
            self._threads = threads
            self.engine.set_threads(threads)

    def __serve_build_asgi_app__(self):
        from moray.jobs.serve.hybrid import HybridMiddleware

        def forward(method, path, headers, body):
            return self.horizontal.options(stream=True).asgi.remote(method, path, headers, body)

        app = self.server.build_app()
        app.add_middleware(HybridMiddleware, policy=self.policy, forward=forward, lend=self.lend,
                           metrics=self.metrics_hybrid, max_body=self.max_request_bytes)  # fmt: skip
        return app

    # ------------------------------------------------------------ gRPC: here, or forwarded
    async def _routed_grpc(self, method: str, request, grpc_context):
        import grpc

        from moray.jobs.serve.hybrid import in_flight

        body = {"prompt": list(request.prompt_ids) or request.prompt, "max_tokens": request.max_tokens or 16}
        backend, reason = self.policy.choose(body)
        with in_flight(self.policy, self.metrics_hybrid, backend, reason):
            if backend == "vertical":
                self.lend()
                if method == "Generate":
                    yield await super().Generate(request, grpc_context)
                else:
                    async for chunk in super().GenerateStream(request, grpc_context):
                        yield chunk
                return
            metadata = tuple(grpc_context.invocation_metadata())
            async for item in self.horizontal.options(stream=True).grpc.remote(method, request, metadata):
                if isinstance(item, tuple):  # the backend refused: its status, on the client's call
                    _, code, details = item
                    grpc_context.set_code(getattr(grpc.StatusCode, code))
                    grpc_context.set_details(details)
                    raise RuntimeError(details)
                yield item

    async def Generate(self, request, grpc_context):  # noqa: N802 (the gRPC method name)
        async for response in self._routed_grpc("Generate", request, grpc_context):
            return response

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        async for chunk in self._routed_grpc("GenerateStream", request, grpc_context):
            yield chunk

    def policy_state(self) -> dict:
        p = self.policy
        return {"limit": p.limit, "inflight": dict(p.inflight), "ttft": dict(p.ttft), "sent": dict(p.sent)}


HybridServer = serve.deployment(
    name="Vertical", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 1}
)(serve.ingress()(HybridReplica))  # takes every request: the policy limits what stays here


def application(settings: ServeSettings, **options) -> serve.Application:
    """The deployment graph of `settings.mode`; `options` go to the replicas' deployments
    (num_replicas, autoscaling_config, ...)."""
    import dataclasses

    def server(mode: str, name: str = "MorayServer"):
        s = dataclasses.replace(settings, mode=mode)
        kind = MorayServer if name == "MorayServer" else MorayBackend
        deployment = kind.options(name=name, ray_actor_options=s.actor_options(), **options)
        return deployment.bind(s, ExpertPool.bind(s)) if mode == "horizontal" else deployment.bind(s)

    if settings.mode == "hybrid":
        s = dataclasses.replace(settings, mode="vertical")
        vertical = HybridServer.options(ray_actor_options=s.actor_options(), **options)
        return vertical.bind(s, server("horizontal", "Horizontal"))
    return server(settings.mode)


def build_app(args: dict) -> serve.Application:
    """The application builder (`import_path: moray.jobs.serve.app:build_app` with `args`).
    Deployment options (replicas, autoscaling, resources) come from the config file's `deployments`
    section."""
    return application(from_dict(ServeSettings, dict(args)))
