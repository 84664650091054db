"""The paged MLA latent cache: fixed-size blocks of (kv_lora_rank + qk_rope_head_dim) values per
token per layer in one preallocated pool, handed out to requests under a memory budget.

`PagedCacheView` gives the model the `LatentCache` interface (`lengths`, `write`, `read`) over a
batch of block tables, so `moray.model.Transformer` runs on it unchanged: writes scatter into the
rows' blocks, reads gather a row's blocks back into a contiguous (B, S, c + r) tensor.
Block 0 is never handed out: it pads short block tables and is never written.
"""

from __future__ import annotations

import math

import torch

from moray.model.config import ModelConfig


class BlockPool:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layers: range | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks} must be >= 2 (block 0 is reserved)")
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        # The layers whose entries this pool stores: all of them, or a pipeline stage's range (the
        # replica's own pool then stores none and only hands out the block ids every stage uses).
        self.layers = range(config.num_hidden_layers) if layers is None else layers
        self.block_size = block_size
        self.num_blocks = num_blocks
        # (L, N, block, c + r); flattened per layer to (N * block, c + r) for token-wise indexing.
        self.data = torch.zeros(
            len(self.layers), num_blocks, block_size, self.width, dtype=dtype, device=device
        )
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack; block 0 stays out

    @classmethod
    def bytes_per_block(cls, config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32) -> int:
        width = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * block_size * width * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def blocks_in_budget(
        cls, config: ModelConfig, budget_bytes: int, block_size: int = 16, dtype=torch.float32
    ) -> int:
        """How many blocks (the reserved one included) a budget holds for every layer's entries."""
        return max(int(budget_bytes // cls.bytes_per_block(config, block_size, dtype)) + 1, 2)

    @classmethod
    def from_budget(
        cls, config: ModelConfig, budget_bytes: int, block_size: int = 16, dtype=torch.float32, device="cpu",
        layers: range | None = None,
    ) -> BlockPool:  # fmt: skip
        n = cls.blocks_in_budget(config, budget_bytes, block_size, dtype)
        return cls(config, n, block_size, dtype, device, layers)

    def layer_data(self, layer: int) -> torch.Tensor:
        """One (model) layer's entries, flat: (N * block, c + r)."""
        return self.data[layer - self.layers.start].view(-1, self.width)

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.capacity_blocks

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n free blocks, or None (and nothing taken) if there are fewer."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedCacheView:
    """The `LatentCache` interface over the blocks of a batch of requests, for one forward."""

    def __init__(self, pool: BlockPool, block_tables: list[list[int]], lengths: list[int]):
        self.pool = pool
        device = pool.data.device
        bs = pool.block_size
        n = max(max((len(t) for t in block_tables), default=1), 1)
        table = torch.zeros(len(block_tables), n, dtype=torch.long)
        for i, t in enumerate(block_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        self.table = table.to(device)  # (B, n_blocks)
        self.capacity = torch.tensor([len(t) * bs for t in block_tables], device=device)  # (B,)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)  # (B,)
        # flat token slot of every position a row can hold: (B, n_blocks * block)
        self._slots = (self.table[:, :, None] * bs + torch.arange(bs, device=device)).reshape(
            len(block_tables), -1
        )

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def write(self, layer: int, positions: torch.Tensor, latent: torch.Tensor) -> None:
        """Store latent (B, T, c + r) at positions (B, T); positions past a row's blocks (right
        padding of a batched forward) are dropped."""
        valid = positions < self.capacity[:, None]  # (B, T)
        pos = positions.clamp(max=self._slots.shape[1] - 1)
        slots = self._slots.gather(1, pos)  # (B, T)
        flat = self.pool.layer_data(layer)  # (N * block, c + r)
        if bool(valid.all()):
            flat[slots.reshape(-1)] = latent.reshape(-1, latent.shape[-1]).to(flat.dtype)
        else:
            flat[slots[valid]] = latent[valid].to(flat.dtype)

    def read(self, layer: int, upto: int) -> torch.Tensor:
        flat = self.pool.layer_data(layer)
        slots = self._slots[:, :upto]
        if slots.shape[1] < upto:  # keys past every row's blocks are masked anyway: read block 0
            slots = torch.nn.functional.pad(slots, (0, upto - slots.shape[1]))
        return flat[slots]  # (B, S, c + r)
