"""Hybrid serving: one API in front of a vertical deployment (whole-model replicas: lowest latency
for small requests) and a horizontal one (replicas over shared expert shards: throughput for large
batches and high concurrency), with a policy that picks one per request.

    client -> HybridRouter (this module: the OpenAI HTTP API's ingress)
                 |  policy: small and the vertical side has room -> "vertical"
                 |          large (n > 1, long prompt or output), or vertical full -> "horizontal"
                 v
              Vertical / Horizontal: MorayServer deployments; each answers the request with its own
              OpenAI server (the router forwards the HTTP request whole and streams the response
              back), so every endpoint, error and stream is the same as in the other modes.

The policy adapts its one knob, how many requests the vertical side takes at once, from the time to
first token each side delivers (an exponentially weighted mean): while the vertical side answers
later than the horizontal one it takes fewer, while it answers sooner it takes more. Each side's
replicas autoscale on their own ongoing requests, so when the mix shifts the cluster's CPUs move to
the side the traffic went to; within a host, `lend_threads` gives the vertical side the horizontal
side's cores while that one is idle. Decisions are counted in `moray_hybrid_requests_total{backend,reason}`
and the knob is `moray_hybrid_vertical_limit` (the serving dashboard shows both).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

# module level: FastAPI resolves the route's (string) annotations in this module's namespace
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

BACKENDS = ("vertical", "horizontal")
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class HybridSettings:
    small_tokens: int = 512  # prompt (estimated) + max_tokens at or below this is a small request
    vertical_limit: int = 8  # requests the vertical side takes at once, to start with
    min_vertical_limit: int = 1
    max_vertical_limit: int = 64
    adapt: bool = True  # move vertical_limit by the two sides' time to first token
    # torch threads the vertical side runs on while the horizontal side has nothing in flight (0: its
    # own, always): where both sides share a host's cores, the idle side's go to the busy one
    lend_threads: int = 0

    def __post_init__(self) -> None:
        if self.small_tokens < 1:
            raise ValueError(f"hybrid.small_tokens={self.small_tokens}: must be >= 1")
        if not 1 <= self.min_vertical_limit <= self.vertical_limit <= self.max_vertical_limit:
            raise ValueError("hybrid: need 1 <= min_vertical_limit <= vertical_limit <= max_vertical_limit")
        if self.lend_threads < 0:
            raise ValueError(f"hybrid.lend_threads={self.lend_threads}: must be >= 0")


def request_size(body: dict) -> tuple[int, int]:
    """(choices asked for, prompt tokens estimated + max_tokens) of an OpenAI request body: about 4
    characters a token for text, exact for token-id prompts."""
    prompt = body.get("prompt", "")
    if "messages" in body:
        prompt = " ".join(
            str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict)
        )
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        tokens = len(prompt)
    else:
        tokens = len(str(prompt)) // 4 + 1
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    n = body.get("n") or 1
    return (n if isinstance(n, int) else 1), tokens + (out if isinstance(out, int) else 16)


class HybridPolicy:
    """Picks a side per request and keeps the vertical side's limit where its latency holds."""

    EWMA = 0.2

    def __init__(self, settings: HybridSettings):
        self.settings = settings
        self.limit = settings.vertical_limit
        self.inflight = dict.fromkeys(BACKENDS, 0)
        self.ttft = dict.fromkeys(BACKENDS, None)  # seconds, exponentially weighted

    def choose(self, body: dict) -> tuple[str, str]:
        n, tokens = request_size(body)
        if n > 1 or tokens > self.settings.small_tokens:
            return "horizontal", "large"
        if self.inflight["vertical"] >= self.limit:
            return "horizontal", "overflow"
        return "vertical", "small"

    def threads(self, backend: str) -> int | None:
        """What the forwarded request tells its replica to run on: the lent threads while the
        horizontal side is idle, its own (0) while it is busy; None for the horizontal side."""
        if backend != "vertical" or not self.settings.lend_threads:
            return None
        return self.settings.lend_threads if self.inflight["horizontal"] == 0 else 0

    def observe(self, backend: str, ttft_s: float) -> None:
        old = self.ttft[backend]
        self.ttft[backend] = ttft_s if old is None else (1 - self.EWMA) * old + self.EWMA * ttft_s
        v, h = self.ttft["vertical"], self.ttft["horizontal"]
        if not self.settings.adapt or v is None or h is None:
            return
        s = self.settings
        if v > 1.25 * h and self.limit > s.min_vertical_limit:
            self.limit -= 1  # the vertical side is the slower one now: send it less
        elif v < 0.8 * h and self.inflight["vertical"] >= self.limit and self.limit < s.max_vertical_limit:
            self.limit += 1  # it is faster and full: let it take more


async def call_asgi(
    app, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> AsyncIterator:
    """Run one HTTP request through an ASGI app in this process: yields (status, headers) first,
    then the body's chunks as they are sent (a streamed response streams)."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    messages: asyncio.Queue = asyncio.Queue()
    delivered = asyncio.Event()

    async def receive():
        if not delivered.is_set():
            delivered.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the router cancels us if its client goes

    task = asyncio.create_task(app(scope, receive, messages.put))
    try:
        while True:
            getter = asyncio.create_task(messages.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                task.result()  # the app raised: re-raise it here
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                yield (
                    message["status"],
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]],
                )
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
    finally:
        task.cancel()


def router_app(backends: dict, policy: HybridPolicy, metrics=None):
    """The FastAPI app of the HybridRouter: every request forwarded whole to the side the policy
    picks (the model list and health go to the vertical side)."""
    app = FastAPI(title="moray hybrid", version="0.1.0")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request):
        body = await request.body()
        backend, reason = "vertical", "other"
        if request.method == "POST" and f"/{path}" in ROUTED_PATHS:
            try:
                parsed = json.loads(body or b"{}")
            except ValueError:
                parsed = {}  # the backend answers a malformed body with its 400
            if isinstance(parsed, dict):
                backend, reason = policy.choose(parsed)
        if metrics is not None:
            metrics.decided(backend, reason, policy)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        target = f"/{path}" + (f"?{request.url.query}" if request.url.query else "")
        policy.inflight[backend] += 1
        started = time.monotonic()
        stream = (
            backends[backend]
            .options(stream=True)
            .asgi.remote(request.method, target, headers, body, policy.threads(backend))
        )
        try:
            status, response_headers = await stream.__anext__()
        except BaseException:
            policy.inflight[backend] -= 1
            raise

        async def chunks():
            first = True
            try:
                async for chunk in stream:
                    if first:
                        policy.observe(backend, time.monotonic() - started)
                        first = False
                    yield chunk
            finally:
                policy.inflight[backend] -= 1
                if metrics is not None:
                    metrics.decided(None, None, policy)

        kept = {k: v for k, v in response_headers if k.lower() not in ("content-length", "transfer-encoding")}
        kept["x-moray-backend"] = backend
        return StreamingResponse(chunks(), status_code=status, headers=kept)

    return app


class HybridMetrics:
    """moray_hybrid_requests_total{backend,reason}, moray_hybrid_inflight{backend} and
    moray_hybrid_vertical_limit; nothing outside Ray."""

    def __init__(self, model: str):
        from moray.platform.metrics import LazyGauges

        self.tags = {"model": model}
        self._requests = None
        self.gauges = LazyGauges(lambda rm: {
            "inflight": rm.Gauge("moray_hybrid_inflight", "Requests in flight on each side", ("model", "backend")),
            "limit": rm.Gauge("moray_hybrid_vertical_limit", "Requests the vertical side takes at once", ("model",)),
        })  # fmt: skip

    def decided(self, backend: str | None, reason: str | None, policy: HybridPolicy) -> None:
        import ray

        if not ray.is_initialized():
            return
        if backend is not None:
            if self._requests is None:
                from ray.util import metrics as rm

                self._requests = rm.Counter("moray_hybrid_requests_total",
                                            "Requests the hybrid policy sent to each side",
                                            ("model", "backend", "reason"))  # fmt: skip
            self._requests.inc(1, {**self.tags, "backend": backend, "reason": reason})
        for side in BACKENDS:
            self.gauges.set("inflight", policy.inflight[side], {**self.tags, "backend": side})
        self.gauges.set("limit", policy.limit, self.tags)
