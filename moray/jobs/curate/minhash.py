"""MinHash-LSH near-deduplication (Broder 1997; as in datatrove and NeMo Curator).

Word n-gram shingles (default 5-grams of lowercased words without punctuation) are hashed to 32
bits (each word by murmur3, the n-gram by a fixed multilinear combination of its words' hashes and
a 64-bit finalizer, vectorized: no joined strings) and permuted by `num_bands * rows_per_band` universal hashes `(a*x + b) mod p`,
p = 2^61 - 1, with a, b drawn uniformly from [1, p) and [0, p) and the product reduced exactly
(Mersenne folding; no 64-bit wrap-around); the minimum per hash forms the signature. Each band of
`rows_per_band` minima hashes to a 64-bit bucket key (the same combination, with the band index);
documents sharing any bucket are candidate
duplicates. With 14 bands x 8 rows a pair is caught with probability 1 - (1 - J^8)^14: 0.92 at
Jaccard 0.8, 0.05 at 0.5.

(The first version drew a, b below 2^32: for a < 2^29, a*x + b never reaches p, so those hashes
order shingles exactly as x does and all pick the same minimum, and the others wrap only a few
times; the rows were correlated and recall fell well below that curve. tests/jobs/curate/
test_dedup.py checks the arithmetic against Python integers and the independence of the rows.)

Signatures and band keys are computed in Ray Data `map_batches`; buckets are grouped by a hash
repartition (dedup_exact.edges_by_key); clusters are connected components.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mmh3
import numpy as np

_P = (1 << 61) - 1
_MERSENNE = np.uint64(_P)
_LOW29, _LOW32 = np.uint64((1 << 29) - 1), np.uint64((1 << 32) - 1)
_S29, _S32, _S61, _ONE = np.uint64(29), np.uint64(32), np.uint64(61), np.uint64(1)
# odd multipliers of the n-gram and band combinations (fixed: keys must agree across runs and workers)
_COMBINE = np.random.default_rng(0x6D696E68).integers(1, 1 << 63, size=64, dtype=np.uint64) | _ONE
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_TOKEN = re.compile(r"\w+", re.UNICODE)


@dataclass
class MinHashConfig:
    enabled: bool = True
    ngram: int = 5
    num_bands: int = 14
    rows_per_band: int = 8
    seed: int = 1
    chunk: int = 4096  # shingles per vectorized step (bounds memory on whole books; cache-sized)

    def __post_init__(self):
        for name in ("ngram", "num_bands", "rows_per_band"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")


def _permutations(cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_bands * cfg.rows_per_band
    a = rng.integers(1, _P, size=n, dtype=np.uint64)
    b = rng.integers(0, _P, size=n, dtype=np.uint64)
    return a, b


def shingles(text: str, n: int) -> set[str]:
    ws = _TOKEN.findall(text.lower())
    if len(ws) < n:
        return {" ".join(ws)} if ws else set()
    return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every input bit reaches every output bit."""
    x ^= x >> _S30
    x *= _MIX1
    x ^= x >> _S27
    x *= _MIX2
    x ^= x >> _S31
    return x


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """A 32-bit hash of the word n-gram at every position (repeats included: the minimum does not care).

    Equal n-grams hash alike; distinct ones collide with probability ~2^-32, as a 32-bit hash of the
    joined string would. A text of fewer than n words is one shingle, its words joined."""
    ws = _TOKEN.findall(text.lower())
    if len(ws) < n:
        return np.array([mmh3.hash(" ".join(ws), signed=False)] if ws else [], dtype=np.uint64)
    words = np.fromiter((mmh3.hash64(w, signed=False)[0] for w in ws), dtype=np.uint64, count=len(ws))
    m = len(ws) - n + 1
    h = words[:m] * _COMBINE[0]
    for j in range(1, n):
        h += words[j : j + m] * _COMBINE[j]
    return _mix64(h) >> _S32


def universal_hash_min(x: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """min over x of (a*x + b) mod (2^61 - 1), exactly, for 32-bit x (S,) and a, b < 2^61 (H,) -> (H,).

    a*x = a_hi*x*2^32 + a_lo*x with a_lo*x < 2^64 and a_hi*x < 2^61; since 2^61 = 1 (mod p), a value
    v = v_hi*2^61 + v_lo folds to v_hi + v_lo, and y*2^32 to (y >> 29) + ((y mod 2^29) << 32)."""
    a_hi, a_lo = a >> _S32, a & _LOW32
    out = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i in range(0, len(x), chunk):
        xs = x[i : i + chunk, None]  # (S, 1)
        lo = xs * a_lo  # (S, H) < 2^64
        hi = xs * a_hi  # < 2^61
        s = lo >> _S61
        lo &= _MERSENNE
        s += lo
        np.right_shift(hi, _S29, out=lo)
        s += lo
        hi &= _LOW29
        hi <<= _S32
        s += hi
        s += b  # < 2^63: a*x + b, folded once
        np.right_shift(s, _S61, out=lo)
        s &= _MERSENNE
        s += lo  # < 2^61 + 4
        s += _ONE  # exact last fold: ((s+1) mod 2^61) + ((s+1) >> 61) - 1 lies in [0, p)
        np.right_shift(s, _S61, out=lo)
        s &= _MERSENNE
        s += lo
        s -= _ONE
        np.minimum(out, s.min(axis=0), out=out)
    return out


def signature(text: str, cfg: MinHashConfig, perms=None) -> np.ndarray:
    a, b = perms if perms is not None else _permutations(cfg)
    hs = shingle_hashes(text, cfg.ngram)
    if not len(hs):
        return np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    return universal_hash_min(hs, a, b, cfg.chunk)


def band_keys_array(sigs: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """Signatures (D, bands * rows) -> one 64-bit bucket key per band (D, bands), as int64."""
    r = cfg.rows_per_band
    bands = sigs.reshape(len(sigs), cfg.num_bands, r)
    h = (bands * _COMBINE[:r]).sum(axis=2, dtype=np.uint64)  # (D, bands), wrapping mod 2^64
    h += (np.arange(cfg.num_bands, dtype=np.uint64) + _ONE) * _COMBINE[r]  # the band index
    return _mix64(h).view(np.int64)


def band_keys(sig: np.ndarray, cfg: MinHashConfig) -> list[int]:
    """One 64-bit bucket key per band of one signature."""
    return band_keys_array(sig[None, :], cfg)[0].tolist()


def jaccard_estimate(s1: np.ndarray, s2: np.ndarray) -> float:
    return float((s1 == s2).mean())


def texts_band_keys(texts, cfg: MinHashConfig) -> np.ndarray:
    """Texts (D,) -> their band keys (D, bands), int64."""
    if not len(texts):
        return np.empty((0, cfg.num_bands), dtype=np.int64)
    perms = _permutations(cfg)
    return band_keys_array(np.stack([signature(text, cfg, perms) for text in texts]), cfg)


def band_key_rows(batch, cfg: MinHashConfig):
    """map_batches body: (uid, text) rows -> one (key, uid) row per band."""
    keys = texts_band_keys(batch["text"], cfg)  # (D, bands)
    return {"key": keys.ravel(), "uid": np.repeat(np.asarray(batch["uid"], dtype=object), cfg.num_bands)}


def near_duplicate_edges(ds, cfg: MinHashConfig, num_blocks: int = 8):
    """Ray Data dataset with uid, text -> candidate pairs sharing an LSH bucket."""
    from moray.jobs.curate.dedup_exact import edges_by_key

    keyed = ds.select_columns(["uid", "text"]).map_batches(
        band_key_rows, fn_kwargs={"cfg": cfg}, batch_size=256, batch_format="numpy"
    )
    return edges_by_key(keyed, num_blocks)
