"""`make demo`: what moray does today, end to end on one machine, in a few seconds.

Builds the tiny DeepSeek-V2 model, prints its accounting, round-trips it through a Hugging Face
directory, generates with the latent cache, and shows what int8 weights cost in accuracy.
Later stages (curation, pre-training, serving) join this job as they land.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moray.model import SamplingParams, Transformer, generate, load_pretrained, preset, save_pretrained
from moray.model.accounting import account, format_accounting
from moray.model.cache import LatentCache
from moray.model.quant import quantization_report


def main() -> None:
    torch.manual_seed(0)
    work = Path(os.environ.get("MORAY_HOME", ".moray")) / "demo"
    config = preset("tiny")

    print("== 1. the model: `moray model info tiny` ==")
    print(format_accounting("tiny", account(config)))

    print("\n== 2. a Hugging Face DeepSeek-V2 directory, written and read back ==")
    model = Transformer(config).eval()
    hf_dir = save_pretrained(model, work / "tiny-hf")
    loaded = load_pretrained(hf_dir)
    ids = torch.randint(3, config.vocab_size, (2, 16))
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max().item()
    print(
        f"wrote {hf_dir} ({', '.join(sorted(p.name for p in hf_dir.iterdir()))}); reloaded logits differ by {diff:.1e}"
    )

    print("\n== 3. generation with the MLA latent cache (random weights, so the tokens are noise) ==")
    prompts = [[1, 17, 42, 99], [1, 7]]
    for name, params in [
        ("greedy", SamplingParams(max_new_tokens=12, stop_token_ids=(-1,))),
        ("top-p 0.9, T=0.8, seed 7", SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7,
                                                   stop_token_ids=(-1,))),
    ]:  # fmt: skip
        for prompt, out in zip(prompts, generate(loaded, prompts, params)):
            print(f"{name:>26}: {prompt} -> {out}")
    cache = LatentCache(config, batch_size=1, max_len=1)
    mha = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 4
    print(f"latent cache: {cache.bytes_per_token()} bytes/token (fp32) vs {mha} for multi-head attention")

    print("\n== 4. int8 weight-only quantization ==")
    r = quantization_report(loaded, ids)
    print(
        f"weights {r['bytes_before']:,} -> {r['bytes_after']:,} bytes ({100 * r['memory_saved_fraction']:.0f}% saved), "
        f"relative logit error {r['relative_logit_error']:.4f}, top-1 agreement {100 * r['top1_agreement']:.1f}%"
    )
    print(
        "\nNext: `make test` runs the parity tests against transformers; `make bench` prints the speed ratios."
    )


if __name__ == "__main__":
    main()
