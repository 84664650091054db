"""Byte-level BPE tokenizer trained with HF `tokenizers` on the mixed corpus, saved as tokenizer.json.

Byte-level means every string encodes (no unknown token); the special tokens come first, so their
ids are fixed: <|bos|>=0, <|eos|>=1, <|pad|>=2.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]


@dataclass
class TokenizerConfig:
    vocab_size: int = 16384
    min_frequency: int = 2
    train_chars: int = 20_000_000  # a seeded sample of the mix this large trains the merges
    max_doc_chars: int = 100_000  # long books contribute their first pages, not all the merges

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
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t[: cfg.max_doc_chars] for t in texts), trainer)
    return tok


def special_ids(tok) -> dict[str, int]:
    return {name: tok.token_to_id(t) for name, t in zip(("bos", "eos", "pad"), SPECIAL_TOKENS)}
