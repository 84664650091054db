"""Readers: files, folders, globs or pyarrow-filesystem URIs -> one row per input record.

Every record the sources contain becomes exactly one row, good or bad, so the ledger can account
for all of them. A bad record is not an exception: it is a row with `error` set (the reason) and
`raw` holding its bytes, and the pipeline sends it to quarantine. Rows have one fixed schema
(empty strings instead of nulls, so Ray Data never has to unify a null-typed block):

    doc_id, source, domain, format, lang, text, error, raw (bytes; only for bad records)

Formats (by extension unless the source says otherwise): JSON lines (.jsonl/.ndjson/.json, plain
or .gz), Parquet, plain text (.txt/.md: whole file or split on blank lines), LaTeX (.tex) and
reStructuredText (.rst) kept as text, HTML (.htm/.html, main text extracted), WARC (.warc[.gz]:
HTTP responses, HTML main text extracted with resiliparse), and source code (a document per file,
language from the extension).
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

CODE_EXTENSIONS = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".java": "java", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".go": "go", ".rs": "rust", ".rb": "ruby", ".sh": "shell",
    ".php": "php", ".scala": "scala", ".kt": "kotlin", ".swift": "swift", ".cs": "csharp", ".jl": "julia",
}  # fmt: skip
TEXT_EXTENSIONS = {".txt": "text", ".md": "text", ".tex": "latex", ".rst": "rst"}
KNOWN_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".warc", ".htm", ".html")


@dataclass
class SourceConfig:
    path: str  # a file, a folder, a glob (`dir/*.txt`) or a URI (`s3://bucket/prefix`)
    domain: str = "web"
    format: str = "auto"  # auto | jsonl | parquet | text | warc | html | code
    split: str = "whole"  # for plain text: whole | blank_line
    text_field: str = "text"
    id_field: str = "id"
    lang_field: str = "lang"
    include: list[str] = field(default_factory=list)  # glob patterns on file names (folders)
    max_records: int | None = None  # cap per file (tests, quick runs)

    def __post_init__(self):
        if self.format not in ("auto", "jsonl", "parquet", "text", "warc", "html", "code"):
            raise ValueError(f"format={self.format!r}: one of auto, jsonl, parquet, text, warc, html, code")
        if self.split not in ("whole", "blank_line"):
            raise ValueError(f"split={self.split!r}: one of whole, blank_line")


def _row(doc_id, source, domain, fmt, text="", lang="", error="", raw=b""):
    return {
        "doc_id": str(doc_id), "source": source, "domain": domain, "format": fmt, "lang": lang or "",
        "text": text, "error": error, "raw": raw,
    }  # fmt: skip


# -- discovery ------------------------------------------------------------------------------------


def _fs_and_path(path: str):
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser())


def format_of(path: str, fmt: str = "auto") -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".warc":
        return "warc"
    if suffix in (".htm", ".html"):
        return "html"
    if suffix in TEXT_EXTENSIONS:
        return "text"
    if suffix in CODE_EXTENSIONS:
        return "code"
    return None  # unknown: not read (counted as a skipped file)


def discover(src: SourceConfig) -> tuple[list[dict], list[str]]:
    """Expand one source into read tasks (one per file) and the files skipped (unknown kind)."""
    import pyarrow.fs as pafs

    path = src.path
    pattern = None
    if any(c in Path(path).name for c in "*?["):
        path, pattern = str(Path(path).parent), Path(path).name
    fs, root = _fs_and_path(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source {src.path!r} does not exist")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        files = sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File
        )
    prefix = path.split("://", 1)[0] + "://" if "://" in path else ""
    tasks, skipped = [], []
    for f in files:
        name = Path(f).name
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        if src.include and not any(fnmatch.fnmatch(name, p) for p in src.include):
            continue
        fmt = format_of(f, src.format)
        if fmt is None or (src.domain == "code" and src.format == "auto" and fmt != "code"):
            skipped.append(prefix + f)
            continue
        tasks.append({"path": prefix + f, "format": fmt, "domain": src.domain, "split": src.split,
                      "text_field": src.text_field, "id_field": src.id_field, "lang_field": src.lang_field,
                      "max_records": src.max_records or 0})  # fmt: skip
    return tasks, skipped


def read_bytes(path: str) -> bytes:
    fs, p = _fs_and_path(path)
    with fs.open_input_stream(p, compression=None) as f:  # we decompress: truncation must be seen
        return f.read()


# -- per-format readers: each yields rows --------------------------------------------------------


def _is_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]


def _gunzip(data: bytes) -> tuple[bytes, str]:
    """Decompress what can be decompressed; a truncated or corrupt stream returns its error."""
    d = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, auto-detected
    try:
        out = d.decompress(data)
    except zlib.error as e:
        return b"", f"corrupt gzip: {e}"
    if not d.eof:
        return out, "truncated gzip: compressed stream ends before its end-of-stream marker"
    return out, ""


def read_jsonl(task: dict, data: bytes):
    path, domain = task["path"], task["domain"]
    error = ""
    if path.endswith(".gz"):
        data, error = _gunzip(data)
    lines = data.split(b"\n")
    if error and lines:  # the last (partial) line belongs to the truncated tail
        tail = lines.pop()
        yield _row(f"{path}:{len(lines) + 1}", path, domain, "jsonl", error=error, raw=tail)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        doc_id = f"{path}:{n}"
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _row(
                doc_id, path, domain, "jsonl", error=f"invalid utf-8: {e.reason} at byte {e.start}", raw=line
            )
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            yield _row(doc_id, path, domain, "jsonl", error=f"malformed json: {e.msg}", raw=line)
            continue
        if not isinstance(obj, dict):
            yield _row(doc_id, path, domain, "jsonl", error=f"not an object: {type(obj).__name__}", raw=line)
            continue
        if isinstance(obj.get(task["id_field"]), str | int):
            doc_id = str(obj[task["id_field"]])
        text = obj.get(task["text_field"])
        if text is None:
            yield _row(
                doc_id, path, domain, "jsonl", error=f"missing text field {task['text_field']!r}", raw=line
            )
            continue
        if not isinstance(text, str):
            yield _row(
                doc_id, path, domain, "jsonl", error=f"non-string text: {type(text).__name__}", raw=line
            )
            continue
        lang = obj.get(task["lang_field"])
        yield _row(doc_id, path, domain, "jsonl", text=text, lang=lang if isinstance(lang, str) else "")


def read_parquet(task: dict, data: bytes):
    import pyarrow.parquet as pq

    path, domain = task["path"], task["domain"]
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # a damaged file is one bad record: the file itself
        yield _row(path, path, domain, "parquet", error=f"unreadable parquet: {e}", raw=data)
        return
    cols = table.column_names
    texts = (
        table.column(task["text_field"]).to_pylist()
        if task["text_field"] in cols
        else [None] * table.num_rows
    )
    ids = table.column(task["id_field"]).to_pylist() if task["id_field"] in cols else [None] * table.num_rows
    langs = (
        table.column(task["lang_field"]).to_pylist()
        if task["lang_field"] in cols
        else [None] * table.num_rows
    )
    for i, (text, doc_id, lang) in enumerate(zip(texts, ids, langs)):
        doc_id = str(doc_id) if doc_id is not None else f"{path}:{i}"
        if not isinstance(text, str):
            err = f"missing text field {task['text_field']!r}" if text is None else "non-string text"
            yield _row(doc_id, path, domain, "parquet", error=err, raw=repr(text).encode())
            continue
        yield _row(doc_id, path, domain, "parquet", text=text, lang=lang if isinstance(lang, str) else "")


def _decode_or_row(doc_id, path, domain, fmt, data: bytes, lang=""):
    try:
        return _row(doc_id, path, domain, fmt, text=data.decode("utf-8"), lang=lang)
    except UnicodeDecodeError as e:
        return _row(doc_id, path, domain, fmt, error=f"invalid utf-8: {e.reason} at byte {e.start}", raw=data)


def read_text(task: dict, data: bytes):
    path, domain = task["path"], task["domain"]
    fmt = TEXT_EXTENSIONS.get(Path(path.removesuffix(".gz")).suffix, "text")
    if path.endswith(".gz"):
        data, error = _gunzip(data)
        if error:
            yield _row(path, path, domain, fmt, error=error, raw=data)
            return
    if _is_binary(data):
        yield _row(path, path, domain, fmt, error="binary file (NUL bytes)", raw=data)
        return
    if task["split"] == "whole":
        yield _decode_or_row(path, path, domain, fmt, data)
        return
    # Split on blank lines (bytes first, so one undecodable paragraph costs only that paragraph).
    data = data.replace(b"\r\n", b"\n")
    line_no, para, start = 0, [], 1
    for line in data.split(b"\n") + [b""]:
        line_no += 1
        if line.strip():
            if not para:
                start = line_no
            para.append(line)
        elif para:
            yield _decode_or_row(f"{path}:{start}", path, domain, fmt, b"\n".join(para))
            para = []


def read_code(task: dict, data: bytes):
    path, domain = task["path"], task["domain"]
    lang = CODE_EXTENSIONS.get(Path(path).suffix, "")
    if _is_binary(data):
        yield _row(path, path, domain, "code", lang=lang, error="binary file (NUL bytes)", raw=data)
        return
    yield _decode_or_row(path, path, domain, "code", data, lang=lang)


def html_to_text(html: bytes | str, main_content: bool = True) -> str:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    if isinstance(html, bytes):
        html = bytes_to_str(html, detect_encoding(html))
    return extract_plain_text(html, main_content=main_content, alt_texts=False, links=False)


def read_html(task: dict, data: bytes):
    path, domain = task["path"], task["domain"]
    if _is_binary(data):
        yield _row(path, path, domain, "html", error="binary file (NUL bytes)", raw=data)
        return
    # A whole book in HTML is all content: keep everything, not just the "main" block.
    yield _row(path, path, domain, "html", text=html_to_text(data, main_content=False))


def read_warc(task: dict, data: bytes):
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    path, domain = task["path"], task["domain"]
    n = 0
    try:
        for rec in ArchiveIterator(io.BytesIO(data), record_types=WarcRecordType.response, parse_http=True):
            n += 1
            uri = rec.headers.get("WARC-Target-URI", "") or f"{path}:{n}"
            doc_id = rec.headers.get("WARC-Record-ID", "") or uri
            body = rec.reader.read()
            ctype = (rec.http_headers.get("Content-Type", "") if rec.http_headers else "").lower()
            if "html" not in ctype:
                yield _row(
                    doc_id, path, domain, "warc", error=f"unsupported content-type {ctype!r}", raw=body
                )
                continue
            yield _row(doc_id, path, domain, "warc", text=html_to_text(body))
    except Exception as e:  # a corrupt/truncated archive: what follows the last good record
        yield _row(f"{path}:{n + 1}", path, domain, "warc", error=f"corrupt warc: {e}", raw=b"")


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text, "code": read_code,
           "html": read_html, "warc": read_warc}  # fmt: skip


def read_task(task: dict) -> list[dict]:
    """Ray Data flat_map body: one file -> its rows (capped at max_records)."""
    try:
        data = read_bytes(task["path"])
    except OSError as e:
        row = _row(task["path"], task["path"], task["domain"], task["format"], error=f"unreadable file: {e}")
        return [{**row, "uid": f"{task['path']}#0"}]
    rows = []
    for row in READERS[task["format"]](task, data):
        row["uid"] = f"{task['path']}#{len(rows)}"  # unique even where doc_ids repeat across files
        rows.append(row)
        if task["max_records"] and len(rows) >= task["max_records"]:
            break
    return rows


def read_local(tasks: list[dict]) -> list[dict]:
    """Plain-Python reading (tests, small inputs): the same rows Ray Data would produce."""
    return [row for t in tasks for row in read_task(t)]


def gzip_bytes(data: bytes) -> bytes:  # used by tests and the benchmark to build inputs
    return gzip.compress(data)
