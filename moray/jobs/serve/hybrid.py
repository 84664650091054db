"""Hybrid serving: vertical capacity (whole-model replicas: lowest latency for small requests) and
horizontal capacity (replicas over shared expert shards: throughput for large batches and high
concurrency) behind one API, with a policy that picks one per request.

    client -> Vertical replica (the ingress: the OpenAI HTTP and gRPC APIs, with HybridMiddleware)
                 |  policy: small, and this replica has room -> served here, in process
                 |          large (n > 1, long prompt or output), or this replica full -> forwarded
                 v
              Horizontal: MorayBackend replicas over the expert shards; each answers a forwarded
              request with its own OpenAI server (the request goes whole, the response streams
              back), so every endpoint, error and stream is the same as in the other modes.

The router lives in the vertical replicas because most requests stay there: a separate router
deployment cost every token of every request one more actor hop (about 9 ms of inter-token latency
on the 2-core benchmark machine), a forwarded request pays one hop as it would behind any ingress.

Each vertical replica takes up to `vertical_limit` requests at once (default: its engine's
`max_num_seqs`, the batch it runs without queueing). The policy adapts that knob from the time to
first token each side delivers (an exponentially weighted mean): while the vertical side answers
later than the horizontal one it takes fewer, while it answers sooner it takes more. Each side's
replicas autoscale on their own ongoing requests (the vertical side's include those it forwards),
so when the mix shifts the cluster's CPUs move to the side the traffic went to; within a host,
`lend_threads` gives the vertical side the horizontal side's cores while that one is idle. Decisions
are counted in `moray_hybrid_requests_total{backend,reason}` and the knob is
`moray_hybrid_vertical_limit` (the serving dashboard shows both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

BACKENDS = ("vertical", "horizontal")
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class HybridSettings:
    small_tokens: int = 512  # prompt (estimated) + max_tokens at or below this is a small request
    # requests a vertical replica takes at once, to start with (None: its engine's max_num_seqs)
    vertical_limit: int | None = None
    min_vertical_limit: int = 1
    max_vertical_limit: int = 64
    adapt: bool = True  # move vertical_limit by the two sides' time to first token
    # torch threads the vertical side runs on while the horizontal side has nothing in flight (0: its
    # own, always): where both sides share a host's cores, the idle side's go to the busy one
    lend_threads: int = 0

    def __post_init__(self) -> None:
        if self.small_tokens < 1:
            raise ValueError(f"hybrid.small_tokens={self.small_tokens}: must be >= 1")
        start = self.max_vertical_limit if self.vertical_limit is None else self.vertical_limit
        if not 1 <= self.min_vertical_limit <= start <= self.max_vertical_limit:
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

    def __init__(self, settings: HybridSettings, capacity: int | None = None):
        # capacity: the vertical engine's max_num_seqs, the limit's start when the settings give none
        self.settings = s = settings
        start = s.vertical_limit or capacity or s.max_vertical_limit
        self.limit = min(max(start, s.min_vertical_limit), s.max_vertical_limit)
        self.inflight = dict.fromkeys(BACKENDS, 0)
        self.ttft = dict.fromkeys(BACKENDS, None)  # seconds, exponentially weighted
        self.sent: dict[str, int] = {}  # "backend/reason" -> requests, since the start

    def choose(self, body: dict) -> tuple[str, str]:
        backend, reason = self._choose(body)
        key = f"{backend}/{reason}"
        self.sent[key] = self.sent.get(key, 0) + 1
        return backend, reason

    def _choose(self, body: dict) -> tuple[str, str]:
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


@contextlib.contextmanager
def in_flight(policy: HybridPolicy, metrics, backend: str, reason: str):
    """One request on `backend` for the block's duration: counted in the policy (its limit reads
    it) and exported (metrics: HybridMetrics or None)."""
    policy.inflight[backend] += 1
    if metrics is not None:
        metrics.decided(backend, reason, policy)
    try:
        yield
    finally:
        policy.inflight[backend] -= 1
        if metrics is not None:
            metrics.decided(None, None, policy)


def _route(scope) -> str:
    """The request's path below the application's route prefix (Serve's `root_path`, which the
    ASGI path includes)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class HybridMiddleware:
    """ASGI middleware on the vertical side's OpenAI app, which is the hybrid application's ingress:
    each completion request is served here (the policy's "vertical") or forwarded whole to the
    horizontal deployment, whose stream comes back through. Everything else (the model list, health,
    a malformed or oversized body) is answered here. Either way the response says which side served
    it (`x-moray-backend`)."""

    def __init__(self, app, policy: HybridPolicy, forward, lend, metrics=None, max_body: int = 8 << 20):
        # forward(method, path, headers, body) -> async iterator: (status, headers), then chunks;
        # lend(): before a request is served here, the vertical side's torch threads for it
        self.app, self.policy, self.forward, self.lend = app, policy, forward, lend
        self.metrics, self.max_body = metrics, max_body

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope["method"] == "POST" and _route(scope) in ROUTED_PATHS):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body:
            return await self.app(scope, receive, send)  # the server refuses it (413) unread
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went before sending its body
            body, more = body + message.get("body", b""), message.get("more_body", False)
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            parsed = None  # the server answers a malformed body with its 400
        backend, reason = self.policy.choose(parsed) if isinstance(parsed, dict) else ("vertical", "other")
        policy = self.policy
        started, first = time.monotonic(), [True]

        async def send_marked(message):
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-moray-backend", backend.encode())],
                }
            elif first[0] and message.get("body"):
                first[0] = False
                policy.observe(backend, time.monotonic() - started)
            await send(message)

        with in_flight(policy, self.metrics, backend, reason):
            if backend == "vertical":
                self.lend()
                delivered = [False]

                async def replay():
                    if not delivered[0]:
                        delivered[0] = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()  # the disconnect, when the client goes

                await self.app(scope, replay, send_marked)
            else:
                await self._forwarded(scope, body, send_marked)

    async def _forwarded(self, scope, body: bytes, send) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.lower() not in (b"host", b"content-length")]  # fmt: skip
        query = scope.get("query_string", b"").decode()
        stream = self.forward(scope["method"], _route(scope) + (f"?{query}" if query else ""), headers, body)
        status, response_headers = await stream.__anext__()
        dropped = ("content-length", "transfer-encoding")
        await send({"type": "http.response.start", "status": status, "headers": [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers if k.lower() not in dropped
        ]})  # fmt: skip
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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
