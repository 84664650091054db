"""`moray plan`: an analytical planner for training layouts far past this machine.

    moray plan deepseek-v2 --gpus 2048 --pp 16 --ep 8 --zero 1 --seq-len 4096 --global-batch 9216 \\
        --activation-checkpointing full --schedule zb-h1 --device h800-80g [--json]

From the model config alone (moray.model.accounting) and moray's layout semantics
(moray/platform/parallel.py, tensor_parallel.py, expert_parallel.py), it gives per device: the
memory of parameters, gradients, optimizer state and activations on the most loaded pipeline
stage; the bytes each parallel dimension moves per step; the pipeline bubble; an estimated step
time, tokens/s and MFU. A layout whose degrees do not divide, or that does not fit the device's
memory, is refused with a ValueError naming the limit.

Layout (as ParallelLayout): world = pp * dp * tp; ep is borrowed from dp (ep divides dp). Mesh
order ("pp", "dp_mod_ep", "ep", "tp"), tp innermost, so a group whose ranks span at most
gpus_per_node consecutive ranks talks over NVLink, any other over InfiniBand.

    tp   splits attention heads (q or q_b and kv_b column-wise, o row-wise), the dense MLP and the
         shared experts (gate/up column-wise, down row-wise), the embedding and the head by
         vocabulary. The MLA down-projections, the norms, the router and the routed experts are
         replicated over tp (each tp rank runs them on the same tokens).
    ep   routed experts split over ep ranks; tokens go to their experts by all-to-all.
    dp   ZeRO-0: everything replicated, gradients all-reduced once per step. ZeRO-1: optimizer
         state (and fp32 master weights) sharded; gradients reduce-scattered, parameters
         all-gathered once per step. ZeRO-2: gradients sharded too, reduce-scattered every
         micro-batch. ZeRO-3 (moray's FSDP2): parameters too, all-gathered for the forward and
         again for the backward of every micro-batch (moray's train_step does not skip the
         gradient sync between micro-batches). Routed experts are sharded over dp/ep (the ranks
         that hold the same experts, "dp_mod_ep"), everything else over dp.
    pp   contiguous layer stages, FLOP-balanced (`balanced_split`), the embedding on the first
         stage, the final norm and head on the last. With v virtual stages each rank holds v
         chunks (r, r + pp, ...) of pp * v balanced chunks.

Precision. Compute bf16 (GPUs) or fp32 (CPU). Parameters default to fp32 under ZeRO-3 (moray's
FSDP2 path: the sharded fp32 parameters are the master weights, bf16 copies are gathered per
block) and to bf16 otherwise (Megatron/DeepSpeed mixed precision: bf16 working weights, and an
fp32 master copy kept with the optimizer state, sharded with it). Gradients fp32 by default
(Megatron's fp32 main_grad accumulation; FSDP2's reduce_dtype in moray), bf16 on request. AdamW
and LAMB keep two fp32 moments.

Activations: bytes saved for backward per token, enumerated from what moray's modules save
(`block_activation_bytes`; checked against torch's saved-tensor hooks on the tiny and small
models, one process, dp2, tp2 and dp2 x ep2, in tests/platform/test_plan.py: within 0.1%). With
full activation checkpointing a block keeps only its input, and one block is recomputed at a
time. A stage holds its activations for the micro-batches in flight: GPipe all m, 1F1B and ZB-H1
pp - r on rank r (pp on the first), interleaved 1F1B per chunk as its schedule runs them (torch's
and Megatron's order; the chunks differ: the embedding's, the head's). Checked against the peak of
saved tensors alive under moray's schedules on real ranks (pp2 under GPipe, 1F1B and interleaved
1F1B, pp2 x dp2, pp2 x tp2, pp2 x ep2: within 2%). Bubble: (p-1)/(m+p-1) for 1F1B and GPipe,
(p-1)/(v*m+p-1) interleaved, (p-1)/(3m+p-1) for ZB-H1 (the weight-gradient passes fill two thirds
of it; T_F = T_B = T_W).

Step time = (compute + tp + ep + pp communication) / (1 - bubble) + the part of the dp
communication that outlasts the compute it overlaps. Compute runs at `efficiency` x peak (0.5
by default, an assumption: with it DeepSeek-V2's published layout plans at the paper's measured
tokens per GPU-second, tests/platform/test_plan.py); tp and ep collectives are blocking in moray,
so on the critical path; ZeRO's collectives overlap the backward (bucketed reduce, FSDP
prefetch). Collectives are ring algorithms: an all-reduce
sends 2(n-1)/n of the payload per rank, a reduce-scatter, all-gather or all-to-all (n-1)/n.
Routing is assumed balanced and dropless (k pairs per token on k experts' ranks). Memory is in
GiB (2^30 bytes), traffic in GB and GB/s (1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

from moray.model.accounting import account, block_params, block_train_flops, head_train_flops
from moray.model.config import ModelConfig

BYTES = {"fp32": 4, "bf16": 2}
GIB = 2**30


# ---- devices ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """One accelerator and its links. Bandwidths are GB/s (1e9 bytes) per device, each direction."""

    name: str
    memory_gb: float  # GiB usable by tensors and the framework
    peak_tflops: float  # dense bf16 (fp32 for the CPU), no sparsity
    intra_node_gbps: float  # NVLink / NVSwitch
    inter_node_gbps: float  # InfiniBand / RoCE NIC per device
    gpus_per_node: int
    reserve_gb: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    fused_norm: bool = False  # RMSNorm trains as moray's CPU kernel (saving less for backward)


def _this_machine() -> Device:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    # 140 GFLOP/s: a 1024^3 fp32 GEMM on our 2 cores (benchmarks/common.py); gloo over loopback.
    from moray.model.cpu_kernels import builds_here  # moray's CPU kernels, RMSNorm's among them

    return Device("cpu-this-machine", round(mem, 1), 0.14, 5.0, 1.25, os.cpu_count() or 1, 0.0,
                  builds_here())  # fmt: skip


DEVICES = {
    "h100-80g": Device("h100-80g", 80, 989, 450, 50, 8),  # NVLink 4: 900 GB/s both ways; 400 Gb/s NDR
    "h800-80g": Device("h800-80g", 80, 989, 200, 50, 8),  # NVLink cut to 400 GB/s both ways
    "h200-141g": Device("h200-141g", 140, 989, 450, 50, 8),  # 143,771 MiB
    "a100-80g": Device("a100-80g", 80, 312, 300, 25, 8),  # NVLink 3: 600 GB/s; 200 Gb/s HDR
    "cpu-this-machine": None,  # read at plan time
}


def get_device(name: str, **overrides) -> Device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {sorted(DEVICES)}")
    dev = DEVICES[name] or _this_machine()
    return replace(dev, **{k: v for k, v in overrides.items() if v is not None})


# ---- layout -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Degrees, batch and memory policy of one training run."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # borrowed from dp
    virtual_stages: int = 1  # chunks per pipeline rank (interleaved 1F1B)
    micro_batch_size: int = 1  # sequences per micro-batch
    micro_batches: int = 1  # per data-parallel rank per step (gradient accumulation / pipeline)
    seq_len: int = 4096
    zero: int = 1
    schedule: str = "1f1b"  # 1f1b | gpipe | zb-h1
    activation_checkpointing: str = "none"  # none | full
    param_dtype: str = "bf16"
    compute_dtype: str = "bf16"
    grad_dtype: str = "fp32"
    optimizer: str = "adamw"
    attention: str = "fused"  # fused (flash / memory-efficient) | math (T x T probabilities kept)

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch_size * self.micro_batches

    @property
    def master_bytes(self) -> int:
        """fp32 master weights kept with the optimizer when the parameters themselves are not fp32."""
        return 0 if self.param_dtype == "fp32" else 4


def make_layout(
    config: ModelConfig, *, gpus=None, dp=None, tp=1, pp=1, ep=1, global_batch=None, micro_batches=None,
    micro_batch_size=None, **rest,
) -> Layout:  # fmt: skip
    """The Layout these degrees describe, every divisibility limit checked (ValueError naming it)."""
    for name, v in dict(tp=tp, pp=pp, ep=ep, virtual_stages=rest.get("virtual_stages", 1)).items():
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
    if gpus is not None:
        if gpus % (pp * tp):
            raise ValueError(f"--gpus {gpus} is not divisible by pp*tp = {pp * tp}")
        if dp is not None and dp != gpus // (pp * tp):
            raise ValueError(f"--dp {dp} disagrees with --gpus {gpus} / (pp*tp = {pp * tp})")
        dp = gpus // (pp * tp)
    dp = 1 if dp is None else dp
    if dp < 1:
        raise ValueError(f"--dp {dp}: must be a positive integer")
    if dp % ep:
        raise ValueError(f"--ep {ep} must divide dp = {dp}: expert-parallel ranks are borrowed from dp")
    if ep > 1 and config.n_routed_experts % ep:
        raise ValueError(f"--ep {ep} must divide the model's n_routed_experts ({config.n_routed_experts})")
    _check_tp(config, tp)
    v = rest.get("virtual_stages", 1)
    if config.num_hidden_layers < pp * v:
        raise ValueError(f"num_hidden_layers ({config.num_hidden_layers}) < pp*virtual_stages = {pp * v}: "
                         "every pipeline stage needs at least one layer")  # fmt: skip
    if micro_batches is not None and micro_batch_size is not None:
        raise ValueError("give --micro-batches or --micro-batch-size, not both")
    if global_batch is None:  # one micro-batch per pipeline stage by default (the least that fills it)
        global_batch = dp * (micro_batch_size or 1) * (micro_batches or pp)
    if micro_batches is not None:
        if global_batch % (dp * micro_batches):
            raise ValueError(f"--global-batch {global_batch} is not divisible by dp x micro-batches = "
                             f"{dp} x {micro_batches}")  # fmt: skip
        micro_batch_size = global_batch // (dp * micro_batches)
    micro_batch_size = micro_batch_size or 1
    if global_batch % (dp * micro_batch_size):
        raise ValueError(f"--global-batch {global_batch} is not divisible by dp x micro-batch size = "
                         f"{dp} x {micro_batch_size}")  # fmt: skip
    layout = Layout(tp=tp, pp=pp, dp=dp, ep=ep, micro_batch_size=micro_batch_size,
                    micro_batches=global_batch // (dp * micro_batch_size), **rest)  # fmt: skip
    choices = dict(zero=(0, 1, 2, 3), schedule=("1f1b", "gpipe", "zb-h1"), activation_checkpointing=("none", "full"),
                   param_dtype=tuple(BYTES), compute_dtype=tuple(BYTES), grad_dtype=tuple(BYTES),
                   optimizer=("adamw", "lamb_adam"), attention=("fused", "math"))  # fmt: skip
    for name, allowed in choices.items():
        if getattr(layout, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(layout, name)}: use one of {allowed}")
    if layout.param_dtype == "bf16" and layout.compute_dtype == "fp32":
        raise ValueError("--param-dtype bf16 with --compute fp32: fp32 compute needs fp32 parameters")
    return layout


def _check_tp(config: ModelConfig, tp: int) -> None:
    """moray's tensor-parallel limits, named by the model field (and its extras, refused with tp > 1)."""
    if tp == 1:
        return
    sizes = {"num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size,
             "intermediate_size": config.intermediate_size,
             "moe_intermediate_size * n_shared_experts": config.moe_intermediate_size * config.n_shared_experts}  # fmt: skip
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(f"--tp {tp} must divide the model's {name} ({size})")
    from moray.platform.tensor_parallel import check_tensor_parallel

    check_tensor_parallel(config, tp)  # the extras moray cannot split


# ---- pipeline split ---------------------------------------------------------------------------------
def balanced_split(costs: list[float], n_stages: int) -> list[int]:
    """Contiguous boundaries [0, b1, ..., len(costs)] (n_stages + 1 of them; stage s runs
    costs[b[s]:b[s+1]]) minimizing the most expensive stage; every stage gets at least one item.

    The least maximum comes from exact dynamic programming (O(n^2 * stages): nothing for a few
    hundred layers); among the splits that reach it, the later stages are filled first, so spare
    capacity lands on the first stages, which hold the most micro-batches in flight under 1F1B."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[i]: the least max-stage cost of the first i items in s stages, for s = 1, 2, ...
    best = [prefix[i] if i >= 1 else float("inf") for i in range(n + 1)]
    for s in range(2, n_stages + 1):
        best = [float("inf")] * s + [
            min(max(best[j], prefix[i] - prefix[j]) for j in range(s - 1, i)) for i in range(s, n + 1)
        ]
    limit = best[n] * (1 + 1e-12)
    bounds = [n]
    for left in range(n_stages - 1, 0, -1):  # from the back: each stage as full as the limit allows
        end, start = bounds[-1], bounds[-1] - 1
        while start > left and prefix[end] - prefix[start - 1] <= limit:
            start -= 1
        bounds.append(start)
    return [0] + bounds[::-1]


def layer_costs(config: ModelConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each layer, the embedding (a lookup: 0) added to the first and
    the head to the last: what `balanced_split` balances for a pipeline."""
    costs = [block_train_flops(config, i, seq_len).total for i in range(config.num_hidden_layers)]
    costs[-1] += head_train_flops(config)
    return costs


# ---- activations ------------------------------------------------------------------------------------
def block_activation_bytes(c: ModelConfig, i: int, layout: Layout, fused_norm: bool = False) -> float:
    """Bytes saved for backward per token by block i on one rank, enumerating what moray's modules
    save (a = bytes of the compute dtype; norms, the router and the loss keep fp32):

      RMSNorm(d)        the fp32 input (a copy under bf16), the rsqrt, the normalized a-d: 4d + 4 + a*d,
                        and its output, the input of the projections after it: a*d. `fused_norm` (moray's
                        CPU kernel, norm.TrainingRMSNorm): the input as it is (contiguous), the rsqrt
                        and the output: no fp32 copy, no normalized one
      MLA               q_lora norm (4r_q + 4 + a*r_q) and q_b's input (a*r_q); kv_a norm (4c + 4 + a*c,
                        4r more in fp32: the input is a view of [c_kv | k_pe]); the latent (a(c + r));
                        attention per head: fused kernel q, k (a*dq each), v and out zero-padded to the
                        query width when dv < dq (a*dq each; else v is a view of kv_b's output, a(dn + dv),
                        and out a*dv), log-sum-exp (4); the math path (an explicit mask on a backend without a fused
                        masked kernel) scaled q and k, the T probabilities and v: a(2dq + T + dv) (v: a(dn + dv) with one sequence per
                        micro-batch, whose (1, h, T, dv) view of kv_b's output needs no copy to be
                        batched, so the whole output stays saved); o_proj's input a*dv
      MLP               gate, silu(gate), up, their product: 4a*I (dense I, shared experts I_s), split by tp
      router            fp32 input copy (4H, bf16 only), scores and logits (8E, fp32), lse (4), top-k ids (8k)
      routed experts    per pair: gate|up pre-activation (2a*I_e), sort order and token ids (16), weight (a),
                        a kept-pair index with a capacity factor (8); with ep > 1 also the received row,
                        the returned row and its weighted copy (index_add keeps its source): 3a*H, a unit
                        weight (a) and an expert order (8)
    """
    a = BYTES[layout.compute_dtype]
    H, tp, k = c.hidden_size, layout.tp, c.num_experts_per_tok
    h = c.num_attention_heads / tp
    dq, dn, dv, r, kv = c.qk_head_dim, c.qk_nope_head_dim, c.v_head_dim, c.qk_rope_head_dim, c.kv_lora_rank

    def norm(d: int, input_bytes: int) -> float:  # + its output, the next matmul's input
        return input_bytes * d + 4 + a * d if fused_norm else 4 * d + 4 + a * d + a * d

    total = 2 * norm(H, 4)  # input_layernorm, post_attention_layernorm (the fp32 residual stream)
    if fused_norm and i == 0 and layout.tp > 1:
        # the first block's input comes from the vocab-parallel embedding's all-reduce as a tensor
        # subclass (no raw memory for the kernel): PyTorch's norm there
        total += a * H
    if c.q_lora_rank:
        total += norm(c.q_lora_rank, a)
    if fused_norm:  # kv_a norm: a contiguous copy of its [c_kv | k_pe] view; the latent
        total += a * kv + 4 + a * (kv + r)
    else:
        total += 4 * kv + (4 * r if a == 4 else 0) + 4 + a * kv + a * (kv + r)
    if layout.attention == "math":
        total += a * h * (2 * dq + layout.seq_len + dv + (dn if layout.micro_batch_size == 1 else 0))
    elif dv < dq:  # v zero-padded to the query width (mla.py): q, k, the padded v and the padded out
        total += a * h * 4 * dq + 4 * h
    else:
        total += a * h * (2 * dq + dn + dv + dv) + 4 * h
    total += a * h * dv  # o_proj input
    if not c.is_moe_layer(i):
        return total + 4 * a * c.intermediate_size / tp
    E, I_e = c.n_routed_experts, c.moe_intermediate_size
    total += (4 * H if a != 4 else 0) + 8 * E + 4 + 8 * k
    pair = 2 * a * I_e + 16 + a + (8 if c.capacity_factor is not None else 0)
    if layout.ep > 1:
        pair += 3 * a * H + a + 8
    total += k * pair
    return total + 4 * a * c.moe_intermediate_size * c.n_shared_experts / tp


def head_activation_bytes(c: ModelConfig, layout: Layout, fused_norm: bool = False) -> float:
    """The final norm, the head's input, the fp32 log-softmax over the (tp-sharded) vocabulary and
    the targets, per token."""
    a, H = BYTES[layout.compute_dtype], c.hidden_size
    return 4 * H + 4 + (1 if fused_norm else 2) * a * H + 4 * c.vocab_size / layout.tp + 8


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass
class StageMemory:
    """Bytes per device on one pipeline rank."""

    rank: int
    layers: list[int]  # the layer indices this rank runs
    params: float
    grads: float
    optimizer: float  # moments (+ fp32 master weights when the parameters are bf16)
    activations: float
    buffers: float  # transient: ZeRO-3's gathered blocks, or autocast's bf16 copies of fp32 weights
    reserve: float
    in_flight: float  # micro-batches whose activations are held at the peak

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.reserve

    def parts(self) -> dict[str, float]:
        return {"parameters": self.params, "gradients": self.grads, "optimizer state": self.optimizer,
                "activations": self.activations, "buffers": self.buffers}  # fmt: skip


@dataclass
class Comm:
    """One parallel dimension's traffic per device per step."""

    dim: str
    group: int  # ranks in the collective
    what: str
    bytes: float  # sent per device per step
    link: str  # nvlink | ib
    gbps: float
    exposed: bool  # on the critical path (else overlapped with compute)

    @property
    def seconds(self) -> float:
        return self.bytes / (self.gbps * 1e9) if self.bytes else 0.0


@dataclass
class Plan:
    model: str
    device: Device
    layout: Layout
    params_total: int
    activated: int
    train_flops_per_token: int
    stages: list[StageMemory]
    peak: StageMemory  # the most loaded rank
    comm: list[Comm]
    bubble: float
    compute_s: float
    step_s: float
    efficiency: float
    tokens_per_device_s: float
    mfu: float

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.device.memory_gb * GIB

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layout"].update(world=self.layout.world, global_batch=self.layout.global_batch)
        for s, src in zip(d["stages"] + [d["peak"]], self.stages + [self.peak]):
            s["total"] = src.total
        for c, src in zip(d["comm"], self.comm):
            c["seconds"] = src.seconds
        d["fits"] = self.fits
        return d


def _bubble(layout: Layout) -> float:
    p, m, v = layout.pp, layout.micro_batches, layout.virtual_stages
    if p == 1:
        return 0.0
    if layout.schedule == "zb-h1":  # ZB-H1: the weight-gradient passes fill a third of 1F1B's bubble
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (v * m + p - 1)


def _in_flight(layout: Layout, rank: int) -> list[list[int]]:
    """Micro-batches whose activations rank `rank` holds, per chunk (its v virtual stages), at each
    moment that may be its peak: after each forward. GPipe holds all m; 1F1B (and ZB-H1) m or
    pp - rank; interleaved 1F1B, simulated as torch's ScheduleInterleaved1F1B (Megatron's order):
    forward k runs chunk (k // r) % v, backward k chunk v - 1 - (k // r) % v, r the micro-batches
    of a round (pp when pp divides m), after a warm-up of (v - 1) r + 2 (pp - rank - 1) forwards
    one forward then one backward."""
    p, m, v = layout.pp, layout.micro_batches, layout.virtual_stages
    if layout.schedule == "gpipe" or p == 1:
        return [[m if layout.schedule == "gpipe" else 1]]
    if v == 1:
        return [[min(m, p - rank)]]
    per_round = m // max(1, m // p)
    warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)
    held, moments = [0] * v, []
    for k in range(m * v):
        held[(k // per_round) % v] += 1
        moments.append(list(held))
        if k >= warmup:  # steady state: this forward, then the backward of an earlier micro-batch
            held[v - 1 - ((k - warmup) // per_round) % v] -= 1
    return moments


def _link(device: Device, span: int) -> tuple[str, float]:
    """A group whose ranks lie within `span` consecutive ranks fits a node when span <= gpus_per_node."""
    if span <= device.gpus_per_node:
        return "nvlink", device.intra_node_gbps
    return "ib", device.inter_node_gbps


@dataclass
class RankShare:
    """What one pipeline rank holds of the model (parameter counts, after tp and ep)."""

    layers: list[int]
    rest: float  # everything but the routed experts: sharded over dp by ZeRO
    experts: float  # the routed experts: sharded over dp / ep by ZeRO
    unit: float  # the largest block: one FSDP unit
    first: bool  # holds the embedding
    last: bool  # holds the final norm and the head


def rank_share(c: ModelConfig, layout: Layout, layers: list[int]) -> RankShare:
    H, V, tp, ep = c.hidden_size, c.vocab_size, layout.tp, layout.ep
    first, last = 0 in layers, c.num_hidden_layers - 1 in layers
    rest = experts = unit = 0.0
    for i in layers:
        b = block_params(c, i)
        block = (b.heads + b.mlp) / tp + b.latent + b.router + b.norms
        rest, experts, unit = rest + block, experts + b.routed / ep, max(unit, block + b.routed / ep)
    if first:
        rest += V * H / tp
    if last:
        rest += H + (0 if c.tie_word_embeddings and first else V * H / tp)
    return RankShare(layers, rest, experts, unit, first, last)


@dataclass
class RankWork:
    """Per token of its data-parallel rank: one pipeline rank's FLOPs and critical-path payloads."""

    flops: float  # recomputation included
    tp_bytes: float  # all-reduce payload
    ep_bytes: float  # all-to-all payload, every direction


def rank_work(c: ModelConfig, layout: Layout, share: RankShare) -> RankWork:
    a, H, tp = BYTES[layout.compute_dtype], c.hidden_size, layout.tp
    replay = layout.activation_checkpointing == "full"  # the recomputed forward: its FLOPs, its traffic
    flops = tp_bytes = ep_bytes = 0.0
    for i in share.layers:
        f = block_train_flops(c, i, layout.seq_len)
        flops += (f.split / tp + f.replicated) * (4 / 3 if replay else 1)  # forward = 2 of the 6 FLOPs
        mlp = not c.is_moe_layer(i) or c.n_shared_experts > 0
        fwd = a * (H + (H if mlp else 0))  # o_proj and the MLP's down_proj: row-wise, all-reduced
        # column-wise inputs' gradients: q (or q_b), kv_b, the shared rope key, gate and up
        bwd = a * ((c.q_lora_rank or H) + c.kv_lora_rank + c.qk_rope_head_dim + (2 * H if mlp else 0))
        tp_bytes += fwd * (2 if replay else 1) + bwd
        if c.is_moe_layer(i):  # one hidden row per token-expert pair (moray sends pairs, not tokens),
            # to the experts and back, forward and backward (and the replayed forward)
            ep_bytes += (6 if replay else 4) * c.num_experts_per_tok * H * a
    if share.last:
        flops += head_train_flops(c) / tp
        tp_bytes += a * H  # the head's input gradient
    if share.first:
        tp_bytes += a * H  # the vocab-parallel embedding's lookup
    return RankWork(flops, tp_bytes, ep_bytes)


def rank_memory(c: ModelConfig, layout: Layout, device: Device, rank: int, share: RankShare,
                chunks: list[list[int]] | None = None) -> StageMemory:  # fmt: skip
    """The bytes pipeline rank `rank` holds; `chunks`: its virtual stages' layers (default: one)."""
    L, H, V, tp = layout, c.hidden_size, c.vocab_size, layout.tp
    a, pb, gb = BYTES[L.compute_dtype], BYTES[L.param_dtype], BYTES[L.grad_dtype]
    zero = L.zero if L.dp > 1 else 0  # one data-parallel rank shards nothing (moray applies no FSDP)

    def sharded(level: int) -> float:
        if zero < level:
            return share.rest + share.experts
        return share.rest / L.dp + share.experts / (L.dp // L.ep)

    params, grads = sharded(3) * pb, sharded(2) * gb
    optimizer = sharded(1) * (8 + L.master_bytes)
    if zero == 3:  # the root unit (embedding, head) stays gathered, plus two blocks and one's grads
        root = (V * H / tp) * (share.first + (share.last and not (share.first and c.tie_word_embeddings)))
        buffers = (root + 2 * share.unit) * a + share.unit * gb
    elif L.param_dtype != L.compute_dtype:  # autocast keeps a bf16 copy of every local weight
        buffers = (share.rest + share.experts) * a
    else:
        buffers = 0.0
    # moray's vocab-parallel embedding gets its gradient back whole (a Replicate DTensor) on every tp
    # rank (measured in tests/platform/test_plan.py): V*H, not V*H/tp; transient once ZeRO shards it
    embed_grad = V * H * (1 - 1 / tp) * gb if share.first else 0.0
    if zero >= 2:
        buffers += embed_grad
    else:
        grads += embed_grad

    per_block = {i: block_activation_bytes(c, i, L, device.fused_norm) for i in share.layers}
    ckpt = L.activation_checkpointing == "full"

    def per_token(layers: list[int]) -> float:  # one micro-batch of a chunk, per token
        b = len(layers) * a * H if ckpt else sum(per_block[i] for i in layers)  # checkpointed: block inputs
        b += 4 * c.qk_rope_head_dim + (8 if 0 in layers else 0)  # rotary cos/sin; token ids
        return b + (
            head_activation_bytes(c, L, device.fused_norm) if c.num_hidden_layers - 1 in layers else 0
        )

    chunks = chunks or [share.layers]
    sizes = [per_token(layers) for layers in chunks]
    held = max(_in_flight(L, rank), key=lambda n: sum(k * b for k, b in zip(n, sizes)))
    tokens_mb = L.micro_batch_size * L.seq_len
    activations = sum(k * b for k, b in zip(held, sizes)) * tokens_mb
    flight = sum(held) / len(chunks)  # in whole-rank units
    if ckpt:  # one block recomputed at a time, with all its activations
        activations += max(per_block.values()) * tokens_mb
    return StageMemory(rank, share.layers, params, grads, optimizer, activations, buffers,
                       device.reserve_gb * GIB, flight)  # fmt: skip


def plan(config: ModelConfig, layout: Layout, device: Device, name: str = "model",
         efficiency: float = 0.5, check_fit: bool = True) -> Plan:  # fmt: skip
    """The plan of `layout` on `device`; ValueError if it does not fit (unless check_fit=False)."""
    c, L = config, layout
    tp, ep, dp, pp, v = L.tp, L.ep, L.dp, L.pp, L.virtual_stages
    a, pb, gb = BYTES[L.compute_dtype], BYTES[L.param_dtype], BYTES[L.grad_dtype]
    bounds = balanced_split(layer_costs(c, L.seq_len), pp * v)
    chunks = [list(range(bounds[j], bounds[j + 1])) for j in range(pp * v)]
    mine = [[chunks[j] for j in range(r, pp * v, pp)] for r in range(pp)]  # each rank's chunks
    shares = [rank_share(c, L, [i for chunk in mine[r] for i in chunk]) for r in range(pp)]
    stages = [rank_memory(c, L, device, r, share, mine[r]) for r, share in enumerate(shares)]
    peak = max(stages, key=lambda s: s.total)
    if check_fit:
        _check_fits(peak, device)

    # The slowest rank sets the pipeline's pace; the figures below are its, per step.
    tokens_mb = L.micro_batch_size * L.seq_len
    tokens_rank = tokens_mb * L.micro_batches  # per data-parallel rank (and each of its tp ranks)
    works = [rank_work(c, L, share) for share in shares]
    busiest = max(range(pp), key=lambda r: works[r].flops + works[r].tp_bytes + works[r].ep_bytes)
    work, share = works[busiest], shares[busiest]
    comm = []
    if tp > 1:
        comm.append(Comm("tp", tp, "all-reduces: attention and MLP outputs (fwd), column-wise inputs' grads (bwd)",
                         work.tp_bytes * tokens_rank * 2 * (tp - 1) / tp, *_link(device, tp), exposed=True))  # fmt: skip
    if ep > 1:
        comm.append(Comm("ep", ep, "all-to-all: token rows to their experts and back, fwd and bwd",
                         work.ep_bytes * tokens_rank * (ep - 1) / ep, *_link(device, ep * tp), exposed=True))  # fmt: skip
    if pp > 1:
        sends = 2 * v * L.micro_batches * tokens_mb * c.hidden_size * a  # activations on, gradients back
        comm.append(Comm("pp", pp, "activations to the next stage, gradients to the previous",
                         sends, *_link(device, L.world), exposed=True))  # fmt: skip
    if dp > 1:
        # the share of the rank's parameters that crosses its ring: (n - 1) / n of each group's
        per_param = share.rest * (dp - 1) / dp + share.experts * (1 - ep / dp)
        m = L.micro_batches
        volume, what = {
            0: (2 * per_param * gb, "gradient all-reduce once per step"),
            1: (per_param * (gb + pb), "gradient reduce-scatter + parameter all-gather once per step"),
            2: (per_param * (m * gb + pb), "gradient reduce-scatter per micro-batch + parameter all-gather"),
            3: (per_param * m * (2 * a + gb), "parameter all-gather fwd and bwd + gradient reduce-scatter, per micro-batch"),
        }[L.zero]  # fmt: skip
        comm.append(Comm("dp", dp, f"ZeRO-{L.zero}: {what}", volume, *_link(device, dp * tp), exposed=False))

    acc = account(c, seq_len=L.seq_len)
    compute_s = work.flops * tokens_rank / (device.peak_tflops * 1e12 * efficiency)
    critical = compute_s + sum(x.seconds for x in comm if x.exposed)
    bubble = _bubble(L)
    overlapped = sum(x.seconds for x in comm if not x.exposed)
    step_s = critical / (1 - bubble) + max(0.0, overlapped - critical)  # dp hides behind the compute
    tok_dev_s = L.global_batch * L.seq_len / (step_s * L.world)
    mfu = acc.train_flops_per_token * tok_dev_s / (device.peak_tflops * 1e12)
    return Plan(name, device, L, acc.total_params, acc.activated_params, acc.train_flops_per_token, stages, peak,
                comm, bubble, compute_s, step_s, efficiency, tok_dev_s, mfu)  # fmt: skip


def _check_fits(peak: StageMemory, device: Device) -> None:
    limit = device.memory_gb * GIB
    if peak.total <= limit:
        return
    part, size = max(peak.parts().items(), key=lambda kv: kv[1])
    hint = {
        "activations": "activation checkpointing, more pipeline stages, tensor parallelism or a smaller "
        "micro-batch",
        "parameters": "ZeRO-3, more pipeline stages, expert or tensor parallelism",
        "gradients": "ZeRO-2/3, bf16 gradients, more pipeline stages or expert parallelism",
        "optimizer state": "ZeRO-1 (shards it over dp), expert or pipeline parallelism",
        "buffers": "bf16 parameters or smaller FSDP units",
    }[part]
    raise ValueError(
        f"does not fit: pipeline rank {peak.rank} needs {peak.total / GIB:.1f} GiB of the "
        f"{device.name}'s {device.memory_gb:g} GiB (over by {(peak.total - limit) / GIB:.1f} GiB); "
        f"the largest part is {part} ({size / GIB:.1f} GiB): try {hint}"
    )


# ---- output -----------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _ranges(layers: list[int]) -> str:
    out, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(out)


def buffers_note(L: Layout) -> str:
    if L.zero == 3 and L.dp > 1:
        return " (ZeRO-3: gathered blocks)"
    return f" ({L.compute_dtype} copies of weights)" if L.param_dtype != L.compute_dtype else ""


def format_plan(p: Plan) -> str:
    L, d, s = p.layout, p.device, p.peak
    nodes = math.ceil(L.world / d.gpus_per_node)
    sched = "interleaved 1F1B" if L.virtual_stages > 1 else {"1f1b": "1F1B", "gpipe": "GPipe", "zb-h1": "ZB-H1"}[L.schedule]  # fmt: skip
    lines = [
        f"moray plan: {p.model} on {L.world:,} x {d.name} ({nodes:,} node{'s' if nodes > 1 else ''} of {d.gpus_per_node})",
        f"  layout    tp {L.tp} x pp {L.pp} x dp {L.dp} (ep {L.ep} borrowed from dp), ZeRO-{L.zero}, {sched}"
        + (f" x{L.virtual_stages} virtual" if L.virtual_stages > 1 else "")
        + f", activation checkpointing {L.activation_checkpointing}",
        f"  precision params {L.param_dtype}, compute {L.compute_dtype}, grads {L.grad_dtype}, "
        f"{L.optimizer} (2 fp32 moments{' + fp32 master' if L.master_bytes else ''}), {L.attention} attention",
        f"  batch     {L.global_batch:,} sequences x {L.seq_len:,} = {_human(L.global_batch * L.seq_len)} tokens/step; "
        f"{L.micro_batches} micro-batches of {L.micro_batch_size} per dp rank",
        f"  model     {_human(p.params_total)} params, {_human(p.activated)} activated, "
        f"{p.train_flops_per_token / 1e9:.4g} GFLOP/token (fwd+bwd)",
    ]
    if L.pp > 1:
        sizes = " ".join(str(len(st.layers)) for st in p.stages)
        lines.append(f"  stages    layers per rank (FLOP-balanced): {sizes}")
    lines.append(
        f"memory per device, pipeline rank {s.rank} (layers {_ranges(s.layers)}; the most loaded)  GiB"
    )
    rows = [
        (f"parameters ({L.param_dtype}{', /dp' if L.zero >= 3 else ''})", s.params),
        (f"gradients ({L.grad_dtype}{', /dp' if L.zero >= 2 else ''})", s.grads),
        ("optimizer state" + (", /dp" if L.zero >= 1 else ""), s.optimizer),
        (
            f"activations ({s.in_flight:g} micro-batch{'es' if s.in_flight != 1 else ''} in flight)",
            s.activations,
        ),
        ("transient buffers" + buffers_note(L), s.buffers),
        ("reserve (context, NCCL, fragmentation)", s.reserve),
    ]
    lines += [f"  {k:<52}{v / GIB:>8.2f}" for k, v in rows]
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<52}{s.total / GIB:>8.2f}  of {d.memory_gb:g}: {verdict}")
    lines.append("communication per device per step        GB     group  link          s")
    for x in p.comm:
        flag = "" if x.exposed else "  (overlapped)"
        lines.append(f"  {x.dim:<4}{x.bytes / 1e9:>35.2f}  {x.group:>6}  {x.link:<6}{x.gbps:>4g} GB/s"
                     f"{x.seconds:>8.3f}{flag}")  # fmt: skip
        lines.append(f"        {x.what}")
    if not p.comm:
        lines.append("  none (one device)")
    lines += [
        f"pipeline bubble  {100 * p.bubble:.1f}%",
        f"step time        {p.step_s:.2f} s (compute {p.compute_s:.2f} s at {100 * p.efficiency:.0f}% of "
        f"{d.peak_tflops:g} TFLOP/s)",
        f"throughput       {p.tokens_per_device_s:,.0f} tokens/s per device, MFU {100 * p.mfu:.1f}%",
    ]
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moray plan", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    arg = parser.add_argument
    arg(
        "model",
        help="a preset (tiny, small, deepseek-v2-lite, deepseek-v2), a YAML config or an HF directory",
    )
    g = parser.add_argument_group("layout")
    g.add_argument("--gpus", type=int, help="world size; dp = gpus / (pp * tp)")
    g.add_argument("--dp", type=int, help="data-parallel degree (instead of --gpus)")
    for name in ("tp", "pp", "ep"):
        g.add_argument(f"--{name}", type=int, default=1)
    g.add_argument(
        "--virtual-stages", type=int, default=1, help="chunks per pipeline rank (interleaved 1F1B)"
    )
    g.add_argument("--micro-batches", type=int, help="per dp rank per step")
    g.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch (default 1)")
    g.add_argument("--seq-len", type=int, default=4096)
    g.add_argument("--global-batch", type=int, help="sequences per step (default: one micro-batch per stage)")
    g.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3], help="3 = moray's FSDP2")
    g.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe", "zb-h1"])
    g.add_argument("--activation-checkpointing", default="none", choices=["none", "full"])
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "lamb_adam"])
    g.add_argument("--param-dtype", choices=["bf16", "fp32"],
                   help="default: fp32 with ZeRO-3 or fp32 compute (moray's FSDP2), else bf16 + fp32 master")  # fmt: skip
    g.add_argument("--compute", choices=["bf16", "fp32"], help="default: bf16 on GPUs, fp32 on the CPU")
    g.add_argument("--grad-dtype", default="fp32", choices=["bf16", "fp32"])
    g.add_argument("--attention", default="fused", choices=["fused", "math"],
                   help="fused (flash; moray pads MLA's values to take it) or math (T x T probabilities kept)")  # fmt: skip
    d = parser.add_argument_group("device")
    d.add_argument("--device", default="h100-80g", choices=sorted(DEVICES))
    d.add_argument("--memory-gb", type=float, help="GiB per device")
    d.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device")
    d.add_argument("--intra-node-gbps", type=float, help="GB/s per device per direction (NVLink)")
    d.add_argument("--inter-node-gbps", type=float, help="GB/s per device per direction (InfiniBand)")
    d.add_argument("--gpus-per-node", type=int)
    d.add_argument("--reserve-gb", type=float, help="GiB kept for the framework (default 4 on GPUs)")
    d.add_argument("--efficiency", type=float, default=0.5, help="achievable fraction of peak (default 0.5)")
    arg("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from moray.platform.config import load_model_config

        config = load_model_config(args.model)
        device = get_device(args.device, memory_gb=args.memory_gb, peak_tflops=args.peak_tflops,
                            intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                            gpus_per_node=args.gpus_per_node, reserve_gb=args.reserve_gb)  # fmt: skip
        cpu = device.name.startswith("cpu")
        compute = args.compute or ("fp32" if cpu else "bf16")
        layout = make_layout(
            config, gpus=args.gpus, dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep,
            global_batch=args.global_batch, micro_batches=args.micro_batches,
            micro_batch_size=args.micro_batch_size, virtual_stages=args.virtual_stages, seq_len=args.seq_len,
            zero=args.zero, schedule=args.schedule, activation_checkpointing=args.activation_checkpointing,
            param_dtype=args.param_dtype or ("fp32" if args.zero == 3 or compute == "fp32" else "bf16"),
            compute_dtype=compute, grad_dtype=args.grad_dtype, optimizer=args.optimizer,
            attention=args.attention,
        )  # fmt: skip
        p = plan(config, layout, device, name=args.model, efficiency=args.efficiency)
    except ValueError as e:  # a limit the layout breaks: one clear line, no traceback
        print(f"moray plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.as_dict(), indent=2) if args.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
