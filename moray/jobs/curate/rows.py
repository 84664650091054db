"""The row every stage passes on: one per input record, good or bad, from `prepare` to `pack`.

Stages never drop rows; they change `outcome` (kept | filtered | duplicate | quarantined) with a
`reason` and the `stage` that decided, so the last stage's rows are the ledger.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa

ROW_SCHEMA = pa.schema([
    ("uid", pa.string()),  # FILE#INDEX: unique even where doc_ids repeat across files
    ("doc_id", pa.string()), ("source", pa.string()), ("domain", pa.string()), ("format", pa.string()),
    ("lang", pa.string()),  # the language the source labels, if any
    ("lang_pred", pa.string()), ("lang_score", pa.float64()),
    ("text", pa.string()), ("raw", pa.binary()),  # raw bytes: only for quarantined records
    ("outcome", pa.string()), ("reason", pa.string()), ("stage", pa.string()),
    ("n_chars", pa.int64()), ("ppl", pa.float64()), ("bucket", pa.string()),
    ("dup_of", pa.string()),  # the uid of the surviving copy, for duplicates
    ("copies", pa.int64()),  # times the mix lays the document out
    ("blank_lines", pa.int64()),  # blank lines of a JSON-lines file: on the file's first row
])  # fmt: skip
COLUMNS = ROW_SCHEMA.names


def kept(df: pd.DataFrame, domains: list[str] | None = None) -> pd.DataFrame:
    """map_batches body: the rows still kept (of the given domains)."""
    mask = df["outcome"] == "kept"
    if domains is not None:
        mask &= df["domain"].isin(domains)
    return df[mask]


def sample_key(uid: str, seed: int) -> float:
    """A seeded uniform number in [0, 1) per record: sorting on it gives a seeded sample that does
    not depend on the order the rows arrive in."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "little") / 2**64


def columns(ds, names: list[str]) -> pd.DataFrame:
    """These columns of a Ray Dataset on the driver, as a pandas frame that has them even when the
    dataset has no rows (Ray Data then gives a frame without columns)."""
    return ds.select_columns(names).to_pandas().reindex(columns=names)
