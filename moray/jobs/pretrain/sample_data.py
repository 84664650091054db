"""A small packed dataset in the curation contract's format, from real text (Shakespeare in
../shared/data), for tests and benchmarks that should not wait for a curation run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAKESPEARE = (
    Path(__file__).resolve().parents[3].parent
    / "shared"
    / "data"
    / "corpus"
    / "books"
    / "tinyshakespeare.txt"
)


def write_packed_dataset(
    out: Path,
    n_train: int = 96,
    n_val: int = 16,
    seq_len: int = 32,
    vocab_size: int = 512,
    text_path: Path = SHAKESPEARE,
) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = Path(text_path).read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([text[:200_000]], trainer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    n = n_train + n_val
    ids = np.array(tok.encode(text[: max(200_000, n * (seq_len + 1) * 6)]).ids, dtype=np.int32)
    if len(ids) < n * (seq_len + 1):
        ids = np.resize(ids, n * (seq_len + 1))  # repeat the text if asked for more than it holds
    seqs = ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    for split, rows in (("train", seqs[:n_train]), ("val", seqs[n_train:])):
        (out / split).mkdir(exist_ok=True)
        half = len(rows) // 2
        for i, part in enumerate((rows[:half], rows[half:])):  # two shards per split
            table = pa.table({"input_ids": pa.array(list(part), type=pa.list_(pa.int32())),
                              "domain": pa.array(["books"] * len(part))})  # fmt: skip
            pq.write_table(table, out / split / f"{split}-{i:05d}.parquet")
    manifest = {"seq_len": seq_len, "vocab_size": tok.get_vocab_size(),
                "counts": {"train_sequences": n_train, "val_sequences": n_val}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
