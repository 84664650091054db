"""Engine metrics: token totals, and tokens per expert per layer from the router statistics
(every real token goes to num_experts_per_tok experts in each MoE layer)."""

import torch

from moray.actors.engine import Engine, RequestParams
from moray.actors.engine.metrics import EngineMetrics
from moray.model import Transformer, preset


def test_metrics_count_tokens_and_expert_load(ray_local):
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    metrics = EngineMetrics("tiny", flush_every_s=1e9)
    e = Engine(model, metrics=metrics)
    prompts = [[5, 6, 7, 8], [9, 10], [11] * 7]
    out = e.generate(prompts, RequestParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert metrics.totals == {"prompt_tokens": 13, "generation_tokens": 15, "requests": 3}
    # every token fed to the model: the prompts, and each generated token but the last
    fed = 13 + sum(len(o) - 1 for o in out)
    counts = metrics.expert_counts()
    moe_layers = [i for i, _ in model.moe_layers()]
    assert sorted(counts) == moe_layers
    for layer in moe_layers:
        assert len(counts[layer]) == model.config.n_routed_experts
        assert sum(counts[layer]) == fed * model.config.num_experts_per_tok
    metrics.flush(e)  # exports through ray.util.metrics without error
    assert metrics.expert_counts() == {}
