"""Offline tiny model + tokenizer for the engine and serving tests: a byte-level BPE trained on a
corpus text with `tokenizers`, and a random tiny model saved as an HF directory."""

from __future__ import annotations

from pathlib import Path

import torch

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
        special_tokens=["<pad>", "<s>", "</s>"],  # ids 0, 1, 2: the tiny preset's pad/bos/eos
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines()
    tok.train_from_iterator([" ".join(lines[i : i + 8]) for i in range(0, len(lines), 8)], trainer)
    return tok


def make_model_dir(path: Path, seed: int = 0) -> Path:
    from moray.model import Transformer, preset, save_pretrained

    torch.manual_seed(seed)
    model = Transformer(preset("tiny")).eval()
    save_pretrained(model, path)
    train_tokenizer().save(str(path / "tokenizer.json"))
    return path
