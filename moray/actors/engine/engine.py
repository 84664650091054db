"""The inference engine: continuous batching over the paged latent cache.

`Engine` is synchronous and single-threaded (`add_request`, `step`), for tests and benchmarks;
`AsyncEngine` runs its step loop in a background thread and streams each request's outputs to an
async iterator, which is what a Serve replica holds. Model execution sits behind `ModelRunner`
(one forward over a batch of paged rows), the boundary where experts can later move to actors.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from moray.actors.engine.block_cache import BlockPool, PagedCacheView
from moray.actors.engine.scheduler import Request, RequestParams, Scheduler, Status
from moray.model.sampling import SamplingParams, greedy, sample
from moray.model.transformer import Transformer


class EngineError(Exception):
    """The engine refused a request. Front ends map each subclass to a status by its type
    (HTTP 400/429, gRPC INVALID_ARGUMENT/RESOURCE_EXHAUSTED), never by the message text."""


class InvalidPrompt(EngineError):
    """The prompt is empty or holds token ids outside the vocabulary."""


class ContextLengthExceeded(EngineError):
    """The prompt plus max_tokens is longer than the model's context."""


class CacheTooSmall(EngineError):
    """The request fits the context but not this engine's whole KV cache."""


class Overloaded(EngineError):
    """The waiting queue is full: retry later."""


class Unavailable(EngineError):
    """Something the engine depends on (an expert shard) failed and could not be repaired: retry later."""


@dataclass
class EngineConfig:
    """The engine's settings, with the one set of defaults (serving nests it as `engine:`)."""

    kv_cache_bytes: int = 64 << 20  # budget for the paged latent cache
    block_size: int = 16
    max_num_seqs: int = 64  # running requests at once
    # tokens per step (decodes + prefill chunks). Prefill is cheaper per token in bigger steps: each
    # routed expert multiplies more rows per weight it reads (small preset, 32 prompts of 64 tokens:
    # one step of 2048 takes 150 ms, four of 512 take 300)
    max_num_batched_tokens: int = 2048
    prefill_chunk: int = 256  # longest prompt piece in one step
    max_waiting: int = 256  # queue beyond which requests are refused with Overloaded (HTTP 429)
    # weight-only quantization (moray.model.quant): None, "int8" (per-channel) or "int4" (group-wise)
    quantize: str | None = None
    # bf16 weights laid out for CPU decode (moray.model.decode_weights): about 2x fp32's decode steps
    bf16: bool = False

    def __post_init__(self) -> None:
        for name in (
            "kv_cache_bytes",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "prefill_chunk",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting={self.max_waiting}: must be >= 0")
        from moray.model.quant import FORMATS

        if self.quantize is not None and self.quantize not in FORMATS:
            raise ValueError(f"quantize={self.quantize!r}: one of {', '.join(FORMATS)}, or null")
        if self.bf16 and self.quantize:
            raise ValueError(f"bf16 and quantize={self.quantize}: choose one weight format")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class Batch:
    """Rows of new tokens right-padded into one forward, and where their caches are."""

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor | None  # (B, T) 1 real / 0 pad; None without padding
    block_tables: list[list[int]]
    starts: list[int]  # each row's cached length before these tokens
    keep: int  # logits kept per row: enough to reach every row's last real token
    last: torch.Tensor  # (B,) each row's last real token among the kept logits

    @classmethod
    def of(cls, works) -> Batch:
        lengths = [len(w.tokens) for w in works]
        T = max(lengths)
        ids = torch.zeros(len(works), T, dtype=torch.long)  # (B, T)
        for i, w in enumerate(works):
            ids[i, : len(w.tokens)] = torch.tensor(w.tokens, dtype=torch.long)
        mask = None
        if min(lengths) != T:  # padding: the model keeps it out of attention, MoE and statistics
            mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
        keep = T - min(lengths) + 1
        last = torch.tensor(lengths) - 1 - (T - keep)
        return cls(ids, mask, [w.request.blocks for w in works], [w.start for w in works], keep, last)

    def last_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, keep, V) -> (B, V): each row's last real token's."""
        if logits.shape[1] == 1:  # decode: a view, not a gathered copy of every row's logits
            return logits[:, 0]
        return logits[torch.arange(len(self.starts), device=logits.device), self.last.to(logits.device)]


class ModelRunner:
    """Runs the model on paged rows; the one place the engine touches `Transformer`."""

    cache_layers = None  # the engine's pool stores every layer's cache entries

    def __init__(self, model: Transformer):
        self.model = model.eval()
        self.config = model.config

    @torch.inference_mode()
    def forward(self, pool: BlockPool, works) -> tuple[torch.Tensor, dict]:
        """works: rows of new tokens (right-padded into one batch when their lengths differ).
        Returns the logits (B, V) of each row's last new token and this forward's router statistics."""
        device = pool.data.device
        b = Batch.of(works)
        view = PagedCacheView(pool, b.block_tables, b.starts)
        mask = None if b.mask is None else b.mask.to(device)
        out = self.model(b.ids.to(device), attention_mask=mask, cache=view, num_logits_to_keep=b.keep)
        return b.last_logits(out.logits), out.router_stats


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        config: EngineConfig | None = None,
        metrics=None,
        runner=None,
    ):
        """`runner` computes the forwards (default: ModelRunner over `model`); a PipelineRunner
        sends them through pipeline stage actors, and `model` then holds only the embedding and head."""
        self.config = config or EngineConfig()
        if self.config.quantize:
            from moray.model.quant import quantize

            model = quantize(model, self.config.quantize)
        if self.config.bf16:
            from moray.model.decode_weights import for_decode

            model = for_decode(model)
        self.model_config = model.config
        self.runner = runner or ModelRunner(model)
        self.tokenizer = tokenizer
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32
        device = model.lm_head.weight.device if hasattr(model.lm_head, "weight") else "cpu"
        self.pool = BlockPool.from_budget(
            model.config, self.config.kv_cache_bytes, self.config.block_size, dtype, device,
            self.runner.cache_layers,
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.pool, self.config.max_num_seqs, self.config.max_num_batched_tokens, self.config.prefill_chunk
        )
        # End of sequence: the model config's eos and the tokenizer's stop ids (generation_config.json)
        eos = [model.config.eos_token_id] if model.config.eos_token_id is not None else []
        self.stop_ids = frozenset(eos + list(getattr(tokenizer, "stop_token_ids", ())))
        self.max_context = model.config.max_position_embeddings
        self.max_prompt_chars = self._max_prompt_chars()
        self.metrics = metrics
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}
        self.last_batch_size = 0
        # repair(error) -> bool: called when a step fails; True when it fixed the cause (re-attached
        # a restarted expert shard). Then the running requests recompute their caches and go on.
        self.repair: Callable[[BaseException], bool] | None = None
        self.before_step: Callable[[], None] | None = None  # between steps: expert placement changes
        self.extra_stats: Callable[[], dict] | None = None  # the remote parts' figures, for /health
        self.num_repairs = 0
        self._failed_steps = 0  # in a row

    # ---------------------------------------------------------------- requests
    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthExceeded or CacheTooSmall if a request of this size can never run."""
        if num_prompt_tokens < 1:
            raise InvalidPrompt("the prompt is empty")
        if num_prompt_tokens + max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_context} tokens; the request has "
                f"{num_prompt_tokens} prompt tokens and asks for {max_tokens} more"
            )
        need = self.pool.blocks_for(num_prompt_tokens + max_tokens)
        if need > self.pool.capacity_blocks:
            raise CacheTooSmall(
                f"the request needs {need * self.pool.block_size} tokens of KV cache; the engine holds "
                f"{self.pool.capacity_blocks * self.pool.block_size}"
            )

    def _max_prompt_chars(self) -> int | None:
        """The longest prompt text that could fit the context: max_context tokens of the vocabulary's
        longest text, with a slack of 4 for what that bound does not see (special tokens, which
        decode to nothing here, and normalizers that merge characters, as NFC merges Hangul jamo
        three to one). None without a tokenizer."""
        if self.tokenizer is None:
            return None
        longest = max(len(self.tokenizer.decode([i])) for i in range(self.tokenizer.vocab_size))
        return 4 * self.max_context * max(longest, 1)

    def encode(self, text: str) -> list[int]:
        """A prompt text's token ids. Text too long to fit the context is refused before tokenizing:
        tokenizing holds the GIL for about a second per MB, stalling every other request."""
        if len(text) > self.max_prompt_chars:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_context} tokens; the prompt has "
                f"{len(text)} characters, more than that many tokens could hold ({self.max_prompt_chars})"
            )
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidPrompt("the prompt encodes to no tokens")
        return ids

    def validate(self, prompt_ids: list[int], params: RequestParams) -> list[int]:
        """The prompt as ints, or EngineError if the request can never run. Reads no mutable state,
        so a front end may call it from its own thread while the step loop runs."""
        prompt_ids = [int(t) for t in prompt_ids]
        self.check(len(prompt_ids), params.max_tokens)
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_ids):
            raise InvalidPrompt(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        return prompt_ids

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(
        self,
        prompt_ids: list[int],
        params: RequestParams | None = None,
        request_id: str | None = None,
        sink=None,
    ) -> Request:
        params = params or RequestParams()
        prompt_ids = self.validate(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise Overloaded(f"{len(self.scheduler.waiting)} requests are waiting")
        request_id = request_id or self.new_request_id()
        r = Request(request_id, prompt_ids, params, sink=sink)
        if self.tokenizer is not None:
            from moray.actors.engine.tokenizer import Detokenizer

            r.detok = Detokenizer(self.tokenizer, params.stop)
        self.requests[request_id] = r
        self.scheduler.add(r)
        return r

    def abort(self, request_id: str) -> None:
        r = self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)
        if r is not None and self.metrics:
            self.metrics.on_finish(r)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        if self.before_step is not None:
            self.before_step()
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        outputs: list[RequestOutput] = []
        stats: list[dict] = []
        try:
            if plan.decode:
                logits, rs = self.runner.forward(self.pool, plan.decode)
                stats.append(rs)
                outputs += self._advance(plan.decode, logits)
            if plan.prefill:  # every prefill chunk of this step in one right-padded forward
                logits, rs = self.runner.forward(self.pool, plan.prefill)
                stats.append(rs)
                outputs += self._advance(plan.prefill, logits)
        except Exception as e:
            self._recover(e)
            return outputs  # what the step finished before it failed
        self._failed_steps = 0
        self.last_batch_size = len(plan.decode) + len(plan.prefill)
        if self.metrics:
            self.metrics.on_step(self, plan, stats)
        return outputs

    MAX_FAILED_STEPS = 3

    def _recover(self, error: Exception) -> None:
        """A step failed: let `repair` fix the cause, then recompute every running request's cache
        (the failed forward may have written part of this step's entries). Raises `error` when
        nothing can repair it, Unavailable when the repair fails or steps keep failing."""
        if self.repair is None:
            raise error
        self._failed_steps += 1
        try:
            repaired = self.repair(error)
        except Exception as e:
            raise Unavailable(f"{error}; the repair failed: {e}") from e
        if not repaired:
            raise error
        if self._failed_steps >= self.MAX_FAILED_STEPS:
            raise Unavailable(
                f"{self._failed_steps} steps in a row failed, the last with: {error}"
            ) from error
        self.num_repairs += 1
        self.scheduler.preempt_all()

    def _advance(self, works, logits: torch.Tensor) -> list[RequestOutput]:
        now = time.monotonic()
        for w in works:
            w.request.num_computed = w.start + len(w.tokens)
        rows = [i for i, w in enumerate(works) if w.sample]
        if not rows:
            return []
        if len(rows) < len(works):
            logits = logits[rows]  # (n, V)
        sampled = self._sample([works[i].request for i in rows], logits)
        outs = []
        for j, i in enumerate(rows):
            r = works[i].request
            if r.status is not Status.RUNNING:
                continue
            tok = sampled[j]
            r.output_ids.append(tok)
            if r.first_token_time is None:
                r.first_token_time = now
                if self.metrics:
                    self.metrics.on_first_token(r, now)
            elif self.metrics:
                self.metrics.on_token(r, now)
            r.last_token_time = now
            lp = []
            if r.params.logprobs is not None:
                lp = [self._logprob(logits[j].float().cpu(), tok, r.params.logprobs)]
            reason = None
            if (tok in self.stop_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
                reason = "stop"
            elif len(r.output_ids) >= r.params.max_tokens or r.num_tokens >= self.max_context:
                reason = "length"
            text = ""
            if r.detok is not None:
                ids = r.output_ids[:-1] if reason == "stop" else r.output_ids  # stop tokens are not text
                text = r.detok.update(ids, final=reason is not None)
                if r.detok.stopped:
                    reason = "stop"
            if reason is not None:
                self.scheduler.finish(r, reason)
                self.requests.pop(r.request_id, None)
                if self.metrics:
                    self.metrics.on_finish(r)
            outs.append(
                RequestOutput(
                    r.request_id,
                    [tok],
                    text,
                    lp,
                    reason is not None,
                    reason,
                    len(r.prompt_ids),
                    len(r.output_ids),
                )
            )
        return outs

    @staticmethod
    def _sample(requests: list[Request], logits: torch.Tensor) -> list[int]:
        """logits (n, V) in the model's dtype and device: greedy rows take the argmax there (casting
        to fp32 changes no order); sampled rows go to fp32 on the CPU, where their generators live."""
        out = greedy(logits).tolist()
        for j, r in enumerate(requests):
            p = r.params
            if not p.greedy:
                sp = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
                try:
                    out[j] = int(sample(logits[j : j + 1].float().cpu(), sp, r.generator)[0])
                except RuntimeError:  # a degenerate distribution (inf/nan): keep the argmax
                    pass
        return out

    @staticmethod
    def _logprob(logits: torch.Tensor, tok: int, top: int) -> TokenLogprob:
        lsm = torch.log_softmax(logits, dim=-1)
        best = []
        if top:
            v, i = torch.topk(lsm, top)
            best = list(zip(i.tolist(), v.tolist()))
        return TokenLogprob(tok, float(lsm[tok]), best)

    # ---------------------------------------------------------------- offline use
    def generate(
        self, prompts: list[list[int]], params: RequestParams | list[RequestParams]
    ) -> list[list[int]]:
        """Run prompts to completion (all added up front); returns each one's new tokens."""
        ps = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, q) for p, q in zip(prompts, ps)]
        while self.has_work():
            self.step()
        return [r.output_ids for r in reqs]


def _deliver(items: list) -> None:
    """On the event loop: each (queue, output) of one step into its request's queue."""
    for q, o in items:
        q.put_nowait(o)


class AsyncEngine:
    """The engine's step loop in a background thread; `generate` streams a request's outputs.

    Only the loop thread touches the engine's state. Callers (an asyncio event loop serving HTTP)
    validate a request in their own thread, then hand it over through an inbox that the loop
    drains between steps, so accepting a request never waits for a step to finish.

    Pass a function that builds the Engine (loads the model) to have the loop thread do it: then
    that thread is the only one that ever runs OpenMP work. A second thread team in the process
    (say, from loading the model on another thread) makes libgomp see more threads than cores and
    cut its spin-waiting, which doubles the time of decode's many small matmuls on a small machine.
    """

    def __init__(self, engine: Engine | Callable[[], Engine]):
        self.engine: Engine = engine if isinstance(engine, Engine) else None  # type: ignore[assignment]
        self._inbox: collections.deque = collections.deque()  # ("add", rid, ids, params) | ("abort", rid)
        self._wake = threading.Event()
        self._stop = False
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._threads = torch.get_num_threads()
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, args=(engine,), name="moray-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    def _loop(self, build) -> None:
        torch.set_grad_enabled(False)
        # OpenMP's thread count is per OS thread and a new thread starts from OMP_NUM_THREADS, which
        # Ray sets to the actor's num_cpus: without this the engine runs on one core in a replica.
        torch.set_num_threads(self._threads)
        try:
            if self.engine is None:
                self.engine = build()
        except BaseException as e:  # surfaces in __init__
            self._build_error = e
            return
        finally:
            self._ready.set()
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                m = self.engine.metrics
                if m is not None and time.monotonic() - m._last_flush >= m.flush_every_s:
                    m.flush(self.engine)  # gauges fall back to zero when idle
                if not self._inbox:
                    self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # never leave clients hanging
                self._fail_all(e)
                continue
            # One wake-up of each event loop per step, not one per output: each call_soon_threadsafe
            # writes to the loop's self-pipe and hands it the GIL, in the middle of the next step.
            deliveries: dict[asyncio.AbstractEventLoop, list] = {}
            for o in outputs:
                r_sink = self._sinks.pop(o.request_id, None) if o.finished else self._sinks.get(o.request_id)
                if r_sink is not None:
                    loop, q = r_sink
                    deliveries.setdefault(loop, []).append((q, o))
            for loop, items in deliveries.items():
                loop.call_soon_threadsafe(_deliver, items)

    def set_threads(self, n: int) -> None:
        """Run the steps on n torch threads from the next one on (0: the count it started with)."""
        self._inbox.append(("threads", n or self._threads))
        self._wake.set()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, rid, *rest = self._inbox.popleft()
            if kind == "threads":  # OpenMP's team size is per OS thread: set it on the loop's
                torch.set_num_threads(rid)
                continue
            if kind == "abort":
                self.engine.abort(rid)
                continue
            if rid not in self._sinks:  # aborted before it reached the engine
                continue
            try:
                self.engine.add_request(*rest, request_id=rid)
            except Exception as e:  # validated already; only a race on the waiting limit lands here
                loop, q = self._sinks.pop(rid)
                loop.call_soon_threadsafe(q.put_nowait, e)

    def _fail_all(self, e: BaseException) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink[0].call_soon_threadsafe(sink[1].put_nowait, e)

    def add(self, prompt_ids: list[int], params: RequestParams, request_id: str | None = None):
        """Validate and enqueue; raises EngineError/Overloaded at once. Returns (request_id, queue)."""
        loop = asyncio.get_running_loop()
        prompt_ids = self.engine.validate(prompt_ids, params)
        waiting = self.engine.num_waiting + len(self._inbox)
        if waiting >= self.engine.config.max_waiting:
            raise Overloaded(f"{waiting} requests are waiting")
        rid = request_id or self.engine.new_request_id()
        q: asyncio.Queue = asyncio.Queue()
        self._sinks[rid] = (loop, q)
        self._inbox.append(("add", rid, prompt_ids, params))
        self._wake.set()
        return rid, q

    async def stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                o = await q.get()
                if isinstance(o, EngineError):  # Unavailable: the front ends' 503 / UNAVAILABLE
                    raise o
                if isinstance(o, BaseException):
                    raise RuntimeError(f"engine failed: {o}") from o
                yield o
                if o.finished:
                    return
        finally:
            if request_id in self._sinks:  # the client went away early
                self.abort(request_id)

    async def generate(self, prompt_ids, params, request_id=None) -> AsyncIterator[RequestOutput]:
        rid, q = self.add(prompt_ids, params, request_id)
        async for o in self.stream(rid, q):
            yield o

    def abort(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        e = self.engine
        return {
            "running": e.num_running,
            "waiting": e.num_waiting,
            "kv_cache_usage": e.pool.usage,
            "preemptions": e.scheduler.num_preemptions,
            "repairs": e.num_repairs,  # steps that failed and were repaired (a lost expert shard)
            **(e.extra_stats() if e.extra_stats is not None else {}),
        }

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
