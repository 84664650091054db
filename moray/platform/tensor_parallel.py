"""Tensor parallelism, applied from outside the model with DTensor's `parallelize_module`
(Megatron-LM's layout as torchtitan applies it, without sequence parallelism).

Over the "tp" ranks, which all see the same tokens:

    MLA        q_proj (or q_b_proj) and kv_b_proj column-wise: each rank computes the queries,
               keys and values of H/tp heads; o_proj row-wise, its partial sums all-reduced.
               The low-rank down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms
               are replicated: they are small, and every head needs their whole output.
    MLP        the dense SwiGLU and the shared experts: gate and up column-wise, down row-wise.
    MoE        the router and the routed experts replicated over tp (expert parallelism is what
               splits the routed experts: with ep, each tp rank dispatches its copy of the tokens
               over its own ep group).
    embedding  vocab-parallel: each rank holds V/tp rows, the lookups all-reduced.
    lm_head    column-wise, the logits left sharded on the vocabulary: the loss is computed on
               the shards (`loss_parallel`), never gathering (B, T, V) logits.

Replicated parameters stay plain tensors: every tp rank computes them from the same tokens with
the whole gradient (a column-wise layer's input gradient is all-reduced in its backward), so they
stay equal without communication. One gradient escapes that: MLA's rope key k_pe is a single key
shared by all heads, produced by the replicated kv_a_proj_with_mqa, and each rank's heads give only
their share of its gradient. `_SumSharedKeyGrad` all-reduces that slice in the backward pass (the
c_kv slice needs nothing: kv_b_proj's column-wise input already all-reduces its gradient).

Model extras whose parameters would be shared across the head or channel split (per-head RoPE
bases, learned RoPE wavelengths, relative biases, a learned swish beta, tied embeddings) are
refused with tp > 1 (`check_tensor_parallel`) rather than silently trained wrong.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moray.model.config import ModelConfig
from moray.model.moe import MoE

# extra -> why it cannot be split over tp ranks (yet)
UNSUPPORTED_EXTRAS = {
    "rope_per_head_base": "per-head rope bases are applied to the shared rope key of every head",
    "rope_learned_wavelengths": "the learned rope frequencies get a share of their gradient from each rank's heads",
    "relative_bias_offsets": "the per-head relative biases are not split by heads",
    "swiglu_learned_beta": "a learned swish beta gets a share of its gradient from each rank's channels",
    "tie_word_embeddings": "the vocab-parallel embedding and output head are sharded separately",
}  # fmt: skip


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise ValueError, saying which dimension or extra, if the model cannot be split over tp ranks."""
    if tp == 1:
        return
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.intermediate_size,
    }
    if config.n_shared_experts:
        sizes["moe_intermediate_size * n_shared_experts"] = (
            config.moe_intermediate_size * config.n_shared_experts
        )
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(f"parallel.tp={tp}: must divide the model's {name} ({size})")
    for extra, why in UNSUPPORTED_EXTRAS.items():
        if getattr(config, extra):
            raise ValueError(f"parallel.tp={tp}: the model extra {extra} is not supported with tensor "
                             f"parallelism ({why}); train it with tp=1")  # fmt: skip


class _SumSharedKeyGrad(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient of the last `r` channels (k_pe)."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, r: int, group) -> torch.Tensor:
        ctx.r, ctx.group = r, group
        return kv.view_as(kv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        shared = grad[..., -ctx.r :].contiguous()
        dist.all_reduce(shared, group=ctx.group)
        grad[..., -ctx.r :] = shared
        return grad, None, None


def _mlp_plan(prefix: str) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(),
            f"{prefix}.down_proj": RowwiseParallel()}  # fmt: skip


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Split `model` (a Transformer) over the ranks of `tp_mesh`, in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    check_tensor_parallel(model.config, tp)
    ends = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    # a pipeline stage holds the embedding or the head, or neither
    parallelize_module(model, tp_mesh, {k: v for k, v in ends.items() if getattr(model, k, None) is not None})
    group = tp_mesh.get_group()
    for block in model.layers.children():
        attn = block.self_attn
        q = "self_attn.q_proj" if model.config.q_lora_rank is None else "self_attn.q_b_proj"
        plan = {q: ColwiseParallel(), "self_attn.kv_b_proj": ColwiseParallel(),
                "self_attn.o_proj": RowwiseParallel()}  # fmt: skip
        if isinstance(block.mlp, MoE):
            if block.mlp.shared_experts is not None:
                plan |= _mlp_plan("mlp.shared_experts")
        else:
            plan |= _mlp_plan("mlp")
        parallelize_module(block, tp_mesh, plan)
        attn.kv_a_proj_with_mqa.register_forward_hook(
            lambda _module, _inputs, kv, r=attn.r: _SumSharedKeyGrad.apply(kv, r, group)
        )
