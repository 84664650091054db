import random

import numpy as np
import pyarrow.parquet as pq

from moray.jobs.curate import code_norm, dedup_exact, minhash
from moray.jobs.curate.normalize import normalize_text
from moray.jobs.curate.readers import SourceConfig, discover, read_local


def test_clusters_choose_one_deterministic_survivor():
    edges = [("b", "c"), ("a", "b"), ("x", "y")]
    sizes = {"a": 10, "b": 30, "c": 30, "x": 1, "y": 1}
    dup = dedup_exact.clusters(edges, sizes)
    assert dup == {"a": "b", "c": "b", "y": "x"}  # largest wins, ties to the smallest uid
    assert dedup_exact.clusters(list(reversed(edges)), sizes) == dup


def test_exact_key_ignores_case_punctuation_and_spacing():
    assert dedup_exact.exact_key("Hello,  World!") == dedup_exact.exact_key("hello world")
    assert dedup_exact.exact_key("hello world") != dedup_exact.exact_key("hello there")


def test_gutenberg_editions_are_near_duplicates(corpus):
    cfg = minhash.MinHashConfig()
    texts = {}
    for p in sorted((corpus / "books" / "moby-dick").iterdir()):
        (row,) = read_local(discover(SourceConfig(path=str(p), domain="books"))[0])
        texts[p.name] = normalize_text(row["text"])
    keys = {n: set(minhash.band_keys(minhash.signature(t, cfg), cfg)) for n, t in texts.items()}
    names = sorted(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert keys[a] & keys[b], (a, b)
    (pp,) = read_local(
        discover(SourceConfig(path=str(corpus / "books" / "pride-and-prejudice" / "1342.txt")))[0]
    )
    other = set(minhash.band_keys(minhash.signature(normalize_text(pp["text"]), cfg), cfg))
    assert not (other & keys["2701.txt"])


def test_minhash_permutations_are_exact_universal_hashes():
    """(a*x + b) mod (2^61 - 1) with no 64-bit wrap-around, for 32-bit x and a, b anywhere below p."""
    p = (1 << 61) - 1
    rng = np.random.default_rng(0)
    x = np.concatenate([[0, 1, (1 << 32) - 1], rng.integers(0, 1 << 32, 500)]).astype(np.uint64)
    a = np.concatenate([[1, p - 1], rng.integers(1, p, 30)]).astype(np.uint64)
    b = np.concatenate([[0, p - 1], rng.integers(0, p, 30)]).astype(np.uint64)
    want = [min((int(ai) * int(xi) + int(bi)) % p for xi in x) for ai, bi in zip(a, b)]
    assert minhash.universal_hash_min(x, a, b, chunk=64).tolist() == want
    a, b = minhash._permutations(minhash.MinHashConfig())
    assert a.min() >= 1 and a.max() < p and b.max() < p and a.max() > 1 << 60  # drawn from all of [1, p)


def test_minhash_rows_are_independent():
    """Each of the 112 hashes picks its own minimum: with 400 shingles about 400 * (1 - e^(-112/400)) = 98
    different ones. (Multipliers below 2^32 picked the same shingle for a fifth of the rows and correlated
    the bands, so LSH recall fell under 1 - (1 - J^8)^14.)"""
    cfg = minhash.MinHashConfig()
    a, b = minhash._permutations(cfg)
    x = np.random.default_rng(1).integers(0, 1 << 32, 400).astype(np.uint64)
    h = np.stack([minhash.universal_hash_min(x[i : i + 1], a, b) for i in range(len(x))])  # (400, 112)
    assert len(set(h.argmin(axis=0).tolist())) >= 90
    # per-row agreement of two sets with Jaccard 0.5 estimates it without bias or extra spread
    agree = []
    for seed in range(40):
        u = np.random.default_rng(100 + seed).choice(1 << 32, 320, replace=False).astype(np.uint64)
        s1, s2 = u[:240], u[80:]  # |s1 & s2| = 160, |s1 | s2| = 320: J = 0.5
        agree.append(
            minhash.jaccard_estimate(
                minhash.universal_hash_min(s1, a, b), minhash.universal_hash_min(s2, a, b)
            )
        )
    assert abs(np.mean(agree) - 0.5) < 0.03
    assert np.std(agree) < 1.5 * (0.5 * 0.5 / 112) ** 0.5


def test_shingle_hashes_name_each_word_ngram(corpus):
    """One hash per n-gram position: equal n-grams hash alike, distinct ones apart (32-bit, as murmur3 of
    the joined string would be); fewer words than n make one shingle."""
    docs = pq.read_table(corpus / "web" / "c4-validation-2k.parquet").column("text").to_pylist()[:200]
    for doc in docs:
        ws = minhash._TOKEN.findall(doc.lower())
        h = minhash.shingle_hashes(doc, 5).tolist()
        grams = [" ".join(ws[i : i + 5]) for i in range(len(ws) - 4)] or [" ".join(ws)]
        assert len(h) == len(grams) and all(x < 1 << 32 for x in h)
        assert len(set(zip(grams, h))) == len(set(grams)) == len(set(h)) == len(minhash.shingles(doc, 5))
    assert (
        minhash.shingle_hashes("Two words", 5).tolist() == minhash.shingle_hashes("two, WORDS!", 5).tolist()
    )
    assert len(minhash.shingle_hashes("", 5)) == 0


def test_band_keys_depend_on_every_row_and_the_band():
    cfg = minhash.MinHashConfig()
    sig = minhash.signature("a few words of text to sign, more than five of them", cfg)
    keys = minhash.band_keys(sig, cfg)
    assert len(set(keys)) == cfg.num_bands and keys == minhash.band_keys(sig.copy(), cfg)
    same = np.tile(sig[: cfg.rows_per_band], cfg.num_bands)  # every band holds the same minima
    assert len(set(minhash.band_keys(same, cfg))) == cfg.num_bands  # the band index separates them
    for i in range(0, len(sig), 5):
        other = sig.copy()
        other[i] += np.uint64(1)
        diff = [k1 != k2 for k1, k2 in zip(keys, minhash.band_keys(other, cfg))]
        assert diff == [b == i // cfg.rows_per_band for b in range(cfg.num_bands)]


def _perturb(text, rate, rng):
    ws = text.split()
    for i in range(len(ws)):
        if rng.random() < rate:
            ws[i] = rng.choice(["the", "a", "foo", "data", "very"])
    return " ".join(ws)


def test_perturbed_c4_copies_found_distinct_documents_not(corpus):
    docs = [
        d
        for d in pq.read_table(corpus / "web" / "c4-validation-2k.parquet").column("text").to_pylist()
        if len(d.split()) > 300
    ][:40]
    cfg = minhash.MinHashConfig()
    rng = random.Random(0)
    keys = [set(minhash.band_keys(minhash.signature(d, cfg), cfg)) for d in docs]
    pert = [set(minhash.band_keys(minhash.signature(_perturb(d, 0.01, rng), cfg), cfg)) for d in docs]
    recall = sum(bool(k & p) for k, p in zip(keys, pert)) / len(docs)
    false = sum(bool(keys[i] & keys[j]) for i in range(len(docs)) for j in range(i + 1, len(docs)))
    assert recall >= 0.95 and false == 0


def test_renamed_python_clone_has_the_same_code_key():
    a = 'def bubble(items):\n    """Sort."""\n    n = len(items)  # size\n    for i in range(n):\n        pass\n    return sorted(items)\n'
    b = "def my_sort(xs):\n    length = len(xs)\n    for k in range(length): pass\n    return sorted(xs)\n"
    cfg = code_norm.CodeNormConfig()
    assert code_norm.code_key(a, "python", cfg) == code_norm.code_key(b, "python", cfg)
    assert code_norm.code_key(
        a, "python", code_norm.CodeNormConfig(standardize_identifiers=False)
    ) != code_norm.code_key(b, "python", code_norm.CodeNormConfig(standardize_identifiers=False))
    assert code_norm.normalize_python("print 'py2'") is None


def test_dedup_cascade_exact_then_near_in_one_shuffle(ray_local, tmp_path, corpus):
    """Exact, code and MinHash keys share one pass and one shuffle; the cascade still holds: a
    document removed as an exact duplicate is not a MinHash bucket's anchor, so its exact twin
    and the twin's near duplicate stay linked."""
    import json

    from moray.jobs.curate.pipeline import Curation, load_config

    c4 = [
        d
        for d in pq.read_table(corpus / "web" / "c4-validation-2k.parquet").column("text").to_pylist()
        if len(d.split()) > 300 and d.endswith(".")
    ]
    t1, t2, t3 = c4[:3]
    words = t1.split(" ")
    edited = " ".join("a" if i % 97 == 0 else w for i, w in enumerate(words))  # ~1% edits, shorter
    docs = [
        t1.replace("\n", " ")[:-1],  # #0: exact twin of #1 (same key), shorter: loses to #1
        t1,  # #1
        edited,  # #2: near duplicate of #1 (and of #0)
        t2,  # #3
        t2[: int(len(t2) * 0.93)],  # #4: near duplicate of #3
        t3,  # #5
        t3,  # #6: exact duplicate of #5
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    data = {"output": str(tmp_path / "out"), "sources": [{"path": str(src), "domain": "web"}],
            "quality": {"per_domain": {"default": []}}, "langid": {"enabled": False},
            "perplexity": {"enabled": False}, "semdedup": {"enabled": False}, "mlflow": False,
            "report": False}  # fmt: skip
    job = Curation(load_config(data=data))
    rows = job.dedup(job.prepare()).select_columns(["doc_id", "outcome", "reason", "dup_of"]).to_pandas()
    uid = {r.doc_id: r for r in rows.itertuples()}
    got = {d: (r.outcome, r.reason, r.dup_of.rsplit("#", 1)[-1] if r.dup_of else "") for d, r in uid.items()}
    assert got == {
        "d0": ("duplicate", "exact_duplicate", "1"),
        "d1": ("kept", "", ""),
        "d2": ("duplicate", "near_duplicate", "1"),
        "d3": ("kept", "", ""),
        "d4": ("duplicate", "near_duplicate", "3"),
        "d5": ("kept", "", ""),
        "d6": ("duplicate", "exact_duplicate", "5"),
    }
