"""Cross-lingual alignment (moray/jobs/curate/crosslingual.py) and packing translation groups
together (pack.py). Ground truth: the UD PUD files are parallel (ids match after the language
prefix); the French, Spanish and Chinese UD files are not. The pairing never reads an id."""

import json
import math
import time

import numpy as np
import pytest

from moray.jobs.curate import crosslingual as xl
from moray.jobs.curate import pack
from moray.platform.config import ConfigError

PARALLEL = ("en", "de", "ru", "hi")
DISTRACTORS = ("fr", "es", "zh")


def _load(corpus, langs):
    rows = []
    for lang in langs:
        rows += [
            json.loads(line)
            for line in (corpus / "multilingual" / f"ud-{lang}.jsonl").read_text().splitlines()
        ]
    return rows


def test_ud_translations_are_paired_and_distractors_are_not(corpus):
    rows = _load(corpus, PARALLEL + DISTRACTORS)
    texts, langs = [r["text"] for r in rows], [r["lang"] for r in rows]
    t0 = time.perf_counter()
    result = xl.pair_documents(texts, langs)  # texts and languages only: no id
    seconds = time.perf_counter() - t0
    scores = xl.evaluate(result.group, langs, [xl.truth_key(r["id"], r["lang"]) for r in rows])

    per = scores["per_language_pair"]
    assert set(per) == {"de-en", "de-hi", "de-ru", "en-hi", "en-ru", "hi-ru"}  # nothing else was paired
    for pair, s in per.items():
        assert s["true"] == 397 and s["precision"] >= 0.95 and s["recall"] >= 0.95, (pair, s)
    assert scores["groups"]["precision"] >= 0.95 and scores["groups"]["recall"] >= 0.95, scores["groups"]
    assert not [r["id"] for r, g in zip(rows, result.group) if r["lang"] in DISTRACTORS and g >= 0]
    assert set(result.stats["languages"]) == set(PARALLEL + DISTRACTORS)
    assert seconds < 60  # about 5 s on one core


def test_the_input_order_is_no_signal(corpus):
    en, de = _load(corpus, ("en",)), _load(corpus, ("de",))
    rows = (en[: 397 - 150] + de)[::-1]  # 150 English documents gone: their German ones are orphans
    texts, langs = [r["text"] for r in rows], [r["lang"] for r in rows]
    forward = xl.pair_documents(texts, langs)
    perm = np.random.default_rng(0).permutation(len(rows))
    shuffled = xl.pair_documents([texts[i] for i in perm], [langs[i] for i in perm])

    def pairs(group, ids):
        members = {}
        for i, g in zip(ids, group):
            if g >= 0:
                members.setdefault(g, set()).add(i)
        return {frozenset(m) for m in members.values()}

    ids = [r["id"] for r in rows]
    assert pairs(forward.group, ids) == pairs(shuffled.group, [ids[i] for i in perm])
    # with only two languages (no pivot) the orphans still stay unpaired and precision holds
    orphans = {xl.truth_key(r["id"], "en") for r in en[397 - 150 :]}
    german = [
        g for r, g in zip(rows, forward.group) if r["lang"] == "de" and xl.truth_key(r["id"], "de") in orphans
    ]
    assert len(german) == 150 and sum(g >= 0 for g in german) <= 7, sum(g >= 0 for g in german)
    s = xl.evaluate(forward.group, langs, [xl.truth_key(r["id"], r["lang"]) for r in rows])[
        "per_language_pair"
    ]
    assert s["de-en"]["precision"] >= 0.95 and s["de-en"]["recall"] >= 0.9, s


def test_names_meet_across_scripts():
    spellings = ["Georgetown", "Джорджтаун", "जॉर्जटाउन"]
    assert {xl.skeleton(xl.transliterate(w)) for w in spellings} == {"grgtn"}
    assert xl.transliterate("Штернлиб १९९६ Grüße") == "shternlib 1996 grusse"
    terms_en, _, _ = xl.features("It cost $103.7 million in 2004.")
    terms_de, _, _ = xl.features("Es kostete 103,7 Millionen Dollar (2004).")
    assert {"#103", "#7", "#2004"} <= set(terms_en) & set(terms_de)  # numbers agree across conventions


def test_ground_truth_keys_need_a_language_prefix():
    assert xl.truth_key("de_pud-ud-test/n01001", "de") == "pud-ud-test/n01001"
    assert xl.truth_key("n01001", "de") is None and xl.truth_key(None, "de") is None
    assert xl.evaluate([0, 0, -1], ["en", "de", "ru"], [None, None, None]) == {}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"min_score": 0.0}, r"min_score=0.0: must be > 0"),
        ({"min_margin": -1.0}, "min_margin=-1.0: must be >= 0"),
        ({"max_length_ratio": 1.0}, "max_length_ratio=1.0: must be > 1"),
        ({"languages": ["en"]}, "pairing needs at least two languages"),
        ({"languages": "en,de"}, "a list of language codes"),
        ({"domains": "multilingual"}, "a list of domain names"),
        ({"min_docs": 1}, "min_docs=1: must be >= 2"),
        ({"max_docs": 5}, "max_docs=5: must be >= min_docs"),
        ({"rounds": 11}, r"rounds=11: must be in \[0, 10\]"),
        ({"min_anchors": 1}, "min_anchors=1: must be >= 2"),
    ],
)
def test_config_refuses_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        xl.CrossLingualConfig(**bad)
    from moray.jobs.curate.pipeline import load_config

    with pytest.raises(ConfigError, match=f"crosslingual: .*{message}"):
        load_config(data={"sources": [{"path": "x"}], "crosslingual": bad})


def test_off_or_without_two_languages_the_stage_does_not_run():
    import pandas as pd

    frame = pd.DataFrame({"domain": ["multilingual"] * 50 + ["web"] * 50, "outcome": "kept",
                          "lang": ["de"] * 25 + ["en"] * 25 + [None] * 50,
                          "lang_pred": ["de"] * 25 + ["und"] * 25 + ["en"] * 50})  # fmt: skip
    cfg = xl.CrossLingualConfig()
    assert xl.languages_to_pair(frame, cfg) == {
        "multilingual": {"de": 25, "en": 25}
    }  # label where langid can't tell
    assert xl.languages_to_pair(frame, xl.CrossLingualConfig(min_docs=26)) == {}
    assert xl.languages_to_pair(frame, xl.CrossLingualConfig(languages=["de", "ru"])) == {}
    assert xl.languages_to_pair(frame[frame["domain"] == "web"], cfg) == {}  # one language: nothing to pair


# -- packing ------------------------------------------------------------------------------------


def _docs(n=120, seed=0):
    """Documents whose every token is its own number (>= 10), so a sequence shows which it holds."""
    rng = np.random.default_rng(seed)
    return [
        (f"u{i:04d}", "multilingual", np.full(int(rng.integers(3, 25)), 10 + i, np.int32)) for i in range(n)
    ]


def _old_pack_layout(docs, cfg, eos, ratio):
    """pack.pack's layout before translation groups (one domain): the reference it must keep."""
    width = cfg.seq_len + 1
    by_split = {}
    for uid, _, ids in sorted(docs, key=lambda d: d[0]):
        by_split.setdefault(pack.split_of(uid, cfg.val_fraction, cfg.seed), []).append(ids)
    out = {}
    for split, items in sorted(by_split.items()):
        rng = np.random.default_rng([cfg.seed, sum(map(ord, split + "multilingual"))])
        stream = np.concatenate(
            [
                np.append(items[i], np.int32(eos))
                for _ in range(math.ceil(ratio))
                for i in rng.permutation(len(items))
            ]
        )
        n_seq = min(len(stream) // width, round(ratio * len(stream) / math.ceil(ratio) / width))
        seqs = stream[: n_seq * width].reshape(n_seq, width)
        out[split] = seqs[np.random.default_rng([cfg.seed, 7 if split == "train" else 11]).permutation(n_seq)]
    return out


def test_without_groups_packing_is_unchanged():
    docs, cfg = _docs(), pack.PackConfig(seq_len=32, val_fraction=0.2)
    for ratio in (1.0, 1.5):
        new = pack.pack(docs, cfg, eos=1, ratios={"multilingual": ratio})
        old = _old_pack_layout(docs, cfg, 1, ratio)
        for split in ("train", "val"):
            assert np.array_equal(new[split]["seqs"], old[split])
        assert new["train"]["translation_groups"] == {"laid_out": 0, "in_one_sequence": 0}


def test_a_translation_group_is_packed_together():
    docs, cfg = _docs(), pack.PackConfig(seq_len=128, val_fraction=0.2)
    # groups of 2 to 4 consecutive documents (a translation group each), the rest alone
    groups, k, g = {}, 0, 0
    while k < 100:
        size = 2 + g % 3
        groups.update({f"u{k + j:04d}": f"xl-{g}" for j in range(size)})
        k, g = k + size, g + 1
    out = pack.pack(docs, cfg, eos=1, ratios={"multilingual": 1.0}, groups=groups)
    again = pack.pack(list(reversed(docs)), cfg, eos=1, ratios={"multilingual": 1.0}, groups=groups)
    for split in ("train", "val"):
        assert np.array_equal(out[split]["seqs"], again[split]["seqs"])  # whatever the input order

    members = {}
    for uid, gid in groups.items():
        members.setdefault(gid, set()).add(10 + int(uid[1:]))
    where = {}  # token (document) -> (split, row)
    for split in ("train", "val"):
        for r, row in enumerate(out[split]["seqs"]):
            for t in set(row.tolist()) - {1}:
                where.setdefault(t, set()).add((split, r))
    laid = together = 0
    for docs_of_group in members.values():
        places = [where.get(t, set()) for t in docs_of_group]
        if not all(places):
            continue  # in the dropped tail
        laid += 1
        rows = set.union(*places)
        if len(rows) == 1:  # one sequence; and consecutive there: nothing but EOS between them
            together += 1
            split, r = next(iter(rows))
            row = out[split]["seqs"][r]
            span = np.flatnonzero(np.isin(row, list(docs_of_group)))
            assert set(row[span[0] : span[-1] + 1].tolist()) <= docs_of_group | {1}
        assert len({s for s, _ in rows}) == 1  # a group is on one side of the split
    # every group fits in 129 tokens, so each lands in one, but maybe the last ones of a split's
    # stream: no single document is left there to fill a window's remainder while they wait
    assert laid >= 25 and together >= laid - 4, (together, laid)
    counted = (
        out["train"]["translation_groups"]["in_one_sequence"]
        + out["val"]["translation_groups"]["in_one_sequence"]
    )
    assert counted == together
    # without the groups, hardly any group shares a sequence
    plain = pack.pack(docs, cfg, eos=1, ratios={"multilingual": 1.0})
    rows_of = {}
    for split in ("train", "val"):
        for r, row in enumerate(plain[split]["seqs"]):
            for t in set(row.tolist()) - {1}:
                rows_of.setdefault(t, set()).add((split, r))
    shared = sum(len(set.intersection(*[rows_of.get(t, set()) for t in m])) > 0 for m in members.values())
    assert shared <= laid // 4


def test_lay_out_keeps_the_plain_order_and_moves_a_straddling_group_up():
    doc = lambda n, v: np.full(n, v, np.int32)  # noqa: E731
    singles = [[doc(3, 2)], [doc(4, 3)], [doc(5, 4)]]
    stream, placed = pack.lay_out(singles, width=8)
    assert [d[0] for d in stream] == [2, 3, 4] and placed == []
    # a group of 6 tokens would cross the boundary at 8 (after 5 tokens): the single after it goes
    # first, and the group waits for the next window
    stream, placed = pack.lay_out([[doc(5, 2)], [doc(3, 5), doc(3, 6)], [doc(3, 3)]], width=8)
    assert [d[0] for d in stream] == [2, 3, 5, 6] and placed == [(8, 6)]
    # a group longer than a window never waits
    stream, placed = pack.lay_out([[doc(5, 2)], [doc(6, 5), doc(6, 6)]], width=8)
    assert [d[0] for d in stream] == [2, 5, 6] and placed == [(5, 12)]


# -- the stage in the curation pipeline (Ray) ------------------------------------------------------


def test_stage_gives_groups_a_pair_id_and_packing_keeps_them_together(ray_local, tmp_path, corpus):
    """The pipeline's crosslingual step (through the stage cache) on rows as the stages before it
    leave them, then the pack stage on its output: a shared pair_id per translation group, the
    report data, and the groups packed together."""
    import pandas as pd
    import ray

    from moray.jobs.curate import tokenizer as tok_mod
    from moray.jobs.curate.mixing import MixConfig
    from moray.jobs.curate.pipeline import Curation, load_config

    rows = []
    for lang, n in (("en", 120), ("de", 120), ("ru", 120), ("hi", 120), ("fr", 30)):
        for k, r in enumerate(_load(corpus, (lang,))[:n]):
            rows.append({"uid": f"ud-{lang}.jsonl#{k}", "doc_id": r["id"], "domain": "multilingual",
                         "lang": r["lang"], "lang_pred": r["lang"], "text": r["text"], "outcome": "kept"})  # fmt: skip
    web = {
        "uid": "web#0",
        "doc_id": "en_pud-ud-test/n01001",
        "domain": "web",
        "lang": None,
        "lang_pred": "en",
    }
    rows.append({**web, "text": rows[0]["text"], "outcome": "kept"})  # another domain: not paired
    rows.append({**rows[1], "uid": "ud-en.jsonl#x", "outcome": "duplicate"})  # not kept: not paired
    frame = pd.DataFrame(rows).assign(copies=lambda df: (df["outcome"] == "kept").astype(int))
    out = tmp_path / "out"
    cur = Curation(load_config(data={"output": str(out), "sources": [{"path": "x"}], "mlflow": False}))

    ds = cur.crosslingual(ray.data.from_pandas(frame))
    x = cur.cache.extras["crosslingual"]
    info = x["per_domain"]["multilingual"]
    assert info["languages"] == {"de": 120, "en": 120, "fr": 30, "hi": 120, "ru": 120}
    truth = info["ground_truth"]  # the ids share a suffix: precision and recall are reported
    assert truth["pairs"]["precision"] >= 0.95 and truth["pairs"]["recall"] >= 0.8, truth["pairs"]
    assert x["groups"] >= 90 and x["group_sizes"]["4"] >= 80, x
    got = ds.to_pandas()
    paired = got[got["pair_id"].notna()]
    assert len(got) == len(frame) and len(paired) == x["paired_documents"]
    assert (paired.groupby("pair_id")["lang"].nunique() == paired.groupby("pair_id").size()).all()
    assert (
        got[(got["lang"] == "fr") | (got["domain"] == "web") | (got["outcome"] != "kept")]["pair_id"]
        .isna()
        .all()
    )

    tok = tok_mod.train(frame["text"], tok_mod.TokenizerConfig(vocab_size=2000))
    tok.save(str(out / "tokenizer.json"))
    extra, _ = pack.stage(
        ds, out / "tokenizer.json", pack.PackConfig(seq_len=1024), MixConfig(enabled=False), out
    )
    p = extra["translation_groups"]
    # every group laid out once (but one in the dropped last partial window, maybe); most in one
    # sequence (the rest: longer than 1,025 tokens, or no single document left to wait behind)
    assert p["groups"] == x["groups"] and p["laid_out"] >= x["groups"] - 2, p
    assert p["in_one_sequence"] >= 0.6 * p["laid_out"], p
