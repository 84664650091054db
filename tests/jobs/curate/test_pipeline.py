"""Integration: a slice of the real corpus plus every kind of bad input, through local Ray."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from moray.jobs.curate.pipeline import Curation, EmptyCurationError, load_config
from moray.platform.config import ConfigError
from moray.platform.data_contract import SpecialTokens, count_rows, read_manifest
from tests.fixtures.curated_slice import BAD_FILE_KINDS, BAD_KINDS


def test_curate_slice_end_to_end(curated_slice):
    out, m, data = curated_slice.out, curated_slice.manifest, curated_slice.config

    # the counts add up and the ledger has a row per record
    led = pq.read_table(out / "ledger.parquet").to_pandas()
    assert len(led) == m["records_read"] == m["counts"]["all"]["input"]
    for dom, c in m["counts"].items():
        assert c["input"] == c["kept"] + c["filtered"] + c["duplicate"] + c["quarantined"], dom

    # every bad kind is quarantined with its reason, raw bytes kept
    q = led[led["outcome"] == "quarantined"]
    for kind in [*BAD_KINDS, *BAD_FILE_KINDS]:
        assert q["reason"].str.startswith(kind).any(), kind
    qf = pq.read_table(out / "quarantine" / "quarantined.parquet").to_pandas()
    assert len(qf) == len(q) and (qf["raw"].map(len) > 0).sum() >= len(q) - 1

    # the Gutenberg editions collapse to one survivor
    books = led[led["domain"] == "books"]
    assert (books["outcome"] == "kept").sum() == 1 and (books["outcome"] == "duplicate").sum() == 3
    survivor = books[books["outcome"] == "kept"]["doc_id"].item()
    assert set(books[books["outcome"] == "duplicate"]["duplicate_of"]) == {survivor}

    # SemDeDup (MiniLM in a Ray Data actor pool) catches the paraphrase, and only it
    sem = led[led["reason"] == "semantic_duplicate"]
    assert len(sem) == 1 and {sem["doc_id"].item(), sem["duplicate_of"].item()} == {"news-a", "news-b"}
    assert led.set_index("doc_id").at[sem["duplicate_of"].item(), "outcome"] == "kept"
    kept_web_before_sem = (
        (led["domain"] == "web") & ((led["outcome"] == "kept") | (led["stage"] == "semdedup"))
    ).sum()
    assert m["dedup"]["semdedup"]["embedded"] == kept_web_before_sem

    # shards: seq_len + 1 ids, a domain per row, token counts and checksums consistent
    assert m["seq_len"] == 64 and m["vocab_size"] == 512 and (out / "tokenizer.json").exists()
    for split in ("train", "val"):
        info = m["splits"][split]
        rows = 0
        for shard in info["shards"]:
            t = pq.read_table(out / shard["path"])
            assert str(t.schema.field("input_ids").type) == "list<element: int32>"
            ids = np.array(t.column("input_ids").to_pylist())
            assert ids.shape[1] == 65 and ids.max() < 512 and ids.size == shard["tokens"]
            assert set(t.column("domain").to_pylist()) <= set(m["mix"])
            rows += t.num_rows
        assert rows == info["sequences"] > 0
    achieved = {d: v["achieved"] for d, v in m["mix"].items()}
    assert sum(achieved.values()) == pytest.approx(1.0)
    assert (out / "report.md").exists() and (out / "report_plots" / "mix.png").exists()
    # language id is scored against the labels the UD source carries
    assert m["langid_accuracy"]["n"] == 30 and m["langid_accuracy"]["accuracy"] >= 0.9
    assert "## Language identification" in (out / "report.md").read_text()

    # the output follows the data contract: pre-training reads it with read_manifest
    contract = read_manifest(out)
    assert contract.format_version == m["format_version"] == 2
    assert contract.special_tokens == SpecialTokens(bos=0, eos=1, pad=2) and contract.vocab_size == 512
    assert (
        contract.extra["counts"] == m["counts"]
        and count_rows(out, "train") == m["splits"]["train"]["sequences"]
    )

    # a re-run with the same config skips every stage and gives the same shards
    m2 = Curation(load_config(data=data)).run()
    assert m2["stages_skipped_on_resume"] == [
        "prepare", "quarantine", "perplexity", "dedup", "semdedup", "mix", "tokenizer", "pack"
    ]  # fmt: skip
    assert m2["counts"] == m["counts"]
    assert [s["sha256"] for s in m2["splits"]["train"]["shards"]] == [
        s["sha256"] for s in m["splits"]["train"]["shards"]
    ]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="minhash"):
        load_config(data={"sources": [{"path": "x"}], "minhash": {"num_bands": 0}})
    with pytest.raises(ConfigError, match=r"sources\[0\]"):
        load_config(data={"sources": [{"path": "x", "format": "pdf"}]})
    with pytest.raises(ConfigError, match="sources"):
        load_config(data={})


def _tiny(out, sources, **sections) -> dict:
    """A config that curates a few dozen records quickly: small vocabulary, short sequences."""
    return {"output": str(out), "sources": sources, "tokenizer": {"vocab_size": 300, "train_chars": 100_000},
            "pack": {"seq_len": 32, "val_fraction": 0.2, "rows_per_shard": 100}, "semdedup": {"num_clusters": 2},
            "num_blocks": 2, "mlflow": False, **sections}  # fmt: skip


def test_clean_input_curates_end_to_end(ray_local, tmp_path, corpus):
    """50 well-formed JSON lines, nothing to quarantine (issue 17: this crashed in the quarantine
    step), beside blank lines and symlinks that loop or leave the input folder."""
    texts = pq.read_table(corpus / "web" / "c4-validation-2k.parquet").column("text").to_pylist()[:50]
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"id": f"c4-{i}", "text": t}) for i, t in enumerate(texts)]
    lines[10:10] = ["", "   "]  # blank lines: not records, counted
    (src / "clean.jsonl").write_text("\n".join(lines) + "\n\n")
    (src / "loop").symlink_to(".")
    (src / "up").symlink_to("..")
    (src / "hostname.jsonl").symlink_to("/etc/hostname")  # would be a malformed-JSON record if read
    out = tmp_path / "out"
    m = Curation(load_config(data=_tiny(out, [{"path": str(src), "domain": "web"}]))).run()

    c = m["counts"]["all"]
    assert m["records_read"] == c["input"] == 50 and c["quarantined"] == 0
    assert c["kept"] + c["filtered"] + c["duplicate"] == 50 and c["kept"] > 0
    assert m["blank_lines"] == 3 and m["files_read"] == 1
    assert m["skipped_files_by_reason"] == {
        "symlink to a folder inside the input (read there)": 1,
        "symlink leaves the input folder": 2,
    }
    assert len(pq.read_table(out / "ledger.parquet")) == 50
    q = pq.read_table(out / "quarantine" / "quarantined.parquet")
    assert q.num_rows == 0 and q.column_names == ["uid", "doc_id", "source", "domain", "reason", "raw"]
    contract = read_manifest(out)
    assert contract.seq_len == 32 and contract.vocab_size == 300 and m["tokenizer"] == "tokenizer.json"
    assert m["tokenizer_training"]["vocab_size"] == 300
    for split in ("train", "val"):
        assert count_rows(out, split) == m["splits"][split]["sequences"]
    assert m["splits"]["train"]["sequences"] > 0
    assert "3 blank lines" in (out / "report.md").read_text()


def test_nothing_left_to_train_on_is_a_clear_error(ray_local, tmp_path):
    """Every record dropped, or none read at all: every stage runs on what is left (nothing), the
    ledger, quarantine and report say why, no manifest is written, and the error says it."""
    src = tmp_path / "dropped.jsonl"
    src.write_text("".join(json.dumps({"text": f"too short {i}"}) + "\n" for i in range(20)) + "{broken\n")
    out = tmp_path / "out"
    with pytest.raises(EmptyCurationError, match=r"no document was kept: of 21 records, 20 filtered, 0 duplicates, 1 "
                                                 r"quarantined; top reasons: gopher_quality:doc_words<min \(20\)"):  # fmt: skip
        Curation(load_config(data=_tiny(out, [{"path": str(src), "domain": "web"}]))).run()
    led = pq.read_table(out / "ledger.parquet").to_pandas()
    assert len(led) == 21 and led["outcome"].value_counts().to_dict() == {"filtered": 20, "quarantined": 1}
    assert pq.read_table(out / "quarantine" / "quarantined.parquet").num_rows == 1
    assert "No output: no document was kept" in (out / "report.md").read_text()
    assert not (out / "manifest.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.unknown").write_text("not a format curation reads")
    out = tmp_path / "out-empty"
    with pytest.raises(EmptyCurationError, match=r"no record was read \(0 input files\)"):
        Curation(load_config(data=_tiny(out, [{"path": str(empty), "domain": "web"}]))).run()
    assert len(pq.read_table(out / "ledger.parquet")) == 0
    assert pq.read_table(out / "quarantine" / "quarantined.parquet").num_rows == 0
