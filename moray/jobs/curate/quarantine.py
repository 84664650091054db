"""The quarantine: `<out>/quarantine/quarantined.parquet`, one row per record that could not be
read or normalized, with its reason and raw bytes (an empty file when nothing was quarantined)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moray.jobs.curate.rows import columns

SCHEMA = pa.schema([("uid", pa.string()), ("doc_id", pa.string()), ("source", pa.string()),
                    ("domain", pa.string()), ("reason", pa.string()), ("raw", pa.binary())])  # fmt: skip


def stage(ds, out_dir: Path) -> tuple[dict, list[Path]]:
    d = Path(out_dir) / "quarantine"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rows = columns(ds.filter(lambda r: r["outcome"] == "quarantined"), SCHEMA.names)
    table = pa.Table.from_pandas(rows, schema=SCHEMA, preserve_index=False)
    path = d / "quarantined.parquet"
    pq.write_table(table, path)
    return {"records": table.num_rows}, [path]
