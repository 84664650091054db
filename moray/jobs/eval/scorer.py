"""Answers evaluation requests with moray's own model: one per process, a Ray actor in the job.

Requests arrive as tokens (the job tokenizes by lm-eval's rules, `requests.py`):
- log-likelihoods: inputs padded into batches of about `max_batch_tokens`, longest first, and
  inputs that are the same (MMLU's four answers to one question) run once;
- generations: the continuous-batching engine over the latent cache, stopping at the stop strings.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moray.actors.engine.block_cache import BlockPool
from moray.actors.engine.engine import Engine, EngineConfig
from moray.actors.engine.scheduler import RequestParams
from moray.actors.engine.tokenizer import Tokenizer
from moray.model import load_pretrained
from moray.model.cache import LatentCache

MIN_SHARED_PREFIX = 128  # tokens; a shorter shared start is not worth a separate prefill


def shared_prefixes(inputs: list[tuple], needed_from: dict[tuple, int], min_len: int):
    """(prefix, inputs) groups: inputs (sorted, so those with a common start are neighbours) whose
    common first tokens, at least min_len of them, are computed once. A prefix ends before the first
    position whose logits an input needs, and leaves each input at least one token of its own.
    Inputs that share no such prefix come last, in one group with the empty prefix."""
    groups, alone = [], []
    run: list[tuple] = []
    common = 0
    for inp in [*inputs, None]:  # None: the end, closes the last run
        n = common_length(run[-1], inp) if run and inp is not None else 0
        if run and n >= min_len:
            run.append(inp)
            common = min(common, n)
            continue
        if run:
            cut = min([common] + [min(needed_from[i], len(i) - 1) for i in run])
            if len(run) > 1 and cut >= min_len:
                groups.append((run[0][:cut], run))
            else:
                alone += run
        run, common = ([inp], len(inp)) if inp is not None else ([], 0)
    return groups + ([((), alone)] if alone else [])


def common_length(a: tuple, b: tuple) -> int:
    """How many first tokens a and b share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Scorer:
    def __init__(self, model_dir: str | Path, threads: int | None = None, max_batch_tokens: int = 8192):
        self.threads = threads
        self._use_threads()
        self.model = load_pretrained(Path(model_dir), dtype=torch.float32).eval()
        self.tokenizer = Tokenizer.from_dir(model_dir, eos_token_id=self.model.config.eos_token_id)
        self.max_length = self.model.config.max_position_embeddings
        self.max_batch_tokens = max_batch_tokens

    def _use_threads(self) -> None:
        """OpenMP's thread count belongs to the OS thread, and a new one starts from OMP_NUM_THREADS
        (Ray sets it to the actor's num_cpus): set it in whichever thread calls, every call."""
        if self.threads:
            torch.set_num_threads(self.threads)

    @torch.inference_mode()
    def loglikelihood(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context, continuation) tokens: (sum of the continuation's log-probabilities,
        whether each of its tokens is the argmax). Inputs longer than the context keep their last
        max_length tokens, as lm-eval does."""
        self._use_threads()
        inputs = [tuple((ctx + cont)[-(self.max_length + 1) :][:-1]) for ctx, cont in items]
        users: dict[tuple, list[int]] = {}  # one forward per distinct input
        for i, inp in enumerate(inputs):
            users.setdefault(inp, []).append(i)
        # the first position of an input whose logits a continuation needs
        needed_from = {inp: len(inp) - max(len(items[i][1]) for i in idx) for inp, idx in users.items()}
        out: list[tuple[float, bool]] = [(0.0, True)] * len(items)
        for prefix, group in shared_prefixes(sorted(users), needed_from, MIN_SHARED_PREFIX):
            latents = self._prefill(prefix) if prefix else None
            batch: list[tuple] = []
            for inp in sorted(group, key=len, reverse=True):  # longest first: padding stays small
                longest, own = len(batch[0]) - len(prefix) if batch else 0, len(inp) - len(prefix)
                # a new batch when this one is full, or when padding to its longest would waste a
                # quarter of this input's row (MMLU's questions run from 30 to 400 tokens)
                if batch and ((len(batch) + 1) * longest > self.max_batch_tokens or own < 0.75 * longest):
                    self._score_batch(batch, len(prefix), latents, users, items, out)
                    batch = []
                batch.append(inp)
            self._score_batch(batch, len(prefix), latents, users, items, out)
        return out

    def _prefill(self, prefix: tuple) -> list[torch.Tensor]:
        """The latents (one (P, c + r) per layer) of a prefix that several inputs share (MMLU's
        description and shots), computed once for all of them."""
        cache = LatentCache(self.model.config, 1, len(prefix))
        self.model(torch.tensor([prefix]), cache=cache, absorb=False, num_logits_to_keep=1)
        return [layer[0] for layer in cache.layers]

    def _score_batch(self, batch, P: int, latents, users, items, out) -> None:
        """One forward over the inputs' tokens after their shared first P (whose latents are given),
        right-padded to the longest."""
        B, T = len(batch), len(batch[0]) - P
        ids = torch.zeros(B, T, dtype=torch.long)
        for r, inp in enumerate(batch):
            ids[r, : len(inp) - P] = torch.tensor(inp[P:])
        cache = None
        if latents is not None:
            cache = LatentCache(self.model.config, B, P + T)
            for mine, shared in zip(cache.layers, latents):
                mine[:, :P] = shared
            cache.lengths.fill_(P)
        # logits only for positions some continuation needs: the last `keep` of the padded rows
        keep = max(len(batch[0]) - len(inp) + max(len(items[i][1]) for i in users[inp]) for inp in batch)
        # No padding mask: the pads sit after each row's tokens, which causal attention never lets see
        # them, and inference routing is dropless, so a pad changes no real token's result. The
        # expanded attention form: the absorbed one (for decoding) is slower at prompt lengths.
        logits = self.model(ids, cache=cache, absorb=False, num_logits_to_keep=keep).logits  # (B, keep, V)
        for r, inp in enumerate(batch):
            end = keep - (len(batch[0]) - len(inp))  # one past the row's last real position, in logits' index
            for i in users[inp]:
                cont = torch.tensor(items[i][1])
                logp = logits[r, end - len(cont) : end].float().log_softmax(-1)  # (c, V)
                ll = logp.gather(-1, cont[:, None]).sum().item()
                out[i] = (ll, bool((logp.argmax(-1) == cont).all()))

    def generate(self, items: list[tuple[list[int], dict]], max_num_seqs: int = 32) -> list[list[str]]:
        """For each (prompt tokens, {until, max_tokens, n, temperature, seed}): its n completions,
        each cut before the first stop string. All run together in one engine (continuous batching)."""
        self._use_threads()
        n_rows = sum(kw.get("n", 1) for _, kw in items)
        tokens = max(self.max_length, min(n_rows, max_num_seqs) * self.max_length)  # all running at once
        block = 16
        engine = Engine(
            self.model,
            self.tokenizer,
            EngineConfig(
                kv_cache_bytes=(tokens // block + 1) * BlockPool.bytes_per_block(self.model.config, block),
                block_size=block,
                max_num_seqs=max_num_seqs,
                max_waiting=n_rows,
                # Offline, throughput is all: prompts prefill in large steps (the serving defaults keep
                # steps short so that running requests' next tokens are not held up).
                max_num_batched_tokens=self.max_batch_tokens,
                prefill_chunk=self.max_batch_tokens,
            ),
        )
        reqs = []
        for prompt, kw in items:
            for j in range(kw.get("n", 1)):
                seed = None if kw.get("seed") is None else kw["seed"] + j
                params = RequestParams(
                    max_tokens=kw["max_tokens"],
                    temperature=kw.get("temperature", 0.0),
                    seed=seed,
                    stop=tuple(kw.get("until", ())),
                )
                reqs.append(engine.add_request(prompt, params))
        while engine.has_work():
            engine.step()
        texts = iter(r.detok.text for r in reqs)
        return [[next(texts) for _ in range(kw.get("n", 1))] for _, kw in items]
