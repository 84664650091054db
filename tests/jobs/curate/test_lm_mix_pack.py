import json

import numpy as np
import pyarrow as pa
import pytest

from moray.jobs.curate import langid, ledger, mixing, pack, perplexity, tokenizer
from moray.platform.data_contract import SpecialTokens, special_tokens_of


def test_langid_accuracy_on_ud_labels(corpus):
    labelled = []
    for p in sorted((corpus / "multilingual").glob("ud-*.jsonl")):
        for line in p.read_text().splitlines()[:40]:
            obj = json.loads(line)
            labelled.append((obj["text"], obj["lang"]))
    acc = langid.accuracy(labelled)
    assert acc["accuracy"] >= 0.95, acc
    assert set(acc["per_language"]) == {"en", "de", "ru", "hi", "fr", "es", "zh"}


def test_langid_filter_respects_domain():
    cfg = langid.LangIdConfig()
    assert langid.check("web", "de", 0.99, cfg) == "langid:de"
    assert langid.check("multilingual", "de", 0.99, cfg) == ""
    assert langid.check("web", "la", 0.5, cfg) == ""  # not confident enough to filter


def test_bigram_lm_prefers_real_text(corpus):
    text = (corpus / "books" / "tinyshakespeare.txt").read_text()
    lm = perplexity.BigramLM.train([text[:300_000]])
    held = text[500_000:502_000]
    words = held.split()
    shuffled = " ".join(np.random.default_rng(0).permutation(words))
    assert lm.perplexity(held) < 0.7 * lm.perplexity(shuffled)
    cfg = perplexity.PerplexityConfig(min_docs=5)
    t = perplexity.buckets({"books": [10.0, 20, 30, 40, 50, 60, 70, 80, 90, 1000]}, cfg)
    assert perplexity.check("books", 15, t, cfg) == ("head", "")
    assert perplexity.check("books", 1000, t, cfg)[1] == "perplexity:>p99"
    assert perplexity.buckets({"books": [1.0, 2.0]}, perplexity.PerplexityConfig()) == {}  # too few docs


def test_mix_plan_meets_targets_within_the_upsample_cap():
    cfg = mixing.MixConfig()
    avail = {
        "web": 1000.0,
        "academic": 5000.0,
        "code": 100.0,
        "books": 2000.0,
        "multilingual": 300.0,
        "docs": 9000.0,
    }
    p = mixing.plan(avail, cfg)
    assert max(v["ratio"] for v in p.values()) <= cfg.max_upsample + 1e-9
    total = sum(v["ratio"] * avail[d] for d, v in p.items())
    for d, v in p.items():
        assert v["ratio"] * avail[d] / total == pytest.approx(cfg.targets[d])
    with pytest.raises(ValueError):
        mixing.MixConfig(targets={"web": -1})


def test_tokenizer_and_pack(tmp_path):
    texts = ["the cat sat on the mat. " * 20, "def f(x):\n    return x + 1\n" * 10, "Grüße aus Köln! " * 30]
    tok = tokenizer.train(texts, tokenizer.TokenizerConfig(vocab_size=300))
    assert special_tokens_of(tok) == SpecialTokens(bos=0, eos=1, pad=2)
    assert tok.decode(tok.encode("Grüße 🙂").ids) == "Grüße 🙂"  # byte-level: nothing is unknown
    docs = [
        (f"d{i}", "web" if i % 2 else "code", np.asarray(tok.encode(texts[i % 3]).ids, np.int32))
        for i in range(30)
    ]
    cfg = pack.PackConfig(seq_len=16, val_fraction=0.2, rows_per_shard=10)
    out = pack.pack(docs, cfg, eos=1, ratios={"web": 1.0, "code": 0.5})
    again = pack.pack(list(reversed(docs)), cfg, eos=1, ratios={"web": 1.0, "code": 0.5})
    assert np.array_equal(out["train"]["seqs"], again["train"]["seqs"])
    assert out["train"]["seqs"].shape[1] == 17 and len(out["val"]["seqs"]) > 0
    assert (out["train"]["seqs"] == 1).any()  # EOS between documents
    shards = pack.write_shards(tmp_path, "train", out["train"]["seqs"], out["train"]["domains"], cfg)
    assert sum(s["rows"] for s in shards) == len(out["train"]["seqs"]) and len(shards[0]["sha256"]) == 64


def test_ledger_check_catches_lost_records():
    t = pa.table({"uid": ["a#0", "a#1", "a#2"], "doc_id": ["x", "y", "z"], "source": ["a"] * 3, "domain": ["web"] * 3,
                  "outcome": ["kept", "duplicate", "quarantined"], "reason": ["", "exact_duplicate", "malformed json"],
                  "stage": ["", "dedup", "read"], "dup_of": ["", "a#0", ""], "copies": [1, 0, 0]})  # fmt: skip
    led = ledger.build(t)
    assert led.column("duplicate_of").to_pylist() == ["", "x", ""]
    c = ledger.check(led, 3)
    assert c["web"] == {"input": 3, "kept": 1, "filtered": 0, "duplicate": 1, "quarantined": 1}
    with pytest.raises(ledger.AccountingError, match="4 records were read"):
        ledger.check(led, 4)
