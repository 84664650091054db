"""KV-cache bytes per token: moray's LatentCache vs what Hugging Face's DynamicCache holds, and vs MHA.

Measured for the `small` preset: moray's cache after a prefill, and HF's DynamicCache after a
forward with use_cache=True on the same prompt (the nbytes of every tensor it holds / tokens).
Computed from the published shapes for DeepSeek-V2-Lite and DeepSeek-V2: MLA keeps
layers * (kv_lora_rank + qk_rope_head_dim) values per token; standard multi-head attention
would keep layers * heads * (qk_head_dim + v_head_dim). fp32 here (4 bytes); ratios do not
depend on the dtype. Target: moray's cache no larger than HF's (ratio HF / moray >= 1); the
MHA comparisons are for information.
"""

from __future__ import annotations

import torch
from common import Result, random_hf_model, setup

from moray.model import LatentCache, Transformer, preset

BATCH, TOKENS = 2, 256
BYTES = 4  # fp32


def mla_bytes_per_token(cfg) -> int:
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * BYTES


def mha_bytes_per_token(cfg) -> int:
    return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * BYTES


def hf_cache_bytes_per_token(hf, ids: torch.Tensor) -> tuple[float, list[str]]:
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    shapes = sorted({str(tuple(t.shape)) for t in tensors})
    return sum(t.numel() * t.element_size() for t in tensors) / ids.numel(), shapes


def main() -> list[Result]:
    setup()
    cfg = preset("small")
    ids = torch.randint(3, cfg.vocab_size, (BATCH, TOKENS))

    hf_bpt, hf_shapes = hf_cache_bytes_per_token(random_hf_model(), ids)
    ours = Transformer(cfg).eval()
    cache = LatentCache(cfg, BATCH, TOKENS)
    with torch.no_grad():
        ours(ids, cache=cache)
    assert int(cache.lengths.min()) == TOKENS
    ours_bpt = cache.nbytes() / (BATCH * TOKENS)  # allocated for exactly TOKENS: no slack
    assert ours_bpt == cache.bytes_per_token() == mla_bytes_per_token(cfg)

    print(f"  small preset, fp32, {BATCH} x {TOKENS} tokens (measured):")
    print(f"    moray LatentCache        {ours_bpt:9,.0f} B/token  (one (B, S, c + r) tensor per layer)")
    print(f"    HF DynamicCache          {hf_bpt:9,.0f} B/token  (per layer: {' and '.join(hf_shapes)})")
    print(f"    standard MHA (computed)  {mha_bytes_per_token(cfg):9,.0f} B/token")
    vs_hf = hf_bpt / ours_bpt
    print(f"    HF / moray = {vs_hf:.2f}x, MHA / moray = {mha_bytes_per_token(cfg) / ours_bpt:.1f}x")
    print(
        "    (HF stores the same latent, but re-expands it to per-head K and V, an MHA-sized "
        f"{mha_bytes_per_token(cfg) // cfg.num_hidden_layers:,} B/token, in every layer at every step)"
    )

    results = [Result("kv cache bytes/token: hf / moray (small)", vs_hf, 1.0, f"{ours_bpt:,.0f} B/token")]
    for name in ("deepseek-v2-lite", "deepseek-v2"):
        c = preset(name)
        mla, mha = mla_bytes_per_token(c), mha_bytes_per_token(c)
        print(
            f"  {name} (computed, fp32): MLA latent {mla:,} B/token "
            f"({mla / 2**10:.1f} KiB; {c.num_hidden_layers} layers x {c.kv_lora_rank + c.qk_rope_head_dim}), "
            f"MHA {mha:,} B/token ({mha / 2**20:.2f} MiB) -> MLA {mha / mla:.1f}x smaller"
        )
        results.append(
            Result(f"kv cache bytes/token: mha / mla ({name})", mha / mla, None, f"{mla:,} B/token")
        )
    return results


if __name__ == "__main__":
    main()
