"""Engine metrics through `ray.util.metrics` (exported by Ray to Prometheus): TTFT, inter-token
and end-to-end latency histograms, prompt/generated token counters, running/waiting requests,
batch size, KV-cache usage, and tokens routed to each expert of each MoE layer."""

from __future__ import annotations

import time

import torch

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class EngineMetrics:
    """Metric objects are created lazily, so an engine outside Ray can still hold one (no-op)."""

    def __init__(self, model_name: str = "moray", flush_every_s: float = 1.0):
        self.tags = {"model": model_name}
        self.flush_every_s = flush_every_s
        self._m = None
        self._experts: dict[int, torch.Tensor] = {}  # layer -> (E,) tokens since the last flush
        self._last_flush = time.monotonic()
        # plain totals too (tests, /health, benchmarks)
        self.totals = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0}

    def _metrics(self):
        if self._m is None:
            import ray
            from ray.util import metrics as rm

            if not ray.is_initialized():
                self._m = {}
                return self._m
            keys = ("model",)
            self._m = {
                "ttft": rm.Histogram(
                    "moray_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS, keys
                ),
                "itl": rm.Histogram(
                    "moray_inter_token_latency_seconds", "Inter-token latency", LATENCY_BUCKETS, keys
                ),
                "e2e": rm.Histogram(
                    "moray_e2e_request_latency_seconds", "End-to-end latency", LATENCY_BUCKETS, keys
                ),
                "prompt": rm.Counter("moray_prompt_tokens_total", "Prompt tokens processed", keys),
                "gen": rm.Counter("moray_generation_tokens_total", "Tokens generated", keys),
                "running": rm.Gauge("moray_requests_running", "Requests running", keys),
                "waiting": rm.Gauge("moray_requests_waiting", "Requests waiting", keys),
                "batch": rm.Histogram("moray_batch_size", "Requests per engine step", BATCH_BUCKETS, keys),
                "kv": rm.Gauge("moray_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", keys),
                "preempt": rm.Counter("moray_preemptions_total", "Requests preempted", keys),
                "expert": rm.Counter(
                    "moray_expert_tokens_total",
                    "Tokens routed per expert per layer",
                    ("model", "layer", "expert"),
                ),
            }
        return self._m

    def on_first_token(self, r, now: float) -> None:
        m = self._metrics()
        if m:
            m["ttft"].observe(now - r.arrival, self.tags)

    def on_token(self, r, now: float) -> None:
        m = self._metrics()
        if m and r.last_token_time is not None:
            m["itl"].observe(now - r.last_token_time, self.tags)

    def on_finish(self, r) -> None:
        self.totals["requests"] += 1
        self.totals["prompt_tokens"] += len(r.prompt_ids)
        self.totals["generation_tokens"] += len(r.output_ids)
        m = self._metrics()
        if m:
            m["e2e"].observe(time.monotonic() - r.arrival, self.tags)
            m["prompt"].inc(len(r.prompt_ids), self.tags)
            if r.output_ids:
                m["gen"].inc(len(r.output_ids), self.tags)

    def on_step(self, engine, plan, router_stats: list[dict]) -> None:
        for stats in router_stats:
            for layer, s in stats.items():
                t = s.tokens_per_expert.detach().to("cpu", torch.long)
                self._experts[layer] = self._experts.get(layer, torch.zeros_like(t)) + t
        m = self._metrics()
        if not m:
            return
        m["batch"].observe(len(plan.decode) + len(plan.prefill), self.tags)
        if plan.preempted:
            m["preempt"].inc(len(plan.preempted), self.tags)
        now = time.monotonic()
        if now - self._last_flush >= self.flush_every_s:
            self.flush(engine)

    def flush(self, engine=None) -> None:
        self._last_flush = time.monotonic()
        m = self._metrics()
        if not m:
            return
        if engine is not None:
            m["running"].set(engine.num_running, self.tags)
            m["waiting"].set(engine.num_waiting, self.tags)
            m["kv"].set(engine.pool.usage, self.tags)
        for layer, counts in self._experts.items():
            for e, n in enumerate(counts.tolist()):
                if n:
                    m["expert"].inc(n, {**self.tags, "layer": str(layer), "expert": str(e)})
        self._experts = {}

    def expert_counts(self) -> dict[int, list[int]]:
        return {k: v.tolist() for k, v in self._experts.items()}
