"""Small packed shards in the curation contract's format, made from real text (Shakespeare)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "corpus"
SEQ_LEN = 32


def write_packed_dataset(out: Path, n_train: int = 96, n_val: int = 16, vocab_size: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (SHARED / "books" / "tinyshakespeare.txt").read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([text], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = np.array(tok.encode(text).ids, dtype=np.int32)
    n = n_train + n_val
    seqs = ids[: n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1)
    for split, rows in (("train", seqs[:n_train]), ("val", seqs[n_train:])):
        (out / split).mkdir(exist_ok=True)
        half = len(rows) // 2
        for i, part in enumerate((rows[:half], rows[half:])):  # two shards per split
            table = pa.table({"tokens": pa.array(list(part), type=pa.list_(pa.int32())),
                              "domain": pa.array(["books"] * len(part))})  # fmt: skip
            pq.write_table(table, out / split / f"{split}-{i:05d}.parquet")
    manifest = {"seq_len": SEQ_LEN, "vocab_size": tok.get_vocab_size(),
                "counts": {"train_sequences": n_train, "val_sequences": n_val}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory) -> Path:
    return write_packed_dataset(tmp_path_factory.mktemp("curated"))
