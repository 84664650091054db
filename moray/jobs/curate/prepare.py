"""The prepare stage: read (one Ray task per file) -> normalize -> quarantine bad records ->
language id -> quality filters. One row per input record (rows.ROW_SCHEMA)."""

from __future__ import annotations

import pandas as pd

from moray.jobs.curate import langid, quality
from moray.jobs.curate.normalize import NormalizeConfig, normalize_row
from moray.jobs.curate.readers import SourceConfig, discover, read_task
from moray.jobs.curate.rows import COLUMNS, ROW_SCHEMA


def discover_all(sources: list[SourceConfig]) -> tuple[list[dict], list[dict]]:
    """Every source's read tasks (one per file) and the files not read, with the reason. A file
    two sources reach (a folder and a file in it) is read once, by the first."""
    tasks: list[dict] = []
    skipped: list[dict] = []
    read_at: dict[str, str] = {}
    for src in sources:
        t, s = discover(src)
        skipped += s
        for task in t:
            if task["real_path"] in read_at:
                skipped.append(
                    {
                        "path": task["path"],
                        "reason": "same file as one read",
                        "read_as": read_at[task["real_path"]],
                    }
                )
                continue
            read_at[task["real_path"]] = task["path"]
            tasks.append(task)
    return tasks, skipped


def prepare_batch(df: pd.DataFrame, normalize: NormalizeConfig, lang: langid.LangIdConfig,
                  filters: quality.QualityConfig) -> pd.DataFrame:  # fmt: skip
    """map_batches body: reader rows -> stage rows with their first outcome."""
    rows = []
    for row in df.to_dict("records"):
        row.update(lang_pred="", lang_score=0.0, outcome="kept", reason="", stage="", ppl=float("nan"), bucket="",
                   dup_of="", copies=0)  # fmt: skip
        if row["error"]:
            row.update(outcome="quarantined", reason=row["error"], stage="read")
        else:
            row = normalize_row(row, normalize)
            if row["error"]:
                row.update(outcome="quarantined", reason=row["error"], stage="normalize")
        if row["outcome"] == "kept":
            row["raw"] = b""  # raw bytes are only kept for quarantine
            if lang.enabled:
                row["lang_pred"], row["lang_score"] = langid.predict(row["text"], lang)
                reason = langid.check(row["domain"], row["lang_pred"], row["lang_score"], lang)
                if reason:
                    row.update(outcome="filtered", reason=reason, stage="langid")
        if row["outcome"] == "kept":
            reason, text = quality.apply_filters(row["text"], row["domain"], filters)
            row["text"] = text
            if reason:
                row.update(outcome="filtered", reason=reason, stage="quality")
        row["n_chars"] = len(row["text"])
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def stage(tasks: list[dict], normalize: NormalizeConfig, lang: langid.LangIdConfig,
          filters: quality.QualityConfig):  # fmt: skip
    """Read tasks -> a Ray Dataset of stage rows (empty, with the row schema, when there is no file)."""
    import ray.data

    if not tasks:
        return ray.data.from_arrow(ROW_SCHEMA.empty_table())
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).flat_map(read_task)
    return ds.map_batches(prepare_batch, fn_kwargs={"normalize": normalize, "lang": lang, "filters": filters},
                          batch_format="pandas", batch_size=256)  # fmt: skip
