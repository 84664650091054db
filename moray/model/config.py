"""ModelConfig: DeepSeek-V2's hyper-parameters under Hugging Face's field names, plus moray's own.

The HF fields keep their `DeepseekV2Config` names so a published `config.json` maps onto this
dataclass one-to-one (see `from_hf_dict` / `to_hf_dict`). moray's own fields (capacity, balance
losses, the architectural extras) default to values that leave the published model unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ATTENTION_LAYER_TYPES = ("full", "local", "strided")
AUX_HEADS = ("nsp", "span_boundary", "code_exec")


@dataclass
class ModelConfig:
    # ---- Hugging Face DeepseekV2Config fields -------------------------------------------
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944  # dense MLP layers
    moe_intermediate_size: int = 1408  # each routed / shared expert
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    q_lora_rank: int | None = None  # None: plain q_proj (V2-Lite); set: q_a -> norm -> q_b (V2)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor", ...} as published
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None

    # ---- moray: routing, capacity and balance ------------------------------------------
    # Capacity per expert = ceil(capacity_factor * tokens * top_k / n_routed_experts).
    # None means dropless. Evaluation is always dropless.
    capacity_factor: float | None = None
    # Balance-loss weights of the DeepSeek-V2 paper (alpha1, alpha2, alpha3) and router z-loss.
    aux_loss_alpha: float = 0.003  # expert-level
    device_balance_alpha: float = 0.05  # device-level
    comm_balance_alpha: float = 0.02  # communication
    router_z_loss_coef: float = 0.0
    # Devices the experts are spread over for the device/communication losses (contiguous map
    # unless the expert-parallel plan installs its own), and M, the devices a token may reach.
    ep_size: int = 1
    max_devices_per_token: int | None = None
    # Auxiliary-loss-free balancing: step of the per-expert score-correction bias update.
    bias_update_speed: float = 0.001

    # ---- moray: architectural extras (all off by default, so HF parity holds) ------------
    # Per-layer attention pattern: None (all "full") or a list of "full" / "local" / "strided".
    attention_layer_types: list[str] | None = None
    sliding_window: int = 256  # "local": keys within this distance
    attention_stride: int = 64  # "strided": keys at distances that are multiples of this
    num_global_tokens: int = 0  # the first N positions are visible to every query in sparse layers
    swiglu_learned_beta: bool = False  # Swish(x) = x * sigmoid(beta * x), beta learned
    expert_activation_scale: bool = False  # a learned scalar on each expert's activation
    rope_per_head_base: bool = False  # each head its own RoPE base (geometric spread)
    rope_per_head_base_spread: float = 4.0  # bases range over rope_theta / s .. rope_theta * s
    rope_learned_wavelengths: bool = False  # RoPE inverse frequencies become parameters
    relative_bias_offsets: list[int] = field(default_factory=list)  # learned per-head logit biases
    # How "local" / "strided" layers are computed, not what: block-sparsely where that is exact
    # (moray/model/sparse_attention.py: no cache, no padding), else with the dense mask.
    block_sparse_attention: bool = True
    # Auxiliary training heads (moray.model.aux_heads): any of "nsp", "span_boundary", "code_exec".
    aux_heads: list[str] = field(default_factory=list)
    span_boundary_max_len: int = 10  # the longest masked span the span-boundary head has offsets for

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes ------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def attention_layer_type(self, layer_idx: int) -> str:
        return "full" if self.attention_layer_types is None else self.attention_layer_types[layer_idx]

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 as the published code does."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    # Validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{name}={getattr(self, name, None)!r}: {msg}")

        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "moe_layer_freq",
            "ep_size",
        ):  # fmt: skip
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, name, "must be a non-negative integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be null or positive")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            k = self.num_experts_per_tok
            need(isinstance(k, int) and 1 <= k <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be between 1 and n_routed_experts={self.n_routed_experts}")  # fmt: skip
            if self.topk_method != "greedy":
                need(isinstance(self.n_group, int) and self.n_group > 0, "n_group",
                     f"must be a positive integer for topk_method={self.topk_method!r}")  # fmt: skip
                need(self.n_routed_experts % self.n_group == 0, "n_group",
                     f"must divide n_routed_experts={self.n_routed_experts}")  # fmt: skip
                need(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group, "topk_group",
                     f"must be between 1 and n_group={self.n_group}")  # fmt: skip
                per_group = self.n_routed_experts // self.n_group
                need(self.topk_group * per_group >= k, "topk_group",
                     f"topk_group * experts per group must be >= num_experts_per_tok={k}")  # fmt: skip
            if self.topk_method == "noaux_tc":
                need(self.scoring_func == "sigmoid", "scoring_func", "topk_method='noaux_tc' needs 'sigmoid'")
                need(self.n_routed_experts // self.n_group >= 2, "n_group",
                     "noaux_tc scores groups by their top-2 experts; each group needs >= 2 experts")  # fmt: skip
            need(self.n_routed_experts % self.ep_size == 0, "ep_size",
                 f"must divide n_routed_experts={self.n_routed_experts}")  # fmt: skip
        if self.max_devices_per_token is not None:
            need(1 <= self.max_devices_per_token <= self.ep_size, "max_devices_per_token",
                 f"must be between 1 and ep_size={self.ep_size}")  # fmt: skip
        if self.capacity_factor is not None:
            need(self.capacity_factor > 0, "capacity_factor", "must be positive or null (dropless)")
        for name in ("aux_loss_alpha", "device_balance_alpha", "comm_balance_alpha", "router_z_loss_coef",
                     "bias_update_speed"):  # fmt: skip
            need(getattr(self, name) >= 0, name, "must be >= 0")
        if self.attention_layer_types is not None:
            need(len(self.attention_layer_types) == self.num_hidden_layers, "attention_layer_types",
                 f"needs one entry per layer ({self.num_hidden_layers})")  # fmt: skip
            bad = [t for t in self.attention_layer_types if t not in ATTENTION_LAYER_TYPES]
            need(not bad, "attention_layer_types", f"unknown types {bad}; use {ATTENTION_LAYER_TYPES}")
        need(self.sliding_window > 0, "sliding_window", "must be positive")
        need(self.attention_stride > 0, "attention_stride", "must be positive")
        need(self.num_global_tokens >= 0, "num_global_tokens", "must be >= 0")
        need(isinstance(self.block_sparse_attention, bool), "block_sparse_attention", "must be true or false")
        bad = [h for h in self.aux_heads if h not in AUX_HEADS]
        need(not bad, "aux_heads", f"unknown heads {bad}; use any of {AUX_HEADS}")
        need(self.span_boundary_max_len > 0, "span_boundary_max_len", "must be positive")
        need(self.rope_per_head_base_spread >= 1, "rope_per_head_base_spread", "must be >= 1")
        # An offset is q_pos - k_pos: a negative one names a future key, which causal attention never
        # sees, so its bias would be a dead parameter (no effect, no gradient).
        need(all(isinstance(o, int) and not isinstance(o, bool) and o > 0 for o in self.relative_bias_offsets),
             "relative_bias_offsets", "must be positive integers (query position - key position)")  # fmt: skip
        if self.rope_scaling:
            need(self.rope_type in ("default", "yarn"), "rope_scaling",
                 f"type {self.rope_type!r} is not supported (use 'yarn')")  # fmt: skip
            if self.rope_type == "yarn":
                f = self.rope_scaling.get("factor")
                need(isinstance(f, (int, float)) and f >= 1, "rope_scaling", "yarn needs factor >= 1")
                need("original_max_position_embeddings" in self.rope_scaling, "rope_scaling",
                     "yarn needs original_max_position_embeddings")  # fmt: skip

    # Conversion ---------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a HF `config.json`: the original release (`rope_scaling`, `rope_theta`) or
        transformers 5 (`rope_parameters`). Unknown HF keys (architectures, torch_dtype...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        extras = d.get("moray") or {}
        unknown = sorted(set(extras) - names)
        if unknown:  # our own fields: a typo (or a newer extra) must not silently change the model
            raise ValueError(f"unknown moray config fields under 'moray': {unknown}")
        kw.update(extras)
        rope = d.get("rope_parameters")
        if rope:  # transformers 5 folds rope_theta and the scaling into one dict
            rope = dict(rope)
            kw["rope_theta"] = rope.pop("rope_theta", kw.get("rope_theta", 10000.0))
            rope_type = rope.pop("rope_type", rope.pop("type", "default"))
            kw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        if (
            kw.get("n_group") is not None
            and kw.get("topk_method", "greedy") == "greedy"
            and kw["n_group"] <= 1
        ):
            kw["n_group"] = kw["topk_group"] = None
        for key in ("bos_token_id", "eos_token_id"):  # a list of ids: keep the first as the default
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0] if kw[key] else None
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers' DeepseekV2Config (and the original release) reads."""
        hf_names = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
            "first_k_dense_replace", "moe_layer_freq", "topk_method", "n_group", "topk_group",
            "routed_scaling_factor", "norm_topk_prob", "scoring_func", "rms_norm_eps",
            "max_position_embeddings", "tie_word_embeddings", "initializer_range", "bos_token_id",
            "eos_token_id", "pad_token_id",
        ]  # fmt: skip
        d: dict[str, Any] = {k: getattr(self, k) for k in hf_names}
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            extra = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")}
            rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **extra}
        d.update(
            architectures=["DeepseekV2ForCausalLM"],
            model_type="deepseek_v2",
            hidden_act="silu",
            num_key_value_heads=self.num_attention_heads,
            attention_bias=False,
            rope_parameters=rope_parameters,
            # The original release's spelling too, for loaders that predate rope_parameters.
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            aux_loss_alpha=self.aux_loss_alpha,
            dtype="float32",
        )
        moray_only = {
            k: v for k, v in self.to_dict().items() if k not in d and k not in ("rope_scaling", "rope_theta")
        }
        d["moray"] = moray_only  # our extras travel with the checkpoint; HF ignores the key
        return d


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
