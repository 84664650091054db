"""Domain mixing to target token shares by seeded up- and down-sampling of whole documents.

Targets are renormalized over the domains present. The token budget is the largest one every
domain can meet without repeating a document more than `max_upsample` times (or `total_tokens`
when set, in which case the cap may bind and the achieved mix shows it). A domain at ratio
r = target / available is laid out ceil(r) times in random orders (seeded by `pack.seed`) and packing keeps
r / ceil(r) of its windows (pack.pack): sampling at sequence granularity meets the mix even when
one document is a whole book. The plan is made twice: on estimates (bytes / 4) before the
tokenizer exists, and on real token counts when packing; the manifest reports the achieved mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_TARGETS = {
    "web": 0.45,
    "academic": 0.15,
    "code": 0.20,
    "books": 0.10,
    "multilingual": 0.08,
    "docs": 0.02,
}


@dataclass
class MixConfig:
    enabled: bool = True
    targets: dict = field(default_factory=lambda: dict(DEFAULT_TARGETS))
    max_upsample: float = 4.0
    total_tokens: int | None = None
    bytes_per_token: float = 4.0

    def __post_init__(self):
        bad = {k: v for k, v in self.targets.items() if not isinstance(v, int | float) or v < 0}
        if bad or not self.targets or sum(self.targets.values()) <= 0:
            raise ValueError(f"targets={self.targets}: non-negative shares with a positive sum")
        if self.max_upsample < 1:
            raise ValueError(f"max_upsample={self.max_upsample}: must be >= 1")


def plan(available: dict[str, float], cfg: MixConfig) -> dict[str, dict]:
    """Per domain: available and target tokens and the sampling ratio."""
    present = {d: a for d, a in available.items() if a > 0 and cfg.targets.get(d, 0) > 0}
    norm = sum(cfg.targets[d] for d in present) or 1.0
    shares = {d: cfg.targets[d] / norm for d in present}
    if cfg.total_tokens:
        budget = float(cfg.total_tokens)
    else:
        budget = min([sum(present.values())] + [present[d] * cfg.max_upsample / shares[d] for d in present])
    out = {}
    for d, a in available.items():
        target = budget * shares.get(d, 0.0)
        ratio = min(target / a, cfg.max_upsample) if a > 0 else 0.0
        out[d] = {"available": a, "target_share": shares.get(d, 0.0), "target_tokens": target, "ratio": ratio}
    return out


def copies(docs: list[tuple[str, str, float]], cfg: MixConfig) -> tuple[dict[str, int], dict[str, dict]]:
    """[(uid, domain, est_tokens)] -> ({uid: passes}, plan): every document of a domain with ratio r is
    laid out ceil(r) times; packing then keeps r / ceil(r) of the windows (pack.pack)."""
    available: dict[str, float] = {}
    for _, d, t in docs:
        available[d] = available.get(d, 0.0) + t
    p = plan(available, cfg)
    return {uid: math.ceil(p[d]["ratio"]) for uid, d, _ in docs}, p


# -- the stage (Ray Data) -------------------------------------------------------------------------


def apply_copies(df, copies: dict[str, int]):
    """map_batches body: each row's number of mix passes (0: not in the mix)."""
    df["copies"] = [copies.get(u, 0) for u in df["uid"]]
    return df


def stage(ds, cfg: MixConfig):
    """Rows -> rows with `copies` set from the plan made on estimated tokens (characters / bytes_per_token)."""
    from moray.jobs.curate.rows import columns, kept

    meta = kept(columns(ds, ["uid", "domain", "outcome", "n_chars"]))
    docs = [(u, d, n / cfg.bytes_per_token) for u, d, n in zip(meta["uid"], meta["domain"], meta["n_chars"])]
    passes, mix_plan = copies(docs, cfg) if cfg.enabled else ({u: 1 for u, _, _ in docs}, {})
    return ds.map_batches(apply_copies, fn_kwargs={"copies": passes}, batch_format="pandas"), {
        "plan": mix_plan
    }
