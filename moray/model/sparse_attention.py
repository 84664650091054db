"""Local and strided attention computed block-sparsely: each query scores only the keys it may see.

A "local" or "strided" layer lets a query see about sliding_window or T / attention_stride of the T
keys, yet the dense form (masks.allowed_keys -> an additive (T, S) mask -> SDPA) computes all T x T
scores and masks most of them away. Here the positions are split into groups, each with the list
of keys that its queries may see, and one batched SDPA attends every group to its own keys:

- local: blocks of `block = max(sliding_window, MIN_BLOCK)` consecutive queries; a block's keys are
  the block and the sliding_window - 1 positions before it;
- strided: the residue classes t mod attention_stride: a key at a multiple of the stride from a
  query is in the query's class, so a class attends causally to itself;
- both: the global prefix 0..num_global_tokens-1 in front of every group's keys (and invalid in the
  rest of the list, so no key is counted twice).

Inside a group the mask is the dense rule itself (allowed_keys, relative_bias) evaluated on the
group's positions, so the result is the dense one up to float summation order, in the forward and
the backward pass. Work: T x (block + window + G) scores for local, T x (T / stride + G) for
strided, instead of T x T.

It serves where the keys are the queries themselves at positions 0..T-1 with no padding (training,
a pipeline stage, a prefill into an empty cache); decode, padded batches and a prefill that
continues a cache keep the dense mask (`groups_for` says which).

Why not flex_attention (torch.nn.attention.flex_attention with create_block_mask), the library made
for this: on CPU it has no backward pass (NotImplementedError in torch 2.11 and 2.13), so it cannot
train; eager, it scores every block, 3-13x slower than SDPA with the dense mask; compiled (a cold
compile of 15-70 s, then 4-8 s for each new length), its local forward takes 0.7-1.4x this
module's time, but its strided forward 12-34x, because every 128 x 128 block holds a strided key,
so its block mask skips only the causal half. (On an H200 in bf16, where
it has a backward, compiled flex_attention ran a local layer's forward+backward 1.7x faster than
this module and a strided one's 3.6x slower.) benchmarks/bench_sparse_attention.py measures them.

Shapes: B batch, H heads, T positions, n groups, Lq queries and Sk keys per group, d head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moray.model.config import ModelConfig

# Local query blocks are at least this long: a 16-32 wide window in blocks of its own width makes
# matmuls too small to run well (at 8k tokens, blocks of 64 ran 1.3-2.9x faster than of 16 or 32).
MIN_BLOCK = 64


@dataclass
class Groups:
    """Each group's queries and keys by position. Query slots past the sequence (the tail of the
    last block or class) are padding whose outputs are dropped; a key slot counts where k_valid."""

    q_pos: torch.Tensor  # (n, Lq): together a permutation of 0..n*Lq-1
    k_pos: torch.Tensor  # (n, Sk)
    k_valid: torch.Tensor  # (n, Sk) bool: inside the sequence and not a second copy of a global key


def groups_for(
    config: ModelConfig,
    layer_type: str,
    q_pos: torch.Tensor,  # (B, T)
    key_len: int,  # S
    k_valid: torch.Tensor | None,  # (B, S) bool
) -> Groups | None:
    """This layer's groups, or None where the dense mask serves: a full layer, the switch off, keys
    other than the queries' own positions 0..T-1 (a cache with earlier tokens, padding), or a
    layout with no fewer scores than the dense T x S."""
    B, T = q_pos.shape
    if layer_type == "full" or not config.block_sparse_attention or key_len != T:
        return None
    if k_valid is not None and not bool(k_valid.all()):
        return None
    if not torch.equal(q_pos, torch.arange(T, device=q_pos.device).expand(B, T)):
        return None
    device = q_pos.device
    if layer_type == "local":
        window = config.sliding_window
        block = max(window, MIN_BLOCK)
        n = -(-T // block)
        q = torch.arange(n * block, device=device).view(n, block)  # (n, block)
        k = q[:, :1] - (window - 1) + torch.arange(block + window - 1, device=device)  # (n, block + w - 1)
    else:  # strided
        stride = config.attention_stride
        length = -(-T // stride)  # a class's length
        classes = min(stride, T)  # with stride >= T each position is a class of its own
        q = torch.arange(length, device=device) * stride + torch.arange(classes, device=device)[:, None]
        k = q  # (classes, length)
    n_global = min(config.num_global_tokens, T)
    k_valid = (k >= n_global) & (k < T)
    glob = torch.arange(n_global, device=device).expand(q.shape[0], n_global)  # (n, G)
    k = torch.cat([glob, k], dim=1)  # (n, Sk)
    k_valid = torch.cat([torch.ones_like(glob, dtype=torch.bool), k_valid], dim=1)
    if k.numel() * q.shape[1] >= T * T:
        return None
    return Groups(q, k, k_valid)


def grouped_attention(
    q: torch.Tensor,  # (B, H, T, d)
    k: torch.Tensor,  # (B, H, T, d)
    v: torch.Tensor,  # (B, H, T, dv)
    groups: Groups,
    mask: torch.Tensor,  # (n, 1|H, Lq, Sk) additive, from the groups' positions
    scale: float,
) -> torch.Tensor:
    """Attention of each group's queries to its keys in one SDPA call: (B, H, T, dv)."""
    B, H, T, _ = q.shape
    n, Lq = groups.q_pos.shape

    def gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # -> (n, B*H, len, d)
        x = x.index_select(2, pos.clamp(0, T - 1).flatten())  # (B, H, n*len, d)
        return x.view(B * H, n, -1, x.shape[-1]).transpose(0, 1)

    if mask.shape[1] > 1 and B > 1:  # per-head mask: the batch is folded into the heads
        mask = mask.repeat(1, B, 1, 1)
    out = F.scaled_dot_product_attention(
        gather(q, groups.q_pos), gather(k, groups.k_pos), gather(v, groups.k_pos), attn_mask=mask, scale=scale
    )  # (n, B*H, Lq, dv)
    out = out.transpose(0, 1).reshape(B, H, n * Lq, -1)  # slots in group order
    slot_of_position = groups.q_pos.flatten().argsort()[:T]
    return out.index_select(2, slot_of_position)
