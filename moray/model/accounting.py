"""Parameter, FLOP and KV-cache accounting computed from the config alone (no weights needed,
so it works for the 236B model on a laptop).

Activated parameters per token: everything a token's forward pass multiplies by, i.e. all
parameters except the input embedding table (a lookup, not a matmul) and the routed experts the
router did not pick: attention, norms, dense MLPs, the router, the shared experts, the top-k
routed experts and the output head. With this rule DeepSeek-V2 comes out at 236B total / 21B
activated and DeepSeek-V2-Lite at 15.7B / 2.4B, the papers' figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moray.model.config import ModelConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass
class Accounting:
    total_params: int
    activated_params: int
    embedding_params: int  # input embedding table (not activated: a lookup)
    attention_params: int
    dense_mlp_params: int
    routed_expert_params: int  # all routed experts of all MoE layers
    shared_expert_params: int
    router_params: int
    head_params: int  # lm_head (0 when tied)
    other_params: int  # norms and the extras' scalars
    train_flops_per_token: int  # fwd + bwd at `seq_len`, attention included
    seq_len: int
    kv_cache_values_per_token_mla: int  # layers * (kv_lora_rank + qk_rope_head_dim)
    kv_cache_values_per_token_mha: int  # layers * heads * (qk_head_dim + v_head_dim)
    kv_cache_bytes_per_token_mla: int
    kv_cache_bytes_per_token_mha: int
    cache_dtype: str

    @property
    def kv_cache_reduction(self) -> float:
        return self.kv_cache_values_per_token_mha / self.kv_cache_values_per_token_mla

    def as_dict(self) -> dict:
        return {**asdict(self), "kv_cache_reduction": self.kv_cache_reduction}


@dataclass(frozen=True)
class BlockParams:
    """One transformer block's parameters, grouped by how the parallel plans split them
    (moray/platform/tensor_parallel.py): `heads` and `mlp` are split over tensor-parallel ranks,
    `routed` over expert-parallel ranks, the rest is replicated."""

    heads: int  # q_proj (or q_b_proj), kv_b_proj, o_proj (+ relative biases): split by heads over tp
    latent: int  # q_a_proj, kv_a_proj_with_mqa and their norms: replicated over tp
    mlp: int  # the dense SwiGLU, or the shared experts of a MoE block: split by channels over tp
    routed: int  # every routed expert of the block: split over ep, replicated over tp
    routed_active: int  # the top-k routed experts a token runs through
    router: int
    norms: int  # the block's two RMSNorms

    @property
    def total(self) -> int:
        return self.heads + self.latent + self.mlp + self.routed + self.router + self.norms

    @property
    def attention(self) -> int:
        return self.heads + self.latent


def block_params(c: ModelConfig, layer_idx: int) -> BlockParams:
    H, nh = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q_heads, q_latent = H * nh * c.qk_head_dim, 0
    else:
        q_heads, q_latent = c.q_lora_rank * nh * c.qk_head_dim, H * c.q_lora_rank + c.q_lora_rank
    kv_latent = H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv_heads = c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    heads = q_heads + kv_heads + nh * c.v_head_dim * H + nh * len(c.relative_bias_offsets)
    beta = 1 if c.swiglu_learned_beta else 0
    expert = 3 * H * c.moe_intermediate_size + beta + (1 if c.expert_activation_scale else 0)
    if c.is_moe_layer(layer_idx):
        shared = c.n_shared_experts * 3 * H * c.moe_intermediate_size + (beta if c.n_shared_experts else 0)
        routed, active, router = (
            c.n_routed_experts * expert,
            c.num_experts_per_tok * expert,
            c.n_routed_experts * H,
        )
    else:
        shared, routed, active, router = 3 * H * c.intermediate_size + beta, 0, 0, 0
    return BlockParams(heads=heads, latent=q_latent + kv_latent, mlp=shared, routed=routed,
                       routed_active=active, router=router, norms=2 * H)  # fmt: skip


def attention_params(c: ModelConfig) -> int:
    return block_params(c, 0).attention


@dataclass(frozen=True)
class BlockFlops:
    """Training FLOPs (forward + backward) per token of one block, split as tensor parallelism
    splits the work: `split` is divided over the tp ranks, `replicated` is computed by each."""

    split: float  # head projections, attention scores and values, dense MLP / shared experts
    replicated: float  # the low-rank down-projections, the router, the top-k routed experts

    @property
    def total(self) -> float:
        return self.split + self.replicated


def mean_keys(c: ModelConfig, layer_idx: int, seq_len: int) -> float:
    """Keys a query attends in this layer, averaged over the positions of a seq_len sequence: the
    causal context (seq_len / 2) in a full layer; in a local or strided one the keys its rule
    allows (masks.allowed_keys), the global tokens it would not see otherwise included."""
    kind = c.attention_layer_type(layer_idx)
    if kind == "full":
        return seq_len / 2
    t = np.arange(seq_len)[:, None]  # queries
    g = np.arange(c.num_global_tokens)[None]  # global tokens
    if kind == "local":
        seen = np.minimum(t + 1, c.sliding_window)[:, 0]
        by_rule = t - g < c.sliding_window
    else:  # strided: t, t - stride, t - 2 stride, ...
        seen = (t // c.attention_stride + 1)[:, 0]
        by_rule = (t - g) % c.attention_stride == 0
    globals_added = ((g <= t) & ~by_rule).sum(axis=1)
    return float(np.mean(seen + globals_added))


def block_train_flops(c: ModelConfig, layer_idx: int, seq_len: int) -> BlockFlops:
    """6 FLOPs per activated matmul weight (2 forward, 4 backward) plus the attention scores and
    the weighted sum of values over the keys each query attends (`mean_keys`: seq_len / 2 in a full
    layer), x3 for the backward. Norms, relative biases and the extras' scalars are not matmul
    weights."""
    b = block_params(c, layer_idx)
    nh = c.num_attention_heads
    heads = b.heads - nh * len(c.relative_bias_offsets)
    latent = b.latent - (c.q_lora_rank or 0) - c.kv_lora_rank  # less the two norms
    attn_fwd = 2 * nh * (c.qk_head_dim + c.v_head_dim) * mean_keys(c, layer_idx, seq_len)
    return BlockFlops(split=6 * (heads + b.mlp) + 3 * attn_fwd,
                      replicated=6 * (latent + b.router + b.routed_active))  # fmt: skip


def head_train_flops(c: ModelConfig) -> float:
    """The output projection (the tied embedding when tied): 6 FLOPs per weight per token. The input
    embedding is a lookup: no FLOPs."""
    return 6 * c.vocab_size * c.hidden_size


def account(c: ModelConfig, seq_len: int = 4096, cache_dtype: str = "bfloat16") -> Accounting:
    H, L = c.hidden_size, c.num_hidden_layers
    blocks = [block_params(c, i) for i in range(L)]
    moe = [b for i, b in zip(range(L), blocks) if c.is_moe_layer(i)]
    dense_blocks = [b for i, b in zip(range(L), blocks) if not c.is_moe_layer(i)]

    embedding = c.vocab_size * H
    head = 0 if c.tie_word_embeddings else c.vocab_size * H
    attention = sum(b.attention for b in blocks)
    dense = sum(b.mlp for b in dense_blocks)
    routed = sum(b.routed for b in moe)
    shared = sum(b.mlp for b in moe)
    router = sum(b.router for b in moe)
    rope = 0
    if c.rope_learned_wavelengths:
        rope = (c.num_attention_heads if c.rope_per_head_base else 1) * c.qk_rope_head_dim // 2
    other = sum(b.norms for b in blocks) + H + rope  # two norms per layer, the final norm
    total = embedding + head + attention + dense + routed + shared + router + other
    routed_active = sum(b.routed_active for b in moe)
    activated = total - embedding - routed + routed_active
    if c.tie_word_embeddings:
        activated += embedding  # the tied table is also the output projection

    # Training FLOPs: each block's (block_train_flops) and the output head's 6 per weight.
    train_flops = int(sum(block_train_flops(c, i, seq_len).total for i in range(L)) + head_train_flops(c))

    mla_values = L * (c.kv_lora_rank + c.qk_rope_head_dim)
    mha_values = L * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    nbytes = BYTES[cache_dtype]
    return Accounting(
        total_params=total,
        activated_params=activated,
        embedding_params=embedding,
        attention_params=attention,
        dense_mlp_params=dense,
        routed_expert_params=routed,
        shared_expert_params=shared,
        router_params=router,
        head_params=head,
        other_params=other,
        train_flops_per_token=train_flops,
        seq_len=seq_len,
        kv_cache_values_per_token_mla=mla_values,
        kv_cache_values_per_token_mha=mha_values,
        kv_cache_bytes_per_token_mla=mla_values * nbytes,
        kv_cache_bytes_per_token_mha=mha_values * nbytes,
        cache_dtype=cache_dtype,
    )


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_accounting(name: str, a: Accounting) -> str:
    rows = [
        ("total parameters", human(a.total_params), f"{a.total_params:,}"),
        ("activated per token", human(a.activated_params), f"{a.activated_params:,}"),
        ("  input embedding (not activated)", human(a.embedding_params), ""),
        ("  attention (MLA)", human(a.attention_params), ""),
        ("  dense MLPs", human(a.dense_mlp_params), ""),
        ("  routed experts (top-k activated)", human(a.routed_expert_params), ""),
        ("  shared experts", human(a.shared_expert_params), ""),
        ("  routers", human(a.router_params), ""),
        ("  output head", human(a.head_params), ""),
        ("  norms and extras", human(a.other_params), ""),
        (f"training FLOPs / token (seq {a.seq_len})", human(a.train_flops_per_token), ""),
        (f"KV cache / token, MLA ({a.cache_dtype})", f"{a.kv_cache_bytes_per_token_mla:,} B",
         f"{a.kv_cache_values_per_token_mla:,} values"),
        (f"KV cache / token, MHA ({a.cache_dtype})", f"{a.kv_cache_bytes_per_token_mha:,} B",
         f"{a.kv_cache_values_per_token_mha:,} values"),
        ("KV cache reduction", f"{a.kv_cache_reduction:.1f}x", ""),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"model: {name}"] + [f"  {k:<{width}}  {v:>10}  {x}".rstrip() for k, v, x in rows]
    lines.append(
        "  activated = every parameter a token's forward multiplies by: attention, norms, dense MLPs, "
        "routers, shared experts, the top-k routed experts and the output head (the input embedding "
        "is a lookup and is not counted)."
    )
    return "\n".join(lines)
