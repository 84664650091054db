"""The continuous-batching engine against `moray.model.generate`: same greedy tokens for
concurrent requests of different lengths, under chunked prefill and under preemption."""

import asyncio

import pytest
import torch

from moray.actors.engine import (
    AsyncEngine,
    BlockPool,
    CacheTooSmall,
    ContextLengthExceeded,
    Engine,
    EngineConfig,
    EngineError,
    InvalidPrompt,
    Overloaded,
    PagedCacheView,
    RequestParams,
    Tokenizer,
)  # fmt: skip
from moray.model import LatentCache, SamplingParams, Transformer, generate, preset

GREEDY = RequestParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 40, 1, 33, 9)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    no_stop = SamplingParams(max_new_tokens=20, stop_token_ids=(-1,))
    return [generate(model, [p], no_stop)[0] for p in prompts]


def test_paged_view_matches_latent_cache(model):
    cfg = model.config
    pool = BlockPool(cfg, num_blocks=16, block_size=4)
    tables = [pool.allocate(3), pool.allocate(2)]
    view = PagedCacheView(pool, tables, [0, 0])
    ref = LatentCache(cfg, 2, 12)
    pos = torch.arange(7).expand(2, 7)
    lat = torch.randn(2, 7, pool.width)
    for c in (view, ref):
        c.write(1, pos, lat)
    # row 1 holds 8 tokens: all 7 land; reads gather them back in order
    assert torch.equal(view.read(1, 7), ref.read(1, 7))
    assert torch.equal(pool.data[0], torch.zeros_like(pool.data[0]))  # other layers untouched
    assert pool.num_free == 15 - 5


def test_greedy_matches_generate_concurrently(model, prompts, reference):
    e = Engine(model)
    assert e.generate(prompts, GREEDY) == reference


def test_chunked_prefill_and_small_steps(model, prompts, reference):
    cfg = EngineConfig(prefill_chunk=8, max_num_batched_tokens=12, block_size=4)
    e = Engine(model, config=cfg)
    assert e.generate(prompts, GREEDY) == reference


def test_preemption_under_tiny_budget_gives_the_same_tokens(model, prompts, reference):
    per_block = BlockPool.bytes_per_block(model.config, 4)
    cfg = EngineConfig(kv_cache_bytes=16 * per_block, block_size=4, prefill_chunk=16)
    e = Engine(model, config=cfg)
    assert e.pool.capacity_blocks == 16
    assert e.generate(prompts, GREEDY) == reference
    assert e.scheduler.num_preemptions > 0
    assert e.pool.num_free == 16  # every block came back


def test_requests_join_between_decode_steps(model, prompts, reference):
    e = Engine(model)
    first = e.add_request(prompts[0], GREEDY)
    for _ in range(5):
        e.step()
    assert len(first.output_ids) == 5
    late = e.add_request(prompts[2], GREEDY)
    batch_sizes = []
    while e.has_work():
        e.step()
        batch_sizes.append(e.last_batch_size)
    assert first.output_ids == reference[0] and late.output_ids == reference[2]
    assert max(batch_sizes) == 2  # the late request ran alongside the first


def test_seeded_sampling_reproducible_and_matches_generate(model, prompts):
    p = RequestParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    a = Engine(model).generate(prompts[:3], p)
    b = Engine(model).generate(prompts[:3][::-1], p)[::-1]  # other batch order, same per-request seed
    assert a == b
    ref = generate(
        model,
        [prompts[1]],
        SamplingParams(12, temperature=0.9, top_k=50, top_p=0.95, seed=7, stop_token_ids=(-1,)),
    )[0]
    assert a[1] == ref
    other = Engine(model).generate(prompts[:1], RequestParams(**{**p.__dict__, "seed": 8}))
    assert other[0] != a[0]


def test_stop_tokens_max_tokens_and_logprobs(model, prompts, reference):
    e = Engine(model)
    stop_at = reference[1][3]
    r = e.add_request(
        prompts[1], RequestParams(max_tokens=20, temperature=0, stop_token_ids=(stop_at,), logprobs=2)
    )
    outs = []
    while e.has_work():
        outs += e.step()
    assert r.output_ids == reference[1][: reference[1].index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"
    lp = outs[0].logprobs[0]
    assert lp.token_id == reference[1][0] and lp.logprob <= 0 and len(lp.top) == 2
    assert lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob)
    short = Engine(model).generate([prompts[0]], RequestParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert short[0] == reference[0][:3]


def test_stop_strings_with_tokenizer(model, tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    e = Engine(model, tokenizer=tok)
    ids = tok.encode("My lord, the king")
    free = e.add_request(ids, RequestParams(max_tokens=24, temperature=0, ignore_eos=True))
    outs = []
    while e.has_work():
        outs += e.step()
    full = "".join(o.new_text for o in outs)
    assert full == tok.decode(free.output_ids)
    stop = full[5:8]
    e2 = Engine(model, tokenizer=tok)
    e2.add_request(ids, RequestParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)))
    outs = []
    while e2.has_work():
        outs += e2.step()
    text = "".join(o.new_text for o in outs)
    assert text == full[: full.index(stop)] and outs[-1].finish_reason == "stop"


def test_int8_engine_runs_and_mostly_agrees(model, prompts, reference):
    e = Engine(model, config=EngineConfig(quantize="int8"))
    out = e.generate(prompts, GREEDY)
    agree = sum(a[0] == b[0] for a, b in zip(out, reference))
    assert agree >= len(prompts) - 1  # first tokens rarely flip under int8 weights


def test_int4_engine_equals_generate_on_the_same_int4_weights(model, prompts):
    """The engine's paged, continuously batched steps through the int4 kernel give the tokens that
    `generate` gives one prompt at a time over the same int4 model (greedy)."""
    from moray.model.quant import QuantizedRoutedExperts, quantize

    e = Engine(model, config=EngineConfig(quantize="int4"))
    assert any(isinstance(m, QuantizedRoutedExperts) for m in e.runner.model.modules())
    q = quantize(model, "int4")
    no_stop = SamplingParams(max_new_tokens=20, stop_token_ids=(-1,))
    want = [generate(q, [p], no_stop)[0] for p in prompts]
    assert [o[:20] for o in e.generate(prompts, GREEDY)] == want


def test_refusals_are_typed(model):
    e = Engine(model, config=EngineConfig(max_waiting=1, kv_cache_bytes=1 << 16, block_size=4))
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 1024"):
        e.add_request([5] * 1000, RequestParams(max_tokens=100))
    capacity = e.pool.capacity_blocks * e.pool.block_size
    assert capacity < e.max_context
    with pytest.raises(CacheTooSmall, match=f"holds {capacity}"):
        e.add_request([5] * capacity, RequestParams(max_tokens=1))
    with pytest.raises(InvalidPrompt, match="empty"):
        e.add_request([], RequestParams())
    with pytest.raises(InvalidPrompt, match="token ids"):
        e.add_request([model.config.vocab_size], RequestParams())
    e.add_request([5, 6], RequestParams())
    with pytest.raises(Overloaded):
        e.add_request([5, 6], RequestParams())
    for error in (ContextLengthExceeded, CacheTooSmall, InvalidPrompt, Overloaded):
        assert issubclass(error, EngineError)


def test_async_engine_streams_concurrent_requests(model, prompts, reference):
    async def main():
        ae = AsyncEngine(Engine(model))
        try:

            async def one(p):
                return [t async for o in ae.generate(p, GREEDY) for t in o.new_token_ids]

            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            ae.shutdown()

    assert asyncio.run(main()) == reference


def test_async_engine_accepts_requests_while_a_step_runs(model, prompts, reference):
    """add() only validates and enqueues: it returns while the loop thread is inside a step (the
    old engine-wide lock made every new request wait for the step, one admission per step)."""
    import threading

    in_step, release = threading.Event(), threading.Event()

    class SlowEngine(Engine):
        def step(self):
            if self.num_running and not release.is_set():
                in_step.set()
                release.wait(30)  # the timeout only keeps a broken add() from hanging the suite
            return super().step()

    async def main():
        ae = AsyncEngine(SlowEngine(model))
        try:
            first = asyncio.ensure_future(_collect(ae, prompts[0]))
            while not in_step.is_set():
                await asyncio.sleep(0.01)
            rid, q = ae.add(prompts[1], GREEDY)  # while the step is blocked
            accepted_during_step = not release.is_set()
            release.set()
            second = [t async for o in ae.stream(rid, q) for t in o.new_token_ids]
            return accepted_during_step, await first, second
        finally:
            ae.shutdown()

    accepted, first, second = asyncio.run(main())
    assert accepted
    assert [first, second] == reference[:2]


async def _collect(ae, prompt):
    return [t async for o in ae.generate(prompt, GREEDY) for t in o.new_token_ids]


def test_async_engine_builds_on_its_thread_and_reports_build_errors(model):
    import threading

    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return Engine(model)

    ae = AsyncEngine(build)
    ae.shutdown()
    assert built_on == ["moray-engine"]

    def broken():
        raise FileNotFoundError("no model here")

    with pytest.raises(FileNotFoundError, match="no model here"):
        AsyncEngine(broken)


def test_async_engine_steps_on_the_threads_it_is_lent(model, prompts):
    """set_threads(n) takes effect on the loop thread from the next step; 0 gives its own back."""
    seen = []
    engine = Engine(model)
    engine.before_step = lambda: seen.append(torch.get_num_threads())
    ae = AsyncEngine(engine)
    own = ae._threads

    async def run(n):
        ae.set_threads(n)
        seen.clear()
        return [t async for o in ae.generate(prompts[0], GREEDY) for t in o.new_token_ids]

    try:
        lent, back = asyncio.run(run(own + 1)), asyncio.run(run(0))
        assert set(seen) == {own}
        asyncio.run(run(own + 1))
        assert set(seen) == {own + 1}
    finally:
        ae.shutdown()
    assert lent == back  # the same tokens on any thread count


def test_chunked_prefill_interleaves_with_decode(model):
    """A long prompt is prefilled in chunks while a running request keeps decoding every step."""
    e = Engine(model, config=EngineConfig(prefill_chunk=32, max_num_batched_tokens=64))
    a = e.add_request([5, 6, 7], RequestParams(max_tokens=50, temperature=0, ignore_eos=True))
    e.step()
    b = e.add_request(list(range(3, 203)), RequestParams(max_tokens=4, temperature=0, ignore_eos=True))
    steps = 0
    while not b.output_ids:
        before = len(a.output_ids)
        e.step()
        steps += 1
        assert len(a.output_ids) == before + 1  # the decode never stalls behind the prefill
    assert steps == 7  # ceil(200 / 32) chunks
    ref = generate(model, [list(range(3, 203))], SamplingParams(max_new_tokens=4, stop_token_ids=(-1,)))[0]
    while e.has_work():
        e.step()
    assert b.output_ids == ref


def test_bf16_engine_runs_and_mostly_agrees(model, prompts, reference):
    from moray.model.decode_weights import onednn_bf16

    if not onednn_bf16():
        pytest.skip("this CPU has no native bf16 (oneDNN)")
    e = Engine(model, config=EngineConfig(bf16=True))
    assert e.pool.data.dtype == torch.bfloat16  # the latent cache in bf16 too: half the bytes per token
    out = e.generate(prompts, GREEDY)
    assert sum(a[0] == b[0] for a, b in zip(out, reference)) >= len(prompts) - 1
    assert next(model.parameters()).dtype == torch.float32  # the engine decodes a bf16 copy
    with pytest.raises(ValueError, match="bf16 and quantize=int8: choose one"):
        EngineConfig(bf16=True, quantize="int8")
    with pytest.raises(ValueError, match="quantize='int3': one of int8, int4, or null"):
        EngineConfig(quantize="int3")
