import random

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
