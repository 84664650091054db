"""Perplexity filter (as in CCNet): a small proxy language model scores every document; per domain,
percentile cut-offs split documents into head / middle / tail, and the configured buckets are
dropped.

The proxy LM is a word bigram model with interpolated absolute discounting (a cheap cousin of the
Kneser-Ney 5-gram CCNet uses), trained on a seeded reference slice of the corpus. Perplexity is
about "how typical is this text of the reference", so the cut-offs are per domain: code and
multilingual text would all land in the tail of an English reference otherwise.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass
class PerplexityConfig:
    enabled: bool = True
    reference_chars: int = 3_000_000  # size of the training slice
    discount: float = 0.75
    max_chars: int = 20_000  # score a document's prefix (perplexity is a mean: a prefix is enough)
    cutoffs: list[float] = field(default_factory=lambda: [33.3, 66.7])  # percentiles head|middle|tail
    drop_buckets: list[str] = field(default_factory=list)  # e.g. [tail]
    drop_above_percentile: float = 99.0  # also drop the extreme tail per domain (garbage, tables)
    domains: list[str] = field(default_factory=lambda: ["web", "academic", "books", "docs"])
    min_docs: int = 50  # percentiles of fewer documents mean nothing: such a domain is not cut
    seed: int = 0


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass
class BigramLM:
    unigrams: dict
    bigrams: dict  # (v, w) -> count
    context: dict  # v -> (count of v as context, number of distinct followers)
    total: int
    discount: float

    @classmethod
    def train(cls, texts, discount: float = 0.75) -> BigramLM:
        uni, bi = Counter(), Counter()
        for t in texts:
            ws = ["<s>"] + tokens(t)
            uni.update(ws)
            bi.update(zip(ws, ws[1:]))
        ctx: dict = {}
        for (v, _w), c in bi.items():
            n, k = ctx.get(v, (0, 0))
            ctx[v] = (n + c, k + 1)
        return cls(dict(uni), dict(bi), ctx, sum(uni.values()), discount)

    def perplexity(self, text: str) -> float:
        ws = ["<s>"] + tokens(text)
        if len(ws) < 2:
            return float("inf")
        v_size = len(self.unigrams) + 1
        logp = 0.0
        for v, w in zip(ws, ws[1:]):
            p_uni = (self.unigrams.get(w, 0) + 1) / (self.total + v_size)  # add-one: unseen words
            n, k = self.context.get(v, (0, 0))
            if n:
                c = self.bigrams.get((v, w), 0)
                p = max(c - self.discount, 0) / n + self.discount * k / n * p_uni
            else:
                p = p_uni
            logp += math.log(p)
        return math.exp(-logp / (len(ws) - 1))


def buckets(ppl_by_domain: dict[str, list[float]], cfg: PerplexityConfig) -> dict[str, dict]:
    """Per domain: the percentile thresholds (head|middle cut, middle|tail cut, drop-above)."""
    out = {}
    for domain, values in ppl_by_domain.items():
        if len(values) < cfg.min_docs:
            continue
        arr = np.array([v for v in values if math.isfinite(v)] or [0.0])
        out[domain] = {
            "cuts": [float(np.percentile(arr, p)) for p in cfg.cutoffs],
            "drop_above": float(np.percentile(arr, cfg.drop_above_percentile)),
        }
    return out


def bucket_of(ppl: float, cuts: list[float]) -> str:
    names = ["head", "middle", "tail"]
    for name, cut in zip(names, cuts):
        if ppl <= cut:
            return name
    return names[min(len(cuts), 2)]


def check(domain: str, ppl: float, thresholds: dict, cfg: PerplexityConfig) -> tuple[str, str]:
    """(bucket, filter reason or "")."""
    if domain not in thresholds:
        return "", ""
    t = thresholds[domain]
    b = bucket_of(ppl, t["cuts"])
    if b in cfg.drop_buckets:
        return b, f"perplexity:{b}"
    if not math.isfinite(ppl) or ppl > t["drop_above"]:
        return b, f"perplexity:>p{cfg.drop_above_percentile:g}"
    return b, ""


# -- the stage (Ray Data) -------------------------------------------------------------------------


def score_batch(df, lm: BigramLM, domains: list[str], max_chars: int):
    """map_batches body: the perplexity of each kept document of the scored domains (NaN otherwise)."""
    mask = (df["outcome"] == "kept") & df["domain"].isin(domains)
    df["ppl"] = [lm.perplexity(t[:max_chars]) if m else float("nan") for t, m in zip(df["text"], mask)]
    return df


def apply_thresholds(df, thresholds: dict, cfg: PerplexityConfig):
    """map_batches body: bucket every scored document, filter the dropped buckets."""
    for i in np.flatnonzero(((df["outcome"] == "kept") & df["domain"].isin(list(thresholds))).to_numpy()):
        bucket, reason = check(df.at[i, "domain"], df.at[i, "ppl"], thresholds, cfg)
        df.at[i, "bucket"] = bucket
        if reason:
            df.at[i, "outcome"], df.at[i, "reason"], df.at[i, "stage"] = "filtered", reason, "perplexity"
    return df


def stage(ds, cfg: PerplexityConfig):
    """Rows -> rows with `ppl` and `bucket` set and the dropped buckets filtered; the proxy LM is
    trained on a seeded slice of the kept documents of `cfg.domains`."""
    from moray.jobs.curate.rows import columns, kept, sample_key

    if not cfg.enabled:
        return ds, {}
    meta = kept(columns(ds, ["uid", "domain", "outcome", "n_chars"]), cfg.domains).copy()
    meta["h"] = [sample_key(u, cfg.seed) for u in meta["uid"]]
    meta = meta.sort_values("h")
    ref = set(meta["uid"][np.cumsum(meta["n_chars"].clip(upper=cfg.max_chars)) <= cfg.reference_chars])
    if not ref and len(meta):
        ref = {meta["uid"].iloc[0]}
    if not ref:  # nothing to score: no kept document in these domains
        return ds, {"thresholds": {}, "reference_docs": 0}
    texts = [
        t[: cfg.max_chars]
        for t in ds.filter(lambda r: r["uid"] in ref).select_columns(["text"]).to_pandas()["text"]
    ]
    lm = BigramLM.train(texts, cfg.discount)
    scored = ds.map_batches(score_batch, fn_kwargs={"lm": lm, "domains": cfg.domains, "max_chars": cfg.max_chars},
                            batch_format="pandas").materialize()  # fmt: skip
    m = kept(columns(scored, ["domain", "outcome", "ppl"]), cfg.domains)
    thresholds = buckets({d: g["ppl"].tolist() for d, g in m.groupby("domain")}, cfg)
    out = scored.map_batches(
        apply_thresholds, fn_kwargs={"thresholds": thresholds, "cfg": cfg}, batch_format="pandas"
    )
    return out, {"thresholds": thresholds, "reference_docs": len(texts)}
