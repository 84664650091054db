"""Normalization: Unicode NFC, control characters stripped, whitespace normalized; empty and very
large documents are quarantined (undecodable bytes already were, by the readers).

Code keeps its indentation: only line endings, trailing spaces and control characters change.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# C0/C1 controls except \t and \n; also zero-width and BOM characters that only hide content.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


@dataclass
class NormalizeConfig:
    min_chars: int = 1  # shorter after normalization: quarantined as empty
    max_bytes: int = 8_000_000  # larger documents are quarantined (a whole book is ~1.3 MB)


def normalize_text(text: str, code: bool = False) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if not code:
        text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip("\n") if code else text.strip()


def normalize_row(row: dict, cfg: NormalizeConfig) -> dict:
    """Returns the row with normalized text, or with `error` set (quarantine)."""
    if row["error"]:
        return row
    size = len(row["text"].encode("utf-8", "surrogatepass"))
    if size > cfg.max_bytes:
        row["error"] = f"too large: {size} bytes > max_bytes {cfg.max_bytes}"
        row["raw"] = row["text"].encode("utf-8", "surrogatepass")
        row["text"] = ""
        return row
    try:
        text = normalize_text(row["text"], code=row["domain"] == "code")
        text.encode("utf-8")  # lone surrogates (from JSON "\ud800" escapes) cannot be stored
    except UnicodeEncodeError:
        row["error"] = "invalid unicode: lone surrogate"
        row["raw"] = row["text"].encode("utf-8", "surrogatepass")
        row["text"] = ""
        return row
    if len(text) < cfg.min_chars:
        row["error"] = "empty after normalization"
        row["raw"] = row["text"].encode("utf-8")
        row["text"] = ""
        return row
    row["text"] = text
    return row
