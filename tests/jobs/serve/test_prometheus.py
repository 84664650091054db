"""The engine's metrics reach Prometheus: scrape Ray's metrics endpoint after serving requests
and find every metric the issue lists, with the counters grown by at least what we served."""

import re
import time
import urllib.request

import openai
import pytest

METRICS = (
    "ray_moray_time_to_first_token_seconds_bucket", "ray_moray_inter_token_latency_seconds_bucket",
    "ray_moray_e2e_request_latency_seconds_bucket", "ray_moray_prompt_tokens_total",
    "ray_moray_generation_tokens_total", "ray_moray_requests_running", "ray_moray_requests_waiting",
    "ray_moray_batch_size_bucket", "ray_moray_kv_cache_usage_ratio", "ray_moray_expert_tokens_total",
)  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """Sum of each metric's samples for model="tiny", per metric name (plus expert label sets)."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r"^(ray_moray_\w+)\{(.*)\} (\S+)$", line)
        if m and 'model="tiny"' in m.group(2):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            if m.group(1) == "ray_moray_hybrid_requests_total":
                reason = re.search(r'reason="(\w+)"', m.group(2)).group(1)
                out[f"hybrid/{reason}"] = out.get(f"hybrid/{reason}", 0) + float(m.group(3))
            if m.group(1) == "ray_moray_expert_tokens_total":
                layer = re.search(r'layer="(\d+)"', m.group(2)).group(1)
                out[f"experts_seen/{layer}"] = out.get(f"experts_seen/{layer}", 0) + 1
    return out


def wait_for(url: str, ok, timeout: float = 90.0) -> dict[str, float]:
    """Ray exports every few seconds: poll until `ok(sample)` holds."""
    deadline = time.monotonic() + timeout
    sample: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            sample = scrape(url)
        except OSError:
            sample = {}
        if ok(sample):
            return sample
        time.sleep(2)
    pytest.fail(f"Prometheus endpoint never showed the expected metrics; last sample: {sample}")


def test_engine_metrics_are_scraped_by_prometheus(ray_local, serve_app):
    url = ray_local.metrics_url
    client = openai.OpenAI(base_url=serve_app.base_url, api_key=serve_app.api_key, max_retries=0, timeout=60)
    client.completions.create(model="tiny", prompt="warm", max_tokens=2, temperature=0)
    before = wait_for(url, lambda s: all(k in s for k in METRICS))
    usage = [
        client.completions.create(
            model="tiny", prompt=f"Now is the winter of our discontent {i}", max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True},
        ).usage
        for i in range(3)
    ]  # fmt: skip
    gen = sum(u.completion_tokens for u in usage)
    prompt = sum(u.prompt_tokens for u in usage)

    def grown(s):
        return (
            s.get("ray_moray_generation_tokens_total", 0) >= before["ray_moray_generation_tokens_total"] + gen
            and s.get("ray_moray_prompt_tokens_total", 0) >= before["ray_moray_prompt_tokens_total"] + prompt
        )

    after = wait_for(url, grown)
    assert after["ray_moray_expert_tokens_total"] > before["ray_moray_expert_tokens_total"]
    # tokens per expert per layer: series for more than one expert in each MoE layer
    layers = [k for k in after if k.startswith("experts_seen/")]
    assert layers and all(after[k] > 1 for k in layers)
