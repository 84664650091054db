"""Offline tiny model + tokenizer for the engine and serving tests: a byte-level BPE trained on a
corpus text with `tokenizers` (the data contract's special tokens, as curation trains them), and a
random tiny model exported as a complete HF directory whose config carries that tokenizer's ids."""

from __future__ import annotations

from pathlib import Path

import torch

from moray.platform.data_contract import SPECIAL_TOKENS, special_tokens_of

CORPUS = Path("/work/shared/data/corpus/books/tinyshakespeare.txt")
FALLBACK = "To be, or not to be, that is the question. " * 200


def train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = CORPUS.read_text()[:200_000] if CORPUS.is_file() else FALLBACK
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # the contract's order, as curation trains them: <|bos|>=0, <|eos|>=1, <|pad|>=2, which
        # differs from the tiny preset's bos=1, eos=2, pad=0 (so a preset id used by mistake shows)
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines()
    tok.train_from_iterator([" ".join(lines[i : i + 8]) for i in range(0, len(lines), 8)], trainer)
    return tok


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A complete export (config, weights, tokenizer files, generation config) under `path`."""
    from moray.model import Transformer, preset, save_pretrained

    tok = train_tokenizer()
    path.mkdir(parents=True, exist_ok=True)
    tok_file = path / "tokenizer.json"
    tok.save(str(tok_file))
    config = preset("tiny").replace(vocab_size=tok.get_vocab_size(), **special_tokens_of(tok).model_fields())
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    save_pretrained(model, path, tokenizer=tok_file)
    return path
