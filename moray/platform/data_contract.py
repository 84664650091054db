"""The data contract between curation and everything after it: one module, written by curation,
read by pre-training, serving and evaluation.

A curation output directory holds:

    manifest.json          this module's `Manifest` (format_version, seq_len, vocab_size,
                           special_tokens, splits with shard checksums, plus curation's report data)
    tokenizer.json         HF `tokenizers` file; its special tokens have the manifest's ids
    train/*.parquet        packed sequences: TOKENS_COLUMN list<int32> of seq_len + 1 ids
    val/*.parquet          (inputs [:-1], labels [1:]) and DOMAIN_COLUMN, one domain per row;
                           with curation's code_exec stage also EXEC_LABELS_COLUMN

The manifest's `vocab_size` and `special_tokens` are the ones the model config, the HF export
(config.json, tokenizer_config.json, generation_config.json) and the serving engine use.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moray.platform.storage import Storage

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
TOKENS_COLUMN = "input_ids"  # list<int32>, exactly seq_len + 1 ids per row
DOMAIN_COLUMN = "domain"  # string: the one domain of the row's documents
# Optional, list<int8> aligned with TOKENS_COLUMN: 1 (ran) / 0 (failed) at the closing EOS of each
# code document curation executed, -1 everywhere else. The manifest's "columns" lists it when present.
EXEC_LABELS_COLUMN = "exec_labels"
# The special tokens a curated tokenizer reserves, in id order (a trained tokenizer gets 0, 1, 2).
SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}


class ContractError(ValueError):
    """A curation output does not follow the contract; the message names the file and the field."""


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def model_fields(self) -> dict[str, int]:
        """The same ids under the model config's (HF) field names."""
        return {"bos_token_id": self.bos, "eos_token_id": self.eos, "pad_token_id": self.pad}


@dataclass
class Manifest:
    seq_len: int
    vocab_size: int
    special_tokens: SpecialTokens
    # split -> {"sequences", "tokens", "tokens_per_domain", "shards": [{path, rows, tokens, bytes, sha256}]}
    splits: dict[str, dict[str, Any]]
    # everything else curation records (counts, funnel, mix, reasons, config...): report data that
    # no later stage depends on
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    exec_labels: bool = False  # the shards carry EXEC_LABELS_COLUMN

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "seq_len": self.seq_len,
            "sequence_length_stored": self.seq_len + 1,
            "vocab_size": self.vocab_size,
            "tokenizer": TOKENIZER_FILE,
            "special_tokens": self.special_tokens.as_dict(),
            "columns": {
                TOKENS_COLUMN: "list<int32>, length seq_len + 1",
                DOMAIN_COLUMN: "string",
                **({EXEC_LABELS_COLUMN: "list<int8>, length seq_len + 1"} if self.exec_labels else {}),
            },
            "splits": self.splits,
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST_FILE) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ContractError(
                f"{where}: format_version={version!r}, this moray reads {FORMAT_VERSION} "
                "(re-run `moray curate` to rewrite the output)"
            )
        for key in ("seq_len", "vocab_size", "special_tokens", "splits"):
            if key not in d:
                raise ContractError(f"{where}: lacks {key!r}")
        for key in ("seq_len", "vocab_size"):
            if not isinstance(d[key], int) or d[key] <= 0:
                raise ContractError(f"{where}: {key}={d[key]!r} must be a positive integer")
        st = d["special_tokens"]
        missing = [
            k for k in SPECIAL_TOKENS if not isinstance(st.get(k) if isinstance(st, dict) else None, int)
        ]
        if missing:
            raise ContractError(f"{where}: special_tokens lacks integer ids for {missing}")
        special = SpecialTokens(**{k: st[k] for k in SPECIAL_TOKENS})
        bad = {k: v for k, v in special.as_dict().items() if not 0 <= v < d["vocab_size"]}
        if bad:
            raise ContractError(f"{where}: special_tokens {bad} lie outside vocab_size={d['vocab_size']}")
        known = {"format_version", "seq_len", "sequence_length_stored", "vocab_size", "tokenizer",
                 "special_tokens", "columns", "splits"}  # fmt: skip
        extra = {k: v for k, v in d.items() if k not in known}
        exec_labels = EXEC_LABELS_COLUMN in (d.get("columns") or {})
        return cls(d["seq_len"], d["vocab_size"], special, d["splits"], extra, version, exec_labels)


def special_tokens_of(tokenizer) -> SpecialTokens:
    """The ids of the contract's special tokens in a `tokenizers.Tokenizer`."""
    ids = {name: tokenizer.token_to_id(text) for name, text in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None]
    if missing:
        raise ContractError(f"tokenizer lacks the special tokens {missing}")
    return SpecialTokens(**ids)


def write_manifest(out: str | Path, manifest: Manifest) -> Path:
    path = Path(out) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_json(), indent=2, default=str))
    return path


def read_manifest(data_path: str | Path, check_files: bool = True) -> Manifest:
    """The manifest of a curation output (a local directory or any pyarrow filesystem URI: s3://,
    gs://, file://...), checked against its tokenizer.json (vocabulary size and special-token ids)
    and, with check_files, against its shards."""
    storage = Storage(str(data_path))
    root, path = data_path, storage.path(MANIFEST_FILE)
    if not storage.exists(path):
        raise ContractError(f"{root}: no {MANIFEST_FILE} (run `moray curate` first?)")
    try:
        data = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ContractError(f"{path}: must hold a JSON object")
    manifest = Manifest.from_json(data, str(path))
    if not storage.exists(storage.path(TOKENIZER_FILE)):
        raise ContractError(f"{root}: no {TOKENIZER_FILE}")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(storage.read_bytes(storage.path(TOKENIZER_FILE)).decode())
    if tok.get_vocab_size() != manifest.vocab_size:
        raise ContractError(
            f"{path}: vocab_size={manifest.vocab_size} but {TOKENIZER_FILE} has {tok.get_vocab_size()}"
        )
    found = special_tokens_of(tok)
    if found != manifest.special_tokens:
        raise ContractError(
            f"{path}: special_tokens {manifest.special_tokens.as_dict()} disagree with "
            f"{TOKENIZER_FILE}'s {found.as_dict()}"
        )
    if check_files:
        for split in SPLITS:
            if not shard_files(root, split):
                raise ContractError(f"{root}: no {split}/*.parquet shards")
    return manifest


def shard_files(data_path: str | Path, split: str) -> list[str]:
    """One split's Parquet shards in file order (the order the data position counts in): paths
    under a local directory, URIs under a URI."""
    storage = Storage(str(data_path))
    folder = storage.path(split)
    if not storage.exists(folder):
        return []
    names = [n for n in storage.list_files(folder) if n.endswith(".parquet")]
    return [storage.uri_of(posixpath.join(folder, n)) for n in names]


def count_rows(data_path: str | Path, split: str) -> int:
    import pyarrow.parquet as pq

    storage = Storage(str(data_path))
    total = 0
    for name in shard_files(data_path, split):
        with storage.open(name) as f:
            total += pq.read_metadata(f).num_rows
    return total


def packed_table(sequences, domains, exec_labels=None):
    """A Parquet table of packed sequences in the contract's schema. `sequences`: a list of id
    sequences, or an (N, seq_len + 1) integer array (converted without a Python loop: about 90x
    faster on a 4096-row shard). `exec_labels`: None, or the same shape of int8 labels."""
    import numpy as np
    import pyarrow as pa

    columns = [(TOKENS_COLUMN, pa.int32(), sequences), (DOMAIN_COLUMN, None, domains)]
    if exec_labels is not None:
        columns.append((EXEC_LABELS_COLUMN, pa.int8(), exec_labels))
    schema = pa.schema([(name, pa.list_(t) if t else pa.string()) for name, t, _ in columns])
    arrays = {}
    for name, t, values in columns:
        if t is None:
            arrays[name] = pa.array(list(values), pa.string())
        elif isinstance(values, np.ndarray) and values.ndim == 2:
            n, width = values.shape
            offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
            arrays[name] = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=t))
        else:
            arrays[name] = pa.array(list(values), pa.list_(t))
    return pa.table(arrays, schema=schema)
