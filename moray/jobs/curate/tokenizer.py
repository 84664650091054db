"""Byte-level BPE tokenizer trained with HF `tokenizers` on the mixed corpus, saved as tokenizer.json.

Byte-level means every string encodes (no unknown token). The special tokens are the data
contract's (`moray.platform.data_contract.SPECIAL_TOKENS`), given to the trainer first and in
their order, so their ids are fixed: <|bos|>=0, <|eos|>=1, <|pad|>=2.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moray.platform.data_contract import SPECIAL_TOKENS


@dataclass
class TokenizerConfig:
    vocab_size: int = 16384
    min_frequency: int = 2
    train_chars: int = 20_000_000  # a seeded sample of the mix this large trains the merges
    max_doc_chars: int = 100_000  # long books contribute their first pages, not all the merges
    seed: int = 1  # of that sample

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={self.vocab_size}: byte-level BPE needs at least 259")


def train(texts: Iterable[str], cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t[: cfg.max_doc_chars] for t in texts), trainer)
    return tok


def sample_texts(ds, cfg: TokenizerConfig) -> list[str]:
    """A seeded sample of the documents in the mix, up to `train_chars` (each counted up to
    `max_doc_chars`), in uid order: the merges depend on the order, so it is fixed."""
    from moray.jobs.curate.rows import columns, sample_key

    meta = columns(ds, ["uid", "outcome", "n_chars", "copies"])
    meta = meta[(meta["outcome"] == "kept") & (meta["copies"] > 0)].copy()
    meta["h"] = [sample_key(u, cfg.seed) for u in meta["uid"]]
    meta = meta.sort_values("h")
    chosen = set(meta["uid"][np.cumsum(meta["n_chars"].clip(upper=cfg.max_doc_chars)) <= cfg.train_chars])
    chosen |= set(meta["uid"].iloc[:1])  # one document at least, however long
    if not chosen:
        return []
    texts = ds.filter(lambda r: r["uid"] in chosen).select_columns(["uid", "text"]).to_pandas()
    return texts.sort_values("uid")["text"].tolist()


def stage(ds, cfg: TokenizerConfig, path: Path) -> tuple[dict, list[Path]]:
    """Train on a sample of the mix and save to `path`. Returns (report data, [path])."""
    texts = sample_texts(ds, cfg)
    tok = train(texts, cfg)
    tok.save(str(path))
    return {"documents": len(texts), "chars": sum(min(len(t), cfg.max_doc_chars) for t in texts),
            "vocab_size": tok.get_vocab_size()}, [path]  # fmt: skip
