"""MoE layer forward+backward tokens/s: moray's MoE vs Hugging Face's DeepseekV2Moe, same weights.

HF runs twice: its default experts loop (one Python iteration per expert) and its `grouped_mm`
experts implementation. Shapes are the `small` preset (hidden 512, 64 routed experts + 2 shared,
top-6, expert width 256) on 2,048 tokens. Targets: >= 3x the loop, >= 1x grouped_mm.

In bf16 (both modules cast whole to bf16, inputs too; moray's router still computes in fp32):
moray against its own fp32 figure (target 2.5x) and against HF's grouped_mm in bf16 (target 1.5x),
with the fraction of the measured bf16 GEMM peak; not run on a CPU without AMX or AVX-512 BF16
(common.no_native_bf16).

Also printed: the fraction of the CPU's fp32 peak each side reaches, counting the router, routed
and shared expert matmuls (a multiply-add is 2 FLOPs; backward costs twice the forward).
"""

from __future__ import annotations

import torch
from common import NOMINAL_PEAK_GFLOPS, Result, gemm_gflops, median_times, no_native_bf16, setup
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from moray.model import preset
from moray.model.moe import MoE

TOKENS = 2048


def hf_moe(cfg, experts_implementation: str | None) -> DeepseekV2Moe:
    hf_cfg = DeepseekV2Config(
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        routed_scaling_factor=cfg.routed_scaling_factor,
        norm_topk_prob=cfg.norm_topk_prob,
        topk_method=cfg.topk_method,
    )
    # A standalone module reads this at every forward: "eager" is the per-expert loop (also what
    # None gives, with a warning), "grouped_mm" its grouped GEMM path.
    hf_cfg._experts_implementation = experts_implementation
    return DeepseekV2Moe(hf_cfg)


def copy_weights(ours: MoE, hf: DeepseekV2Moe) -> None:
    """Our RoutedExperts uses HF's fused layout and names: a straight copy."""
    with torch.no_grad():
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)  # (E, 2I, H)
        hf.experts.down_proj.copy_(ours.experts.down_proj)  # (E, H, I)
        hf.gate.weight.copy_(ours.gate.weight)  # (E, H)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)


def uses_grouped_mm(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Did a forward actually call the grouped GEMM kernel? (HF silently falls back otherwise.)"""
    with torch.no_grad(), torch.profiler.profile() as prof:
        module(x[:64])
    return any("grouped_mm" in e.key for e in prof.key_averages())


def fwd_bwd_flops_per_token(cfg) -> float:
    H, E, k, I = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size  # noqa: E741
    macs = H * E + k * 3 * H * I + 3 * H * I * cfg.n_shared_experts  # router + routed + shared
    return 3 * 2 * macs  # fwd = 2 FLOPs per multiply-add; fwd+bwd = 3x fwd


def main() -> list[Result]:
    setup()
    cfg = preset("small")
    ours = MoE(cfg).train()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.05)
    loop, grouped = hf_moe(cfg, "eager").train(), hf_moe(cfg, "grouped_mm").train()
    copy_weights(ours, loop)
    copy_weights(ours, grouped)

    x = torch.randn(TOKENS, cfg.hidden_size)  # (N, H)
    grad_out = torch.randn(TOKENS, cfg.hidden_size)
    sides = {"moray": ours, "hf loop": loop, "hf grouped_mm": grouped}

    assert not uses_grouped_mm(loop, x), "HF's default experts unexpectedly use grouped_mm"
    assert uses_grouped_mm(grouped, x), "HF grouped_mm experts fell back to another implementation"
    with torch.no_grad():
        want = loop(x)
        for name in ("moray", "hf grouped_mm"):
            diff = (sides[name](x) - want).abs().max().item()
            print(f"  max |{name} - hf loop| forward: {diff:.2e}")
            assert diff < 1e-4, f"{name} disagrees with HF"

    # Gradients agree too (input and expert weights), one fwd+bwd each.
    grads = {}
    for name, module in sides.items():
        xi = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        module(xi).backward(grad_out)
        grads[name] = (xi.grad, module.experts.gate_up_proj.grad, module.gate.weight.grad)
    for name in ("moray", "hf grouped_mm"):
        # Relative to each gradient's largest entry: weight gradients sum over thousands of tokens.
        diff = max(
            ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads[name], grads["hf loop"])
        )
        print(f"  max |{name} - hf loop| / max |hf loop| gradients (input, gate_up, router): {diff:.2e}")
        assert diff < 1e-5, f"{name} gradients disagree with HF"

    peak = gemm_gflops()
    print(
        f"  1024^3 fp32 GEMM: {peak:.1f} GFLOP/s ({peak / NOMINAL_PEAK_GFLOPS:.0%} of nominal {NOMINAL_PEAK_GFLOPS:.0f})"
    )
    flops = fwd_bwd_flops_per_token(cfg)

    def step(module, dtype=torch.float32):
        xi = x.detach().to(dtype).requires_grad_(True)
        module.zero_grad(set_to_none=True)
        module(xi).backward(grad_out.to(dtype))

    steps = {name: (lambda m=module: step(m)) for name, module in sides.items()}
    reps = {"moray": 7, "hf loop": 3, "hf grouped_mm": 7}
    no_bf16 = no_native_bf16()
    if not no_bf16:
        ours16, grouped16 = MoE(cfg).train(), hf_moe(cfg, "grouped_mm").train()
        ours16.load_state_dict(ours.state_dict())
        copy_weights(ours, grouped16)
        bf16 = {"moray bf16": ours16.bfloat16(), "hf grouped_mm bf16": grouped16.bfloat16()}
        steps |= {name: (lambda m=module: step(m, torch.bfloat16)) for name, module in bf16.items()}
        reps |= {"moray bf16": 7, "hf grouped_mm bf16": 7}
    seconds = median_times(steps, reps)  # the loop takes seconds per step
    tokens_per_s = {name: TOKENS / s for name, s in seconds.items()}
    peak16 = None if no_bf16 else gemm_gflops(dtype=torch.bfloat16)
    if peak16:
        print(f"  1024^3 bf16 GEMM: {peak16:.1f} GFLOP/s")
    for name, tps in tokens_per_s.items():
        gflops = tps * flops / 1e9
        measured = peak16 if name.endswith("bf16") else peak
        print(
            f"  {name:18s} fwd+bwd {tps:8.0f} tokens/s  {gflops:6.1f} GFLOP/s = "
            f"{gflops / measured:5.1%} of measured peak in its dtype"
        )
    ours_tps = tokens_per_s["moray"]
    detail = f"{ours_tps:.0f} tok/s, {ours_tps * flops / 1e9 / peak:.0%} of GEMM peak"
    results = [
        Result("moe fwd+bwd vs hf loop", ours_tps / tokens_per_s["hf loop"], 3.0, detail),
        Result("moe fwd+bwd vs hf grouped_mm", ours_tps / tokens_per_s["hf grouped_mm"], 1.0, detail),
    ]
    bf16_rows = {"moe fwd+bwd bf16 vs moray fp32": ("moray", 2.5),
                 "moe fwd+bwd bf16 vs hf grouped_mm bf16": ("hf grouped_mm bf16", 1.5)}  # fmt: skip
    if no_bf16:
        results += [Result.skipped(name, target, no_bf16) for name, (_, target) in bf16_rows.items()]
    else:
        ours16 = tokens_per_s["moray bf16"]
        detail16 = f"{ours16:.0f} tok/s, {ours16 * flops / 1e9 / peak16:.0%} of bf16 GEMM peak"
        results += [
            Result(name, ours16 / tokens_per_s[other], target, detail16)
            for name, (other, target) in bf16_rows.items()
        ]
    for r in results:
        print(f"  {r.name}: {r.detail if r.status == 'skip' else f'{r.ratio:.2f}x'} (target {r.target:g}x)")
    return results


if __name__ == "__main__":
    main()
