"""Continuous-batching scheduler: which requests run in the next step, and how much of each.

Every step, each running request either decodes one token or prefills a chunk of its prompt.
Blocks of the paged latent cache are taken at admission (the whole prompt) and one at a time as
a request decodes past a block boundary. When the pool runs dry, the most recently admitted
request is preempted: its blocks are freed and it goes back to the head of the queue, to be
recomputed (prompt + the tokens it already produced) when there is room again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from moray.actors.engine.block_cache import BlockPool
from moray.model.sampling import check_sampling


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestParams:
    """Per-request sampling and stopping (OpenAI's names)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    stop_token_ids: tuple[int, ...] = ()  # in addition to eos
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n >= 0: the chosen token's logprob + the top n

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, 20]")

    @property
    def greedy(self) -> bool:
        # below 1e-5, logits / temperature overflow to inf (vLLM draws the same line)
        return self.temperature < 1e-5 or self.top_k == 1


@dataclass(eq=False)  # identity: a request is only ever equal to itself
class Request:
    request_id: str
    prompt_ids: list[int]
    params: RequestParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of all_ids whose latents are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    detok: object | None = None  # Detokenizer when the engine has a tokenizer
    sink: object | None = None  # where outputs go (the async engine's queue)

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.num_computed


@dataclass
class Work:
    request: Request
    start: int  # first position of this step's tokens
    tokens: list[int]  # the tokens to feed
    sample: bool  # the last of them is the sequence's last token: sample the next


@dataclass
class StepPlan:
    decode: list[Work] = field(default_factory=list)  # one token each, batched together
    prefill: list[Work] = field(default_factory=list)  # a chunk each
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_chunk: int,
    ):  # the defaults are EngineConfig's
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                self.finish(r, "abort")
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                r.status, r.finish_reason = Status.FINISHED, "abort"
                return r
        return None

    def finish(self, request: Request, reason: str) -> None:
        request.status, request.finish_reason = Status.FINISHED, reason
        self.pool.release(request.blocks)
        request.blocks = []
        if request in self.running:
            self.running.remove(request)

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self.pool.release(request.blocks)
        request.blocks, request.num_computed = [], 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)
        plan.preempted.append(request)

    def preempt_all(self) -> list[Request]:
        """Every running request back to the head of the queue, its cache freed (recomputed when it
        is admitted again), in admission order."""
        plan = StepPlan()
        for r in reversed(list(self.running)):
            self._preempt(r, plan)
        return plan.preempted

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        # 1. decodes: one token each; grow by a block at a boundary, preempting the newest if dry
        for r in list(self.running):
            if r.status is not Status.RUNNING or r.uncomputed != 1:
                continue
            while self.pool.blocks_for(r.num_tokens) > len(r.blocks):
                got = self.pool.allocate(1)
                if got is not None:
                    r.blocks += got
                    continue
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is r:
                    break
            if r.status is Status.RUNNING:
                plan.decode.append(Work(r, r.num_computed, [r.all_ids[-1]], sample=True))
                budget -= 1
        # 2. prefill chunks of admitted requests, oldest first
        for r in self.running:
            if budget <= 0:
                break
            if r.uncomputed > 1:
                plan.prefill.append(self._chunk(r, budget))
                budget -= len(plan.prefill[-1].tokens)
        # 3. admit waiting requests while there are blocks (the whole sequence so far) and budget
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if any(r is p for p in plan.preempted):
                break  # it was pushed back this step: the pool is dry
            blocks = self.pool.allocate(self.pool.blocks_for(r.num_tokens))
            if blocks is None:
                break  # admission control: wait for blocks to free up
            self.waiting.popleft()
            r.blocks, r.status = blocks, Status.RUNNING
            self.running.append(r)
            plan.prefill.append(self._chunk(r, budget))
            budget -= len(plan.prefill[-1].tokens)
        return plan

    def _chunk(self, r: Request, budget: int) -> Work:
        n = min(r.uncomputed, self.prefill_chunk, max(budget, 1))
        start = r.num_computed
        ids = r.all_ids[start : start + n]
        return Work(r, start, ids, sample=start + n == r.num_tokens)
