"""Curation's code-execution labels: documents run in the sandbox, doctests included."""

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from moray.jobs.curate.code_exec import CodeExecConfig, label_batch, read_labels, stage
from moray.jobs.curate.pipeline import Curation, load_config
from moray.platform.data_contract import EXEC_LABELS_COLUMN, read_manifest

RUNS = '''
def add(a, b):
    """
    >>> add(2, 3)
    5
    """
    return a + b

if __name__ == "__main__":
    import doctest
    doctest.testmod()
'''
WRONG_DOCTEST = RUNS.replace(">>> add(2, 3)\n    5", ">>> add(2, 3)\n    6")  # testmod alone exits 0
RAISES = "raise ValueError('no')\n"
READS_STDIN = "n = int(input('n: '))\n"
LOOPS = "while True:\n    pass\n"
NETWORK = "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n"

DOCS = {"ok": RUNS, "doctest": WRONG_DOCTEST, "raises": RAISES, "stdin": READS_STDIN, "loops": LOOPS,
        "net": NETWORK}  # fmt: skip


def test_a_document_runs_when_it_exits_0_and_its_doctests_pass():
    out = label_batch(pd.DataFrame({"uid": list(DOCS), "text": list(DOCS.values())}), 3.0, 512, 2)
    got = dict(zip(out["uid"], zip(out["status"], out["label"])))
    assert got["ok"] == ("passed", 1)
    assert got["doctest"] == ("failed", 0)  # its own __main__ would have exited 0
    assert got["raises"] == ("failed", 0) and got["stdin"] == ("failed", 0) and got["net"] == ("failed", 0)
    assert got["loops"] == ("timeout", 0)


def test_the_stage_labels_the_code_documents_in_the_mix_only(ray_local, tmp_path):
    import ray.data

    rows = [
        {"uid": "c-ok", "domain": "code", "outcome": "kept", "copies": 1, "text": RUNS},
        {"uid": "c-bad", "domain": "code", "outcome": "kept", "copies": 2, "text": RAISES},
        {"uid": "c-dup", "domain": "code", "outcome": "duplicate", "copies": 0, "text": RUNS},
        {"uid": "c-out", "domain": "code", "outcome": "kept", "copies": 0, "text": RUNS},
        {"uid": "w-1", "domain": "web", "outcome": "kept", "copies": 1, "text": "print('prose, not code')"},
    ]
    extra, files = stage(ray.data.from_items(rows), CodeExecConfig(enabled=True, timeout_s=5), tmp_path)
    assert extra == {"programs": 2, "ran": 1, "by_status": {"failed": 1, "passed": 1}}
    assert read_labels(tmp_path) == {"c-bad": 0, "c-ok": 1}
    assert [p.name for p in files] == ["labels.parquet"]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="memory_mb"):
        CodeExecConfig(memory_mb=16)
    with pytest.raises(ValueError, match="timeout_s"):
        CodeExecConfig(timeout_s=0)


def test_curation_packs_each_code_documents_label_on_its_closing_eos(ray_local, tmp_path, corpus):
    """A code tree through the whole pipeline with code_exec on: the labels file, the manifest's
    counts and flag, and shards whose exec_labels are 0/1 exactly at labelled documents' EOS."""
    src = tmp_path / "repo"
    src.mkdir()
    for f in sorted((corpus / "code" / "thealgorithms-python" / "sorts").glob("*_sort.py"))[:12]:
        shutil.copy(f, src / f.name)
    (src / "reads_stdin.py").write_text('"""Asks for a number."""\n' + READS_STDIN * 3)
    out = tmp_path / "out"
    config = {"output": str(out), "sources": [{"path": str(src), "domain": "code"}], "mlflow": False,
              "tokenizer": {"vocab_size": 300, "train_chars": 100_000}, "num_blocks": 2,
              "pack": {"seq_len": 64, "val_fraction": 0.0, "rows_per_shard": 1000},
              "semdedup": {"enabled": False}, "code_exec": {"enabled": True, "timeout_s": 20}}  # fmt: skip
    m = Curation(load_config(data=config)).run()
    labels = read_labels(out)
    kept = m["counts"]["code"]["kept"]
    assert m["code_exec"]["programs"] == len(labels) == kept >= 10
    assert 0 < m["code_exec"]["ran"] < kept  # the sorts run; reading stdin (/dev/null) fails
    assert read_manifest(out).exec_labels and m["columns"][EXEC_LABELS_COLUMN]
    eos = m["special_tokens"]["eos"]
    for shard in m["splits"]["train"]["shards"]:
        t = pq.read_table(out / shard["path"])
        ids = np.array(t.column("input_ids").to_pylist())
        got = np.array(t.column(EXEC_LABELS_COLUMN).to_pylist())
        assert got.shape == ids.shape and set(np.unique(got)) <= {-1, 0, 1}
        assert ((got >= 0) == (ids == eos)).all()  # every document here is labelled code
