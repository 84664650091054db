from moray.jobs.curate.normalize import NormalizeConfig, normalize_row, normalize_text


def _row(text, domain="web"):
    return {"text": text, "domain": domain, "error": "", "raw": b""}


def test_nfc_controls_whitespace():
    assert normalize_text("Cafe\u0301\x07  a\t\tb \r\n\r\n\r\n\r\nc\u200b") == "Café a b\n\nc"


def test_code_keeps_indentation():
    assert normalize_text("def f():\r\n    return 1   \r\n", code=True) == "def f():\n    return 1"


def test_empty_and_huge_are_quarantined():
    assert normalize_row(_row(" \x00 \n "), NormalizeConfig())["error"] == "empty after normalization"
    r = normalize_row(_row("x" * 101), NormalizeConfig(max_bytes=100))
    assert r["error"].startswith("too large") and len(r["raw"]) == 101
    assert normalize_row(_row("bad \ud800 surrogate"), NormalizeConfig())["error"].startswith(
        "invalid unicode"
    )
