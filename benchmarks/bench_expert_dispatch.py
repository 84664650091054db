"""The cost of sending a MoE layer's routed tokens to expert shards and back, and what it adds to a
decode step.

1. Transport, one round: a decode batch's token-expert rows (batch 8 x top-k of the small preset,
   each row H + 2 floats) split over 2 shard actors that send them back, as
   (a) Ray actor calls, (b) a Ray Compiled Graph (shared-memory channels), (c) moray's gloo `Link`
   (what `RemoteExperts` uses). Median microseconds per round.
2. The engine: decode steps of the small preset at batch 8 with the routed experts in-process
   against in 2 ExpertShard actors (the same weights, the same greedy tokens). The difference per
   step over the MoE layers is the dispatch cost per layer.

Information only (no target). Measured on this 2-core machine: a round takes about 5.9 ms as Ray
actor calls, 2.6 ms through a compiled graph and 0.8 ms over the gloo link; a decode step of the
small preset at batch 8 goes from 49 ms to 79 ms with 2 shards, about 10 ms per MoE layer. Most of
that is not the transport: the replica and both shards share the same 2 cores, so the shards'
expert compute (one thread each) waits for cores the replica's OpenMP threads are still spinning
on. On a cluster the shards bring their own cores and memory bandwidth.
"""

from __future__ import annotations

import tempfile
import time

import ray
import torch
from common import Result, median_time, setup

from moray.model import PRESETS

BATCH = 8
ROUNDS = 200


@ray.remote(num_cpus=0)
class Echo:
    def __init__(self):
        torch.set_num_threads(1)
        self.link = None

    def run(self, x):
        return x

    def attach(self, address, name):
        import threading

        from moray.actors.link import Link

        self.link = Link.connect(address, name)

        def loop():
            while True:
                _, _, rows = self.link.recv_header()
                if rows < 0:
                    return
                self.link.send(self.link.recv((rows, H + 2)))

        threading.Thread(target=loop, daemon=True).start()


H = PRESETS["small"]["hidden_size"]


def transports() -> dict[str, float]:
    from ray.dag import InputNode, MultiOutputNode

    from moray.actors.link import Link, Rendezvous

    k = PRESETS["small"]["num_experts_per_tok"]
    rows = torch.randn(BATCH * k, H + 2)
    halves = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    shards = [Echo.remote() for _ in range(2)]
    ray.get([s.run.remote(torch.zeros(1)) for s in shards])

    def actor_calls():
        ray.get([s.run.remote(h) for s, h in zip(shards, halves)])

    with InputNode() as inp:
        dag = MultiOutputNode([s.run.bind(inp[i]) for i, s in enumerate(shards)])
    compiled = dag.experimental_compile()

    def compiled_graph():
        ray.get(compiled.execute(*halves))

    compiled_graph()
    per_call = {
        "ray actor calls": median_time(lambda: [actor_calls() for _ in range(ROUNDS)], 3),
        "ray compiled graph": median_time(lambda: [compiled_graph() for _ in range(ROUNDS)], 3),
    }
    compiled.teardown()

    links = []
    for i, s in enumerate(shards):
        rdv = Rendezvous()
        joined = s.attach.remote(rdv.address, f"bench/{i}")
        links.append(Link(rdv.store, 0, f"bench/{i}"))
        ray.get(joined)

    def gloo_link():
        works, answers = [], []
        for link, h in zip(links, halves):
            header = torch.tensor([1, 0, len(h), 0])
            works.append((link, link.send_async(header, h)))
            answers.append((link, *link.recv_async(h.shape)))
        for link, w in works:
            link.wait(w)
        for link, _, w in answers:
            link.wait([w])

    per_call["moray gloo link"] = median_time(lambda: [gloo_link() for _ in range(ROUNDS)], 3)
    for link in links:
        link.send_header(1, 0, -1)
        link.close()
    for s in shards:
        ray.kill(s)
    return {name: t / ROUNDS * 1e6 for name, t in per_call.items()}


def engine_steps() -> tuple[float, float, int]:
    """Seconds per decode step, in-process experts vs 2 shards, and the MoE layer count."""
    from moray.actors.engine import Engine
    from moray.actors.engine.scheduler import RequestParams
    from moray.actors.expert_shard import ShardSet, start_expert_shards, stop_expert_shards, use_expert_shards
    from moray.actors.placement import plan_placement
    from moray.model import Transformer, load_pretrained, preset, save_pretrained

    torch.manual_seed(0)
    prompts = [torch.randint(3, 1000, (64,)).tolist() for _ in range(BATCH)]
    params = RequestParams(max_tokens=33, temperature=0.0, ignore_eos=True)

    def decode_rate(model) -> tuple[float, list]:
        engine = Engine(model)
        reqs = [engine.add_request(p, params) for p in prompts]
        while any(len(r.output_ids) < 1 for r in reqs):
            engine.step()  # prefill
        t = time.perf_counter()
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        return (time.perf_counter() - t) / steps, [r.output_ids for r in reqs]

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(Transformer(preset("small")).eval(), tmp)
        local, want = decode_rate(load_pretrained(tmp))
        model = load_pretrained(tmp, routed_experts=False)
        layers = [i for i, _ in model.moe_layers()]
        placement = plan_placement(None, model.config.n_routed_experts, 2, layers)
        shards, group = start_expert_shards(tmp, placement, cpus_per_shard=0.5, threads_per_shard=1)
        shard_set = ShardSet.attach(placement, shards, "bench")
        use_expert_shards(model, shard_set)
        sharded, got = decode_rate(model)
        shard_set.close()
        stop_expert_shards(shards, group)
    assert got == want, "sharded experts changed the greedy tokens"
    return local, sharded, len(layers)


def main() -> list[Result]:
    setup()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        times = transports()
        for name, us in times.items():
            print(f"  {name:20s} {us:8.0f} us per round (2 shards, {BATCH} tokens x top-k rows)")
        local, sharded, n_layers = engine_steps()
        per_layer = (sharded - local) / n_layers
        print(f"  decode step, batch {BATCH}: in-process experts {local * 1e3:.1f} ms, 2 expert shards "
              f"{sharded * 1e3:.1f} ms; dispatch {per_layer * 1e6:.0f} us per MoE layer ({n_layers} layers)")  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    return [
        Result("expert dispatch: gloo link vs ray calls", times["ray actor calls"] / times["moray gloo link"], None,
               f"{times['moray gloo link']:.0f} vs {times['ray actor calls']:.0f} us per round"),
        Result("expert dispatch: gloo link vs compiled graph",
               times["ray compiled graph"] / times["moray gloo link"], None,
               f"{times['moray gloo link']:.0f} vs {times['ray compiled graph']:.0f} us per round"),
        Result("decode with 2 expert shards vs in-process", local / sharded, None,
               f"{per_layer * 1e6:.0f} us dispatch per MoE layer"),
    ]  # fmt: skip


if __name__ == "__main__":
    for r in main():
        print(r)
