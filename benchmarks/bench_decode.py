"""Greedy decode tokens/s: moray's `generate` over the latent cache vs Hugging Face `generate`.

One random HF DeepseekV2ForCausalLM with the `small` preset's shapes is saved with HF's
save_pretrained and loaded with moray's load_pretrained, so both sides hold the same weights.
Prompts of 512 tokens at batch 1 and 8, then NEW_TOKENS greedy tokens with no stop token.

Decode throughput excludes the prefill: each side is timed generating 1 token (prefill + one
sample) and 1 + NEW_TOKENS tokens; decode tokens/s = batch * NEW_TOKENS / (difference).
Greedy tokens must be identical at batch 1. Target: >= 3x HF at batch 8.
"""

from __future__ import annotations

import tempfile

import torch
from common import Result, median_times, random_hf_model, setup

from moray.model import SamplingParams, generate, load_pretrained

CONTEXT = 512
NEW_TOKENS = 32
BATCHES = (1, 8)
REPS = 3


def main() -> list[Result]:
    setup()
    hf = random_hf_model()
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_pretrained(tmp)
    print(
        f"  HF attention: {hf.config._attn_implementation}, experts: {hf.config._experts_implementation}; "
        f"context {CONTEXT}, {NEW_TOKENS} new tokens"
    )

    def run_hf(prompt: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None)
        return out[:, prompt.shape[1] :]

    def run_ours(prompt: torch.Tensor, n: int) -> torch.Tensor:
        return torch.tensor(generate(ours, prompt, SamplingParams(max_new_tokens=n, stop_token_ids=(-1,))))

    results = []
    for B in BATCHES:
        prompt = torch.randint(3, hf.config.vocab_size, (B, CONTEXT))
        want, got = run_hf(prompt, NEW_TOKENS), run_ours(prompt, NEW_TOKENS)
        assert want.shape == got.shape == (B, NEW_TOKENS), "a side stopped early or ran long"
        agree = (want == got).float().mean().item()
        print(f"  batch {B}: greedy tokens identical to HF for {agree:.1%} of positions")
        if B == 1:
            assert agree == 1.0, "batch-1 greedy tokens differ from HF"

        fns = {
            f"{side} {n}": (lambda f=fn, n=n, p=prompt: f(p, n))
            for side, fn in (("moray", run_ours), ("hf", run_hf))
            for n in (1, 1 + NEW_TOKENS)
        }
        t = median_times(fns, REPS)
        decode_tps = {}
        for side in ("moray", "hf"):
            prefill, total = t[f"{side} 1"], t[f"{side} {1 + NEW_TOKENS}"]
            decode_tps[side] = B * NEW_TOKENS / (total - prefill)
            print(
                f"  batch {B} {side:5s}: prefill+1 token {prefill * 1e3:7.0f} ms, "
                f"decode {decode_tps[side]:7.1f} tokens/s ({(total - prefill) / NEW_TOKENS * 1e3:5.1f} ms/step), "
                f"end to end {B * (1 + NEW_TOKENS) / total:6.1f} tokens/s"
            )
        ratio = decode_tps["moray"] / decode_tps["hf"]
        print(f"  batch {B}: decode {ratio:.2f}x HF")
        results.append(
            Result(
                f"decode batch {B} vs hf generate",
                ratio,
                3.0 if B == 8 else None,
                f"{decode_tps['moray']:.0f} vs {decode_tps['hf']:.0f} tok/s",
            )
        )
    return results


if __name__ == "__main__":
    main()
