import gzip
import json

from moray.jobs.curate.readers import SourceConfig, discover, read_local


def _read(path, **kw):
    tasks, skipped = discover(SourceConfig(path=str(path), **kw))
    return read_local(tasks)


def test_every_bad_jsonl_kind_is_a_row_with_its_reason(tmp_path):
    lines = [
        json.dumps({"id": "good", "text": "fine text"}).encode(),
        b'{"text": "unterminated',
        b"[1, 2, 3]",
        json.dumps({"id": "x", "body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        b'{"text": "caf\xe9"}',  # latin-1 byte: not UTF-8
    ]
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    rows = _read(p)
    assert len(rows) == 6
    assert rows[0]["doc_id"] == "good" and rows[0]["text"] == "fine text" and not rows[0]["error"]
    errors = [r["error"].split(":")[0] for r in rows[1:]]
    assert errors == [
        "malformed json",
        "not an object",
        "missing text field 'text'",
        "non-string text",
        "invalid utf-8",
    ]
    assert rows[1]["doc_id"].endswith("bad.jsonl:2") and rows[1]["raw"] == lines[1]


def test_truncated_gzip_keeps_the_good_lines_and_quarantines_the_tail(tmp_path):
    data = gzip.compress(
        b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200))
    )
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    rows = _read(p)
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["error"].startswith("truncated gzip")
    assert 0 < len(good) < 200


def test_real_gzipped_ccnet_jsonl(corpus):
    rows = _read(corpus / "web" / "cc_en_head-0091.jsonl.gz")
    assert rows and all(not r["error"] for r in rows)
    assert rows[0]["doc_id"].startswith("http")  # its own `id` field


def test_text_blank_line_split_ids_and_binary(tmp_path, corpus):
    rows = _read(corpus / "academic" / "abc-science.txt", split="blank_line", max_records=5)
    assert len(rows) == 5 and rows[0]["doc_id"].endswith("abc-science.txt:1")
    assert all(":" in r["doc_id"] for r in rows)
    b = tmp_path / "blob.txt"
    b.write_bytes(b"\x89PNG\x00\x00\x01binary")
    (row,) = _read(b)
    assert row["error"].startswith("binary file") and row["raw"].startswith(b"\x89PNG")


def test_code_tree_parquet_warc_html(corpus):
    rows = _read(corpus / "code" / "thealgorithms-python" / "sorts", domain="code")
    assert len(rows) > 40 and {r["lang"] for r in rows} == {"python"}
    tasks, skipped = discover(SourceConfig(path=str(corpus / "code" / "thealgorithms-python"), domain="code"))
    assert len(tasks) == 1385 and any(s["path"].endswith("LICENSE.md") for s in skipped)
    rows = _read(corpus / "web" / "c4-validation-2k.parquet", max_records=10)
    assert len(rows) == 10 and all(len(r["text"]) > 0 for r in rows)
    rows = _read(corpus / "web" / "commoncrawl-sample-0000.warc.gz")
    html = [r for r in rows if not r["error"]]
    assert len(html) >= 10 and "<div" not in html[0]["text"] and html[0]["doc_id"].startswith("<urn:uuid:")
    (book,) = _read(corpus / "books" / "moby-dick" / "2701-h.htm", domain="books")
    assert "Call me Ishmael" in book["text"] and "<p>" not in book["text"]


def test_symlink_loops_end_and_each_file_is_read_once(tmp_path):
    """`loop -> .` and `up -> ..` inside a code tree: discovery ends, each real file is one task,
    and every link not followed is reported with its reason (issue 17)."""
    root = tmp_path / "t"
    pkg = root / "pkg"
    pkg.mkdir(parents=True)
    for name in ("a.py", "b.py"):
        (pkg / name).write_text("x = 1\n")
    (root / "top.py").write_text("y = 2\n")
    (pkg / "loop").symlink_to(".")
    (pkg / "up").symlink_to("..")
    (pkg / "again.py").symlink_to("a.py")  # a second name for a file inside the tree
    tasks, skipped = discover(SourceConfig(path=str(root), domain="code"))
    assert sorted(t["path"] for t in tasks) == [str(pkg / "a.py"), str(pkg / "b.py"), str(root / "top.py")]
    assert {s["path"]: s["reason"] for s in skipped} == {
        str(pkg / "loop"): "symlink to a folder inside the input (read there)",
        str(pkg / "up"): "symlink to a folder inside the input (read there)",  # t/pkg/.. is t
        str(pkg / "again.py"): "same file as one read",
    }
    assert [s["read_as"] for s in skipped if "read_as" in s] == [str(pkg / "a.py")]
    assert [r["text"] for r in read_local(tasks)] == ["x = 1\n", "x = 1\n", "y = 2\n"]
    # from pkg, `up` leads out of the input: not followed either
    tasks, skipped = discover(SourceConfig(path=str(pkg), domain="code"))
    assert [t["path"] for t in tasks] == [str(pkg / "a.py"), str(pkg / "b.py")]
    assert {s["path"]: s["reason"] for s in skipped}[str(pkg / "up")] == "symlink leaves the input folder"


def test_symlinks_out_of_the_input_are_not_read(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the corpus")
    root = tmp_path / "in"
    root.mkdir()
    (root / "doc.txt").write_text("part of the corpus")
    (root / "outside.txt").symlink_to(outside)
    (root / "hostname.txt").symlink_to("/etc/hostname")
    (root / "etc").symlink_to("/etc")
    (root / "dangling.txt").symlink_to(root / "nowhere")
    tasks, skipped = discover(SourceConfig(path=str(root)))
    assert [r["text"] for r in read_local(tasks)] == ["part of the corpus"]
    assert {s["path"]: s["reason"] for s in skipped} == {
        str(root / "outside.txt"): "symlink leaves the input folder",
        str(root / "hostname.txt"): "symlink leaves the input folder",
        str(root / "etc"): "symlink leaves the input folder",
        str(root / "dangling.txt"): "broken symlink",
    }
    # a file the user names is read even where it is a link: the user chose it
    (named,) = read_local(discover(SourceConfig(path=str(root / "outside.txt")))[0])
    assert named["text"] == "not part of the corpus"


def test_blank_lines_are_not_records_but_are_counted(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'\n{"text": "one"}\n  \n\n{"text": "two"}\n\r\n')
    rows = _read(p)
    assert [r["text"] for r in rows] == ["one", "two"]
    assert [r["blank_lines"] for r in rows] == [4, 0]  # the count rides on the file's first row
    assert rows[1]["doc_id"].endswith("b.jsonl:5")  # line numbers still count the blank lines
    e = tmp_path / "e.jsonl"
    e.write_bytes(b"\n \n")
    (row,) = _read(e)  # no record at all: the file is one quarantined row, as an empty text file is
    assert row["error"] == "no records in file" and row["blank_lines"] == 2
