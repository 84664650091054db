"""Greedy decode tokens/s: moray's `generate` over the latent cache, in fp32, with the bf16 decode
weights (`moray.model.decode_weights.for_decode`) and with int8 and int4 weights (`moray.model.quant`,
the fused weight-only kernels, output head included), against Hugging Face `generate` in fp32 (as a
user would run it on a CPU), at batch 1, 8 and 32.

One random HF DeepseekV2ForCausalLM with the `small` preset's shapes is saved with HF's
save_pretrained and loaded with moray's load_pretrained, so all sides hold the same weights.
Prompts of 512 tokens, then NEW_TOKENS greedy tokens with no stop token.

Decode throughput excludes the prefill: each side is timed generating 1 token (prefill + one
sample) and 1 + NEW_TOKENS tokens, interleaved; decode tokens/s = batch * NEW_TOKENS / (difference).

The bandwidth limit: a decode step must at least read every weight but the embedding table (a
lookup), of the routed experts only those its tokens hit (expected for uniform top-k routing),
and the latent cache. limit tokens/s = batch * (read GB/s measured in this run) / (bytes per step),
counted in the dtype each side computes in.

Greedy fp32 moray tokens must equal HF's at batch 1. bf16, int8 and int4 against fp32 are reported: free-running
greedy token agreement, and on fp32's greedy sequences the next-token agreement and the relative
logit error. Targets (issue 15) at batch 8: bf16 at least 5x HF, and at least 50% of its limit.
The bf16 side is not run on a CPU without AMX or AVX-512 BF16 (common.no_native_bf16).
"""

from __future__ import annotations

import tempfile

import torch
from common import Result, median_times, memory_gbs, no_native_bf16, random_hf_model, setup

from moray.model import SamplingParams, generate, load_pretrained
from moray.model.decode_weights import for_decode
from moray.model.quant import quantize, weight_bytes

CONTEXT = 512
NEW_TOKENS = 32
BATCHES = (1, 8, 32)
REPS = {1: 3, 8: 3, 32: 2}


def step_bytes(model, batch: int, context: int, weight_bytes: int, cache_bytes: int) -> float:
    """What one decode step of `batch` tokens must read: weights (routed experts: the expected share
    hit) at weight_bytes a value, and the latent cache at cache_bytes a value."""
    c = model.config
    E, k = c.n_routed_experts, c.num_experts_per_tok
    hit = 1 - (1 - k / E) ** batch  # expected share of one layer's experts the batch hits
    values = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        values += p.numel() * (hit if ".experts." in name else 1)
    cache = batch * context * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    return values * weight_bytes + cache * cache_bytes


@torch.no_grad()
def agreement(
    fp32, other, prompt: torch.Tensor, fp32_tokens: torch.Tensor, other_tokens: torch.Tensor
) -> dict:
    seq = torch.cat([prompt, fp32_tokens], dim=1)[:, :-1]
    want = fp32(seq).logits[:, CONTEXT - 1 :].float()
    got = other(seq).logits[:, CONTEXT - 1 :].float()
    return {
        "greedy": (fp32_tokens == other_tokens).float().mean().item(),
        "next_token": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "logit_error": ((got - want).norm() / want.norm()).item(),
    }


def main() -> list[Result]:
    setup()
    hf = random_hf_model()
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_pretrained(tmp)
    no_bf16 = no_native_bf16()
    reduced = {} if no_bf16 else {"bf16": for_decode(ours)}  # name: model, against fp32
    reduced |= {fmt: quantize(ours, fmt, include_head=True) for fmt in ("int8", "int4")}
    for name, model in (("fp32", ours), *reduced.items()):
        print(f"  {name} weights: {weight_bytes(model) / 2**20:.0f} MiB")
    bandwidth = memory_gbs()
    print(
        f"  HF attention: {hf.config._attn_implementation}, experts: {hf.config._experts_implementation}; "
        f"context {CONTEXT}, {NEW_TOKENS} new tokens; memory read bandwidth {bandwidth:.1f} GB/s"
    )

    def run_hf(prompt: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None)
        return out[:, prompt.shape[1] :]

    def runner(model):
        params = lambda n: SamplingParams(max_new_tokens=n, stop_token_ids=(-1,))  # noqa: E731
        return lambda prompt, n: torch.tensor(generate(model, prompt, params(n)))

    # side: (generate, bytes a weight value, bytes a cache value)
    sides = {} if no_bf16 else {"moray bf16": (runner(reduced["bf16"]), 2, 2)}
    sides |= {
        "moray int8": (runner(reduced["int8"]), 1, 4),
        "moray int4": (runner(reduced["int4"]), 0.5 + 4 / 32, 4),  # a bf16 scale and zero per 32 weights
        "moray fp32": (runner(ours), 4, 4),
        "hf": (run_hf, 4, 4),
    }
    results = []
    for B in BATCHES:
        prompt = torch.randint(3, hf.config.vocab_size, (B, CONTEXT))
        tokens = {side: fn(prompt, NEW_TOKENS) for side, (fn, *_) in sides.items()}
        assert all(t.shape == (B, NEW_TOKENS) for t in tokens.values()), "a side stopped early or ran long"
        agree = (tokens["hf"] == tokens["moray fp32"]).float().mean().item()
        print(f"  batch {B}: moray fp32 greedy tokens identical to HF for {agree:.1%} of positions")
        if B == 1:
            assert agree == 1.0, "batch-1 greedy tokens differ from HF"
        for name, model in reduced.items():
            a = agreement(ours, model, prompt, tokens["moray fp32"], tokens[f"moray {name}"])
            print(f"  batch {B}: {name} against fp32: greedy tokens equal at {a['greedy']:.1%} of positions; "
                  f"on fp32's sequences the same next token at {a['next_token']:.1%}, "
                  f"relative logit error {a['logit_error']:.2e}")  # fmt: skip

        fns = {
            f"{side} {n}": (lambda f=fn, n=n, p=prompt: f(p, n))
            for side, (fn, *_) in sides.items()
            for n in (1, 1 + NEW_TOKENS)
        }
        t = median_times(fns, REPS[B])
        tps, limits = {}, {}
        for side, (_, value_bytes, cache_bytes) in sides.items():
            prefill, total = t[f"{side} 1"], t[f"{side} {1 + NEW_TOKENS}"]
            tps[side] = B * NEW_TOKENS / (total - prefill)
            read = step_bytes(ours, B, CONTEXT + NEW_TOKENS // 2, value_bytes, cache_bytes)
            limits[side] = limit = B * bandwidth * 1e9 / read
            print(
                f"  batch {B} {side:10s}: prefill+1 token {prefill * 1e3:7.0f} ms, "
                f"decode {tps[side]:7.1f} tokens/s ({(total - prefill) / NEW_TOKENS * 1e3:5.1f} ms/step), "
                f"{tps[side] / limit:5.1%} of the bandwidth limit ({limit:.0f} tokens/s)"
            )
        vs_hf, of_limit = (
            f"decode batch {B}: moray bf16 vs hf generate fp32",
            f"decode batch {B}: moray bf16, fraction of the bandwidth limit",
        )
        vs_hf_target, of_limit_target = (5.0, 0.5) if B == 8 else (None, None)
        if no_bf16:
            results += [
                Result.skipped(vs_hf, vs_hf_target, no_bf16),
                Result.skipped(of_limit, of_limit_target, no_bf16),
            ]
        else:
            results += [
                Result(vs_hf, tps["moray bf16"] / tps["hf"], vs_hf_target, f"{tps['moray bf16']:.0f} vs {tps['hf']:.0f} tok/s"),
                Result(of_limit, tps["moray bf16"] / limits["moray bf16"], of_limit_target,
                       f"{limits['moray bf16']:.0f} tok/s at {bandwidth:.0f} GB/s"),
            ]  # fmt: skip
        results += [
            Result(f"decode batch {B}: moray int8 vs hf generate fp32", tps["moray int8"] / tps["hf"],
                   None, f"{tps['moray int8']:.0f} vs {tps['hf']:.0f} tok/s"),
            Result(f"decode batch {B}: moray int4 vs hf generate fp32", tps["moray int4"] / tps["hf"],
                   None, f"{tps['moray int4']:.0f} vs {tps['hf']:.0f} tok/s"),
            Result(f"decode batch {B}: moray fp32 vs hf generate fp32", tps["moray fp32"] / tps["hf"],
                   3.0 if B == 8 else None, f"{tps['moray fp32']:.0f} vs {tps['hf']:.0f} tok/s"),
        ]  # fmt: skip
    return results


if __name__ == "__main__":
    for r in main():
        print(f"{r.name:<60}{r.ratio:>7.2f}  {r.status:<5}{r.detail}")  # ratio nan: skipped
