"""Block-sparse local and strided attention vs the dense mask, and vs flex_attention, at 4k and 8k tokens.

The attention of one MLA layer with DeepSeek-V2-Lite's head widths (queries and keys 128 + 64 wide,
values 128, padded to 192 as MLA pads them for SDPA's fused kernel), 4 heads, batch 1; a local
layer with a 256-token window and a strided one with stride 64, both with 4 global tokens.

- dense: SDPA with the layer's additive (T, T) mask, as MLA computes it where block-sparse cannot
  serve (`block_sparse_attention: false`);
- block-sparse: moray.model.sparse_attention.grouped_attention on `groups_for`'s groups with their
  mask, as MLA computes it by default;
- flex_attention (torch.nn.attention.flex_attention) with `create_block_mask` of the same rule
  (its default 128 x 128 blocks), under torch.compile, and eager at 4k tokens only (it scores every
  block: 8-12 s a call at 8k): forward only, because it has no backward pass on CPU (shown by
  trying one).

Each side's masks are built once outside the timing (the model builds them once per forward for all
layers of a type); their build times are printed. Prints ms per call, forward and forward+backward,
the speedup over the dense mask, and the fraction of the T x T (query, key) pairs that the layer
attends to and that each side scores. Targets: block-sparse >= 2x the dense mask at 4k tokens and
>= 4x at 8k, forward and forward+backward; the flex_attention ratios are for information.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from common import Result, median_times, setup
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from moray.model import preset
from moray.model.masks import additive_mask, allowed_keys
from moray.model.sparse_attention import grouped_attention, groups_for

LENGTHS = (4096, 8192)
KINDS = ("local", "strided")
HEADS = 4
TARGETS = {4096: 2.0, 8192: 4.0}
EAGER_FLEX_LENGTH = 4096  # eager flex_attention is timed here only: slower than dense, and slow


def config():
    return preset(
        "deepseek-v2-lite",
        num_attention_heads=HEADS,
        sliding_window=256,
        attention_stride=64,
        num_global_tokens=4,
    )


def flex_mask_mod(cfg, kind: str):
    """allowed_keys's rule for flex_attention: (batch, head, query position, key position) -> bool."""
    window, stride, n_global = cfg.sliding_window, cfg.attention_stride, cfg.num_global_tokens

    def local(b, h, q, k):
        return (q >= k) & ((q - k < window) | (k < n_global))

    def strided(b, h, q, k):
        return (q >= k) & (((q - k) % stride == 0) | (k < n_global))

    return local if kind == "local" else strided


def seconds(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def flex_backward_error() -> str:
    q = torch.randn(1, 1, 128, 16, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except Exception as err:  # noqa: BLE001 - reported, whatever it is
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return "none: it ran"


def compare(cfg, T: int, kind: str, compiled_flex) -> list[Result]:
    """One layer type at one length: masks, agreement with the dense mask, timings, result rows."""
    dq, dv, scale = cfg.qk_head_dim, cfg.v_head_dim, cfg.softmax_scale
    torch.manual_seed(T)
    q, k = torch.randn(1, HEADS, T, dq), torch.randn(1, HEADS, T, dq)
    v = torch.randn(1, HEADS, T, dv)
    v_wide = F.pad(v, (0, dq - dv))  # as MLA's expanded form pads it
    grad_out = torch.randn(1, HEADS, T, dq)
    pos = torch.arange(T)[None]

    dense_mask, t_dense_mask = seconds(
        lambda: additive_mask(allowed_keys(cfg, kind, pos, pos, None), torch.float32)
    )
    groups, t_groups = seconds(lambda: groups_for(cfg, kind, pos, T, None))
    g_mask, t_g_mask = seconds(
        lambda: additive_mask(
            allowed_keys(cfg, kind, groups.q_pos, groups.k_pos, groups.k_valid), torch.float32
        )
    )
    block_mask, t_block_mask = seconds(
        lambda: create_block_mask(flex_mask_mod(cfg, kind), None, None, T, T, device="cpu")
    )

    def dense(q=q, k=k, v=v_wide):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=scale)

    def sparse(q=q, k=k, v=v_wide):
        return grouped_attention(q, k, v, groups, g_mask, scale)

    def flex(fn=flex_attention):
        return fn(q, k, v, block_mask=block_mask, scale=scale)

    def fwd_bwd(attend):
        def run():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v_wide))
            attend(qq, kk, vv).backward(grad_out)

        return run

    with torch.no_grad():
        want = dense()[..., :dv]
        diffs = {"block-sparse": (sparse()[..., :dv] - want).abs().max().item()}
        compiled_out, t_compile = seconds(lambda: flex(compiled_flex))
        diffs["flex compiled"] = (compiled_out - want).abs().max().item()
        fwd = median_times(
            {"dense": dense, "block-sparse": sparse, "flex compiled": lambda: flex(compiled_flex)}, 3
        )
        if T == EAGER_FLEX_LENGTH:  # one call: it scores every block
            eager_out, fwd["flex eager"] = seconds(flex)
            diffs["flex eager"] = (eager_out - want).abs().max().item()
    assert max(diffs.values()) < 1e-4, diffs
    both = median_times({"dense": fwd_bwd(dense), "block-sparse": fwd_bwd(sparse)}, reps=2)

    attended = allowed_keys(cfg, kind, pos, pos, None).float().mean().item()
    n, Lq = groups.q_pos.shape
    scored = n * Lq * groups.k_pos.shape[1] / T**2
    print(f"  {kind} {T}: keys attended {attended:.2%} of T x T; scored: block-sparse {scored:.2%}, "
          f"flex block mask {1 - block_mask.sparsity() / 100:.1%}, dense 100%")  # fmt: skip
    print(f"    masks built in: dense {t_dense_mask * 1e3:.0f} ms, groups {(t_groups + t_g_mask) * 1e3:.0f} ms, "
          f"flex block mask {t_block_mask * 1e3:.0f} ms; flex compiled first call {t_compile:.1f} s")  # fmt: skip
    print("    max |diff| from dense: " + ", ".join(f"{side} {d:.1e}" for side, d in diffs.items()))
    for name in fwd:
        line = f"    {name:14s} fwd {fwd[name] * 1e3:7.1f} ms ({fwd['dense'] / fwd[name]:5.2f}x)"
        if name in both:
            line += f"   fwd+bwd {both[name] * 1e3:7.1f} ms ({both['dense'] / both[name]:5.2f}x)"
        print(line, flush=True)
    ms = {side: f"{t * 1e3:.0f} ms" for side, t in fwd.items()}
    return [
        Result(f"{kind} attention {T // 1024}k fwd vs dense mask", fwd["dense"] / fwd["block-sparse"],
               TARGETS[T], f"{ms['block-sparse']} vs {ms['dense']}"),
        Result(f"{kind} attention {T // 1024}k fwd+bwd vs dense mask", both["dense"] / both["block-sparse"],
               TARGETS[T], f"{both['block-sparse'] * 1e3:.0f} vs {both['dense'] * 1e3:.0f} ms"),
        Result(f"{kind} attention {T // 1024}k fwd vs flex compiled", fwd["flex compiled"] / fwd["block-sparse"],
               None, f"{ms['block-sparse']} vs {ms['flex compiled']}; flex has no CPU backward"),
    ]  # fmt: skip


def main() -> list[Result]:
    setup()
    cfg = config()
    print(f"  {HEADS} heads, q/k {cfg.qk_head_dim} wide, v {cfg.v_head_dim}; window {cfg.sliding_window}, "
          f"stride {cfg.attention_stride}, {cfg.num_global_tokens} global tokens")  # fmt: skip
    print(f"  flex_attention backward on CPU: {flex_backward_error()}")
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    return [r for T in LENGTHS for kind in KINDS for r in compare(cfg, T, kind, compiled_flex)]


if __name__ == "__main__":
    t0 = time.perf_counter()
    for r in main():
        print(f"  {r.name}: {r.ratio:.2f}x" + (f" (target {r.target:g}x)" if r.target else ""))
    print(f"  total {time.perf_counter() - t0:.0f} s")
