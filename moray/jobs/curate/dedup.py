"""The dedup stage: exact (normalized text) -> code (normalized Python) -> MinHash-LSH near
duplicates. Every key of every kind is computed in one pass over the text and grouped in one
shuffle; the cascade is resolved on the driver over each key's members, in order, so each step
sees only the documents no earlier step marked duplicate."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moray.jobs.curate import code_norm, dedup_exact, minhash
from moray.jobs.curate.rows import columns, kept

STEPS = (("exact_duplicate", "e"), ("code_normalized_duplicate", "c"), ("near_duplicate", "n"))


def dedup_keys(df: pd.DataFrame, exact: dedup_exact.ExactDedupConfig, code: code_norm.CodeNormConfig,
               near: minhash.MinHashConfig, kinds: list[str]) -> pd.DataFrame:  # fmt: skip
    """map_batches body: kept rows -> one (key, uid) row per dedup key, prefixed by kind: `e` the
    exact key, `c` the normalized-code key (code domain, Python), `n` one MinHash-LSH band key per band."""
    keys: list[str] = []
    uids: list[str] = []
    if "e" in kinds:
        keys += ["e" + dedup_exact.exact_key(t, exact.lowercase) for t in df["text"]]
        uids += df["uid"].tolist()
    if "c" in kinds:
        for uid, text, domain, lang in zip(df["uid"], df["text"], df["domain"], df["lang"]):
            k = code_norm.code_key(text, lang, code) if domain == "code" else None
            if k is not None:
                keys.append("c" + k)
                uids.append(uid)
    if "n" in kinds:
        keys += [f"n{k:x}" for k in minhash.texts_band_keys(df["text"].tolist(), near).ravel().tolist()]
        uids += np.repeat(df["uid"].to_numpy(dtype=object), near.num_bands).tolist()
    return pd.DataFrame({"key": keys, "uid": uids}, columns=["key", "uid"])


def stage(ds, exact: dedup_exact.ExactDedupConfig, code: code_norm.CodeNormConfig, near: minhash.MinHashConfig,
          num_blocks: int):  # fmt: skip
    cur = ds.materialize()  # read once: every step below reads these blocks
    meta = columns(cur, ["uid", "doc_id", "n_chars", "outcome"])
    sizes = dict(zip(meta["uid"], meta["n_chars"]))
    doc_ids = dict(zip(meta["uid"], meta["doc_id"]))
    enabled = {"e": exact.enabled, "c": code.enabled, "n": near.enabled}
    steps = [(reason, kind) for reason, kind in STEPS if enabled[kind]]
    groups: dict[str, list[list[str]]] = {kind: [] for _, kind in steps}
    if steps and (meta["outcome"] == "kept").any():  # every key of every kind in one pass and one shuffle
        keyed = cur.map_batches(kept, batch_format="pandas").map_batches(
            dedup_keys, fn_kwargs={"exact": exact, "code": code, "near": near, "kinds": [k for _, k in steps]},
            batch_format="pandas",
        )  # fmt: skip
        for key, members in dedup_exact.groups_by_key(keyed, num_blocks).items():
            groups[key[0]].append(members)
    dups: dict[str, tuple[str, str]] = {}
    clusters_info = []
    for reason, kind in steps:
        # in order, each step sees only the documents no earlier step marked duplicate
        edges = []
        for members in groups[kind]:
            live = [u for u in members if u not in dups]
            edges += [(live[0], u) for u in live[1:]]
        new = dedup_exact.clusters(edges, sizes)
        dups.update({u: (s, reason) for u, s in new.items()})
        clusters_info += dedup_exact.cluster_summary(new, reason, doc_ids)
    clusters_info.sort(key=lambda c: -c["size"])
    out = cur.map_batches(dedup_exact.mark_duplicates, fn_kwargs={"dups": dups, "stage": "dedup"},
                          batch_format="pandas")  # fmt: skip
    return out, {"largest_clusters": clusters_info[:20]}
