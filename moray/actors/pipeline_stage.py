"""Decoder layers in Ray actors: pipeline parallelism for serving models that do not fit one host.

Each `PipelineStage` holds a contiguous range of layers and those layers' part of the paged latent
cache (a BlockPool over its range, with the same block ids as the replica's). The replica keeps
the embedding, the final norm and the head, and its engine's block accounting; its
`PipelineRunner` (a drop-in for the engine's ModelRunner) splits each step's rows into
micro-batches and sends every micro-batch down the chain of stages at once, so while stage 1
works on micro-batch 0, stage 0 already works on micro-batch 1:

    replica: embed(mb)  ->  stage 0: layers [0, a)  ->  stage 1: layers [a, L)  ->  replica: norm, head
             hidden (b, T, H) and the rows' block tables travel as Ray object references

Ray starts the stages in one placement group (SPREAD: on different nodes) and restarts a dead
one; the engine's repair hook waits for it, and the running requests recompute their caches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
import torch

from moray.actors.engine.block_cache import BlockPool, PagedCacheView
from moray.actors.engine.engine import Batch
from moray.actors.group import start_group, stop_group, wait_alive
from moray.model.config import ModelConfig
from moray.model.moe import RouterStats
from moray.model.transformer import Transformer, attention_inputs

REPAIR_TIMEOUT_S = 120.0


@dataclass
class StageInput:
    """One micro-batch's hidden states and where its rows' cache entries are."""

    hidden: torch.Tensor  # (b, T, H)
    mask: torch.Tensor | None  # (b, T) 1 real / 0 pad
    block_tables: list[list[int]]
    starts: list[int]
    expert_tokens: dict[int, torch.Tensor]  # layer -> (E,) tokens routed, from the stages so far


@ray.remote
class PipelineStage:
    """Layers [first, stop) of a model and their part of the latent cache."""

    def __init__(
        self, model: str, first: int, stop: int, num_blocks: int, block_size: int, threads: int = 1,
        dtype: str = "float32", tracking: str | None = None,
    ):  # fmt: skip
        from moray.jobs.serve.loading import resolve_model
        from moray.model.hf import load_pretrained

        torch.set_num_threads(max(1, threads))
        path = resolve_model(model, tracking)  # a registered model: downloaded on this node
        self.layers = range(first, stop)
        whole = load_pretrained(path, dtype=getattr(torch, dtype), layers=self.layers, ends=False)
        self.config: ModelConfig = whole.config
        self.rotary, self.needs_mask = whole.rotary, whole._needs_mask
        self.blocks = [whole.layers[i] for i in self.layers]  # the rest stays on the meta device
        self.pool = BlockPool(self.config, num_blocks, block_size, getattr(torch, dtype), layers=self.layers)
        self.busy_s = 0.0

    @torch.inference_mode()
    def forward(self, inp: StageInput) -> StageInput:
        t = time.perf_counter()
        x = inp.hidden
        view = PagedCacheView(self.pool, inp.block_tables, inp.starts)
        attn, token_mask, _ = attention_inputs(self.rotary, self.needs_mask, x.shape[:2], x.device, inp.mask,
                                               None, view)  # fmt: skip
        expert_tokens = dict(inp.expert_tokens)
        for block in self.blocks:
            x = block(x, attn, token_mask)
            stats = getattr(block.mlp, "last_stats", None)
            if stats is not None:
                expert_tokens[block.self_attn.layer_idx] = stats.tokens_per_expert
        self.busy_s += time.perf_counter() - t
        return StageInput(x, inp.mask, inp.block_tables, inp.starts, expert_tokens)

    def ping(self) -> tuple[int, int]:
        return self.layers.start, self.layers.stop

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict:
        return {"busy_s": self.busy_s, "layers": [self.layers.start, self.layers.stop]}


def stage_layers(config: ModelConfig, num_stages: int) -> list[range]:
    """Contiguous layer ranges, balanced by their FLOPs as training's pipeline splits them."""
    from moray.platform.pipeline_parallel import stage_ranges

    if not 1 <= num_stages <= config.num_hidden_layers:
        raise ValueError(f"{num_stages} pipeline stages: the model has {config.num_hidden_layers} layers, "
                         "and each stage needs one or more")  # fmt: skip
    return stage_ranges(config, num_stages, seq_len=512)


def start_pipeline_stages(
    model: str, config: ModelConfig, num_stages: int, num_blocks: int, block_size: int, cpus: float = 1.0,
    threads: int = 1, dtype: str = "float32", strategy: str = "PACK", tracking: str | None = None,
):  # fmt: skip
    """The stages of one replica, in one placement group: (stages, group)."""
    args = [(model, r.start, r.stop, num_blocks, block_size, threads, dtype, tracking)
            for r in stage_layers(config, num_stages)]  # fmt: skip
    return start_group(PipelineStage, args, cpus, strategy)


class PipelineRunner:
    """The engine's runner when the layers live in PipelineStage actors: the engine's own pool
    stores no cache entries (the stages do), it only hands out the block ids."""

    cache_layers = range(0)

    def __init__(self, model: Transformer, stages: list, group=None, microbatches: int = 0):
        """`model` holds the embedding, final norm and head (load_pretrained(layers=())).
        microbatches: how many pieces a step's rows go down the stages in (0: one per stage)."""
        self.model, self.config = model.eval(), model.config
        self.stages, self.group = stages, group
        self.microbatches = microbatches or len(stages)

    @torch.inference_mode()
    def forward(self, pool: BlockPool, works) -> tuple[torch.Tensor, dict]:
        """Logits (B, V) of each row's last new token, and the tokens each expert got per layer."""
        n = max(1, min(self.microbatches, len(works)))
        size = -(-len(works) // n)
        pieces = [works[i : i + size] for i in range(0, len(works), size)]
        batches, in_flight = [], []
        for piece in pieces:  # every micro-batch enters the pipeline before any result is awaited
            b = Batch.of(piece)
            batches.append(b)
            ref = StageInput(self.model.embed_tokens(b.ids), b.mask, b.block_tables, b.starts, {})
            for stage in self.stages:
                ref = stage.forward.remote(ref)
            in_flight.append(ref)
        logits, expert_tokens = [], {}
        for b, out in zip(batches, ray.get(in_flight)):
            x = self.model.norm(out.hidden[:, -b.keep :])
            logits.append(b.last_logits(self.model.lm_head(x)))
            for layer, tokens in out.expert_tokens.items():
                expert_tokens[layer] = expert_tokens.get(layer, 0) + tokens
        stats = {layer: RouterStats(t, 0, int(t.sum()), None) for layer, t in expert_tokens.items()}
        return torch.cat(logits), stats

    def repair(self, error: BaseException) -> bool:
        """The engine's repair hook: a stage died (Ray restarts it, its weights load again): wait
        until every stage answers. False for any other error; raises if one does not come back."""
        from ray.exceptions import RayActorError

        if not isinstance(error, RayActorError):
            return False
        deadline = time.monotonic() + REPAIR_TIMEOUT_S
        for stage in self.stages:
            if not wait_alive(stage, deadline):
                raise RuntimeError(f"a pipeline stage did not come back within {REPAIR_TIMEOUT_S:.0f} s")
        return True

    def close(self) -> None:
        if self.group is not None:
            stop_group(self.stages, self.group)
            self.group = None
