"""Serving benchmark in the style of `vllm bench serve`: Poisson arrivals at several rates with
fixed prompt and output lengths, against two Ray Serve applications on the same weights:

- moray: the continuous-batching engine over the paged latent cache (moray.jobs.serve.app);
- baseline: HF transformers `DeepseekV2ForCausalLM.generate`, one request at a time (no
  continuous batching), streaming its tokens through the same SSE protocol.

Reports request and output-token throughput and mean/p50/p99 of TTFT, TPOT, ITL and end-to-end
latency per rate, and the ratio of output-token throughput at the highest rate (target >= 5x at
an equal or better p99 TTFT).

    python benchmarks/bench_serve.py [--preset small] [--rates 2,8,inf] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Result  # noqa: E402

# ---------------------------------------------------------------- the baseline deployment


class HFGenerator:
    """HF transformers `generate` on one request at a time, streaming token ids as SSE lines."""

    def __init__(self, path: str, threads: int):
        import concurrent.futures

        import torch
        import transformers

        def load():
            torch.set_num_threads(threads)  # per OS thread (see AsyncEngine._loop)
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        # one thread loads the model and runs every generate, as moray's engine thread does (see
        # AsyncEngine: a second OpenMP thread team slows small matmuls down on a small machine)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.model = self.pool.submit(load).result()
        self.torch = torch
        self.lock = asyncio.Lock()  # one generate at a time: no continuous batching

    async def stream(self, prompt: list[int], max_tokens: int):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        class Streamer:
            first = True

            def put(self, value):
                if self.first:  # generate hands the prompt over first
                    self.first = False
                    return
                for t in value.reshape(-1).tolist():
                    loop.call_soon_threadsafe(q.put_nowait, t)

            def end(self):
                loop.call_soon_threadsafe(q.put_nowait, None)

        async with self.lock:
            ids = self.torch.tensor([prompt])
            task = loop.run_in_executor(
                self.pool,
                functools.partial(
                    self.model.generate, ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens, do_sample=False, streamer=Streamer(), pad_token_id=0,
                ),
            )  # fmt: skip
            while (t := await q.get()) is not None:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'token': t}]})}\n\n"
            await task
            yield "data: [DONE]\n\n"


def baseline_deployment():
    from ray import serve

    @serve.deployment(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 1})
    @serve.ingress()
    class HFBaseline:
        def __init__(self, path: str, threads: int):
            self.gen = HFGenerator(path, threads)

        def __serve_build_asgi_app__(self):
            from fastapi import Body, FastAPI
            from fastapi.responses import StreamingResponse

            app, gen = FastAPI(), self.gen

            @app.post("/v1/completions")
            async def completions(body: dict = Body(...)):  # noqa: B008 (FastAPI's idiom)
                stream = gen.stream(body["prompt"], body["max_tokens"])
                return StreamingResponse(stream, media_type="text/event-stream")

            return app

    return HFBaseline


# ---------------------------------------------------------------- the load generator


async def one_request(session, url: str, prompt: list[int], max_tokens: int, model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}  # fmt: skip
    t0 = time.perf_counter()
    stamps = []
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            return {"ok": False, "status": f"{resp.status} {(await resp.text())[:200]}"}
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps:
        return {"ok": False, "status": "no tokens"}
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    n = len(stamps)
    return {
        "ok": True, "ttft": stamps[0] - t0, "e2e": end - t0, "itl": itl, "n": n,
        "tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else 0.0,
    }  # fmt: skip


async def run_rate(
    url: str, model: str, rate: float, n: int, prompt_len: int, out_len: int, seed: int
) -> dict:
    import aiohttp

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(prompt_len)] for _ in range(n)]
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        t0 = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(session, url, p, out_len, model)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    failed = {str(r["status"]) for r in results if not r["ok"]}
    if failed:
        print(f"  {len(results) - len(ok)} failed: {sorted(failed)}", flush=True)
    tokens = sum(r["n"] for r in ok)

    def stats(xs):
        xs = sorted(xs)
        if not xs:
            return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
        return {
            "mean": statistics.fmean(xs),
            "p50": xs[len(xs) // 2],
            "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
        }

    return {
        "rate": rate, "completed": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
        "req_per_s": len(ok) / wall, "tok_per_s": tokens / wall,
        "ttft": stats([r["ttft"] for r in ok]), "tpot": stats([r["tpot"] for r in ok]),
        "itl": stats([x for r in ok for x in r["itl"]]), "e2e": stats([r["e2e"] for r in ok]),
    }  # fmt: skip


def print_row(side: str, r: dict) -> None:
    ms = lambda s: f"{1000 * s['mean']:7.1f}/{1000 * s['p50']:7.1f}/{1000 * s['p99']:7.1f}"
    print(
        f"{side:8s} {r['rate']:5g} {r['completed']:4d}/{r['completed'] + r['failed']:<4d} {r['req_per_s']:7.2f} "
        f"{r['tok_per_s']:8.1f}  {ms(r['ttft'])}  {ms(r['tpot'])}  {ms(r['itl'])}  {ms(r['e2e'])}",
        flush=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument(
        "--rates", default="2,8,inf", help="requests per second, comma-separated (inf: all at once)"
    )
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per replica")
    ap.add_argument("--sides", default="moray,hf")
    args = ap.parse_args(argv)

    import ray
    import torch
    from ray import serve

    from moray.jobs.serve.app import build_app
    from moray.model import Transformer, preset, save_pretrained

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    torch.manual_seed(0)
    save_pretrained(Transformer(preset(args.preset)).eval(), tmp / "model")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rates = [float(r) for r in args.rates.split(",")]
    sides = {
        "moray": lambda: build_app(
            {
                "model": str(tmp / "model"),
                "served_model_name": "m",
                "torch_threads": args.threads,
                "engine": {"max_waiting": 100_000},
            }
        ),  # fmt: skip
        "hf": lambda: baseline_deployment().bind(str(tmp / "model"), args.threads),
    }
    results: dict[str, list[dict]] = {}
    print(
        f"preset {args.preset}, prompt {args.prompt_len}, output {args.output_len}, {args.requests} requests/rate"
    )
    print("side      rate  done     req/s    tok/s  TTFT ms mean/p50/p99       TPOT ms                   "
          "ITL ms                    E2E ms")  # fmt: skip
    try:
        for side, build in (
            (k, sides[k]) for k in args.sides.split(",")
        ):  # one side at a time: they share the CPUs
            serve.run(build(), name=side, route_prefix=f"/{side}")
            url = f"http://127.0.0.1:{port}/{side}/v1/completions"
            asyncio.run(run_rate(url, "m", 100.0, 2, args.prompt_len, 4, seed=99))  # warm up
            results[side] = []
            for rate in rates:
                r = asyncio.run(
                    run_rate(url, "m", rate, args.requests, args.prompt_len, args.output_len, seed=1)
                )
                results[side].append(r)
                print_row(side, r)
            serve.delete(side)
    finally:
        serve.shutdown()
        ray.shutdown()
    if set(results) != {"moray", "hf"}:
        return []
    top_m, top_h = results["moray"][-1], results["hf"][-1]
    ratio = top_m["tok_per_s"] / max(top_h["tok_per_s"], 1e-9)
    ttft_ok = top_m["ttft"]["p99"] <= top_h["ttft"]["p99"]
    detail = (
        f"{top_m['tok_per_s']:.0f} vs {top_h['tok_per_s']:.0f} tok/s at {rates[-1]:g} req/s; p99 TTFT "
        f"{1000 * top_m['ttft']['p99']:.0f} vs {1000 * top_h['ttft']['p99']:.0f} ms ({'ok' if ttft_ok else 'WORSE'})"
    )
    res = Result(f"serve: output tok/s vs HF generate ({args.preset})", ratio, 5.0, detail)
    print(f"\n{res.name}: {ratio:.2f}x (target 5x) {detail}")
    return [res]


if __name__ == "__main__":
    rs = main()
    sys.exit(0 if all(r.status != "MISS" for r in rs) else 1)
