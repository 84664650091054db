"""Exact deduplication on normalized text, and the machinery every dedup stage shares.

Shared machinery: rows `(key, uid, size)` are hash-partitioned by key over Ray Data (equal keys
meet in one block), each block emits edges between the members of each key group, and the driver
joins the edges into clusters (union-find). One survivor per cluster, chosen deterministically:
the largest document (`size`, characters), ties broken by the smallest uid. Every other member is
a duplicate *of the survivor*.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


@dataclass
class ExactDedupConfig:
    enabled: bool = True
    lowercase: bool = True  # compare on lowercase text with punctuation and whitespace collapsed


def exact_key(text: str, lowercase: bool = True) -> str:
    t = text.lower() if lowercase else text
    t = _NON_WORD.sub(" ", t).strip()
    return hashlib.blake2b(t.encode("utf-8"), digest_size=12).hexdigest()


def _group_edges(batch):
    """One block of (key, uid) rows, all rows of a key in this block -> star edges (key, a, b) from
    the smallest uid of each key to the others."""
    import pandas as pd

    df = pd.DataFrame(batch)
    if df.empty:
        return {
            "key": np.array([], dtype=object),
            "a": np.array([], dtype=object),
            "b": np.array([], dtype=object),
        }
    df = df.sort_values(["key", "uid"])
    first = df.groupby("key", sort=False)["uid"].transform("first")
    mask = first != df["uid"]
    return {"key": df["key"][mask].to_numpy(), "a": first[mask].to_numpy(dtype=object),
            "b": df["uid"][mask].to_numpy(dtype=object)}  # fmt: skip


def _star_edges(ds, num_blocks: int):
    ds = ds.select_columns(["key", "uid"]).repartition(num_blocks, keys=["key"])
    return ds.map_batches(_group_edges, batch_size=None, batch_format="pandas").iter_rows()


def edges_by_key(ds, num_blocks: int = 8) -> list[tuple[str, str]]:
    """Ray Data: rows with `key` and `uid` -> pairs of uids that share a key."""
    return [(r["a"], r["b"]) for r in _star_edges(ds, num_blocks)]


def groups_by_key(ds, num_blocks: int = 8) -> dict:
    """Ray Data: rows with `key` and `uid` -> {key: its uids, sorted} for every key held by 2 or more."""
    groups: dict = {}
    for r in _star_edges(ds, num_blocks):
        groups.setdefault(r["key"], [r["a"]]).append(r["b"])
    return groups


class UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def clusters(edges, sizes: dict[str, int]) -> dict[str, str]:
    """Edges -> {duplicate uid: survivor uid} (survivor: largest, then smallest uid)."""
    uf = UnionFind()
    nodes = set()
    for a, b in edges:
        uf.union(a, b)
        nodes.update((a, b))
    groups: dict[str, list[str]] = {}
    for x in sorted(nodes):
        groups.setdefault(uf.find(x), []).append(x)
    dup_of = {}
    for members in groups.values():
        survivor = min(members, key=lambda u: (-sizes.get(u, 0), u))
        for m in members:
            if m != survivor:
                dup_of[m] = survivor
    return dup_of


def mark_duplicates(df, dups: dict[str, tuple[str, str]], stage: str):
    """map_batches body: {uid: (survivor uid, reason)} -> those kept rows become duplicates."""
    for i, uid in enumerate(df["uid"]):
        if uid in dups and df.at[i, "outcome"] == "kept":
            survivor, reason = dups[uid]
            df.at[i, "outcome"], df.at[i, "reason"], df.at[i, "stage"], df.at[i, "dup_of"] = (
                "duplicate", reason, stage, survivor,
            )  # fmt: skip
    return df


def cluster_summary(dup_of: dict[str, str], reason: str, doc_ids: dict[str, str]) -> list[dict]:
    """The report's view of clusters: survivor, size and a few members, by doc_id, largest first."""
    groups: dict[str, list[str]] = {}
    for dup, survivor in dup_of.items():
        groups.setdefault(survivor, []).append(dup)
    out = [{"survivor": doc_ids.get(s, s), "size": len(m) + 1, "reason": reason,
            "members": [doc_ids.get(x, x) for x in sorted(m)[:5]]} for s, m in groups.items()]  # fmt: skip
    return sorted(out, key=lambda c: (-c["size"], c["survivor"]))
