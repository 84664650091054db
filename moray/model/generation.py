"""Batched generation over the MLA latent cache.

Prompts of different lengths are right-padded into one prefill; each row then decodes at its own
position (the cache tracks a length per row), one token per step with the absorbed attention.
"""

from __future__ import annotations

import torch

from moray.model.cache import LatentCache
from moray.model.sampling import SamplingParams, sample
from moray.model.transformer import Transformer


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]] | torch.Tensor,
    params: SamplingParams | None = None,
    **kwargs,
) -> list[list[int]]:
    """Generate for each prompt; returns the new tokens of each (stop token included, if hit)."""
    params = params or SamplingParams(**kwargs)
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    B, lengths = len(prompts), torch.tensor([len(p) for p in prompts], device=device)
    T = int(lengths.max())
    limit = model.config.max_position_embeddings
    if T + params.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({params.max_new_tokens}) exceeds the context {limit}"
        )
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]

    was_training = model.training
    model.eval()
    stop = set(
        params.stop_token_ids
        or ([model.config.eos_token_id] if model.config.eos_token_id is not None else [])
    )
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = LatentCache(
        model.config, B, T + params.max_new_tokens, dtype=model.lm_head.weight.dtype, device=device
    )
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    try:
        # Logits only where a row's last real token can be: the (B, T, V) of every position would
        # cost more than the rest of the prefill at a large vocabulary.
        keep = T - int(lengths.min()) + 1
        logits = model(ids, attention_mask=mask, cache=cache, num_logits_to_keep=keep).logits  # (B, keep, V)
        logits = logits[torch.arange(B, device=device), lengths - 1 - (T - keep)]  # (B, V) last real token
        for step in range(params.max_new_tokens):
            nxt = sample(logits, params, generator)  # (B,)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in stop
            if all(done) or step == params.max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache=cache).logits[:, -1]  # (B, V)
    finally:
        model.train(was_training)
    return out
