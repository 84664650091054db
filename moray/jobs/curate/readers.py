"""Readers: files, folders, globs or pyarrow-filesystem URIs -> one row per input record.

Every record the sources contain becomes exactly one row, good or bad, so the ledger can account
for all of them. A bad record is not an exception: it is a row with `error` set (the reason) and
`raw` holding its bytes, and the pipeline sends it to quarantine. Rows have one fixed schema
(empty strings instead of nulls, so Ray Data never has to unify a null-typed block):

    doc_id, source, domain, format, lang, text, error, raw (bytes; only for bad records),
    blank_lines (JSON lines: the blank lines of the file, on its first row; they are not records)

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
import os
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


def _row(doc_id, source, domain, fmt, text="", lang="", error="", raw=b"", blank_lines=0):
    return {
        "doc_id": str(doc_id), "source": source, "domain": domain, "format": fmt, "lang": lang or "",
        "text": text, "error": error, "raw": raw, "blank_lines": blank_lines,
    }  # fmt: skip


# -- discovery ------------------------------------------------------------------------------------


def fs_and_path(path: str):
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


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _local_files(root: str) -> tuple[list[dict], list[dict]]:
    """The files under a local folder: [{path, size, mtime_ns, real}] and the entries not read,
    [{path, reason}]. Symlinks are never followed out of the folder (`up -> ..`, `x -> /etc/...`)
    nor into a folder of it (`loop -> .`: its files are read where they are), so discovery ends
    and reads each real file once; a file symlink inside the folder is kept, to be deduplicated
    against its target by the caller."""
    real_root = os.path.realpath(root)
    files, skipped = [], []

    def unreadable(e: OSError):
        skipped.append({"path": e.filename, "reason": f"unreadable folder: {e.strerror}"})

    # followlinks=False: a symlinked folder is listed in `dirs` but not entered
    for dirpath, dirs, names in os.walk(root, onerror=unreadable):
        dirs.sort()
        for name in dirs:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                inside = _inside(os.path.realpath(p), real_root)
                skipped.append({"path": p, "reason": "symlink to a folder inside the input (read there)" if inside
                                else "symlink leaves the input folder"})  # fmt: skip
        for name in names:
            p = os.path.join(dirpath, name)
            real = os.path.realpath(p)
            if os.path.islink(p) and not _inside(real, real_root):
                skipped.append({"path": p, "reason": "symlink leaves the input folder"})
                continue
            try:
                st = os.stat(p)
            except OSError as e:
                skipped.append(
                    {"path": p, "reason": "broken symlink" if os.path.islink(p) else f"unreadable: {e}"}
                )
                continue
            files.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "real": real,
                          "link": os.path.islink(p)})  # fmt: skip
    return sorted(files, key=lambda f: f["path"]), skipped


def discover(src: SourceConfig) -> tuple[list[dict], list[dict]]:
    """Expand one source into read tasks (one per file, each real file once) and the entries not
    read: [{path, reason}] (unknown kinds, symlinks not followed; a repeated file also names the
    path it is read as, `read_as`)."""
    import pyarrow.fs as pafs

    path = src.path
    pattern = None
    if any(c in Path(path).name for c in "*?["):
        path, pattern = str(Path(path).parent), Path(path).name
    fs, root = fs_and_path(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source {src.path!r} does not exist")
    skipped = []
    if info.type == pafs.FileType.File:  # named by the user: read even where it is a symlink
        real = root if "://" in path else os.path.realpath(root)
        files = [{"path": root, "size": info.size, "mtime_ns": info.mtime_ns, "real": real, "link": False}]
    elif "://" in path:  # object stores have no symlinks
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(({"path": i.path, "size": i.size, "mtime_ns": i.mtime_ns, "real": i.path, "link": False}
                        for i in listing if i.type == pafs.FileType.File), key=lambda f: f["path"])  # fmt: skip
    else:
        files, skipped = _local_files(root)
    prefix = path.split("://", 1)[0] + "://" if "://" in path else ""
    chosen = []
    for f in files:
        name = Path(f["path"]).name
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        if src.include and not any(fnmatch.fnmatch(name, p) for p in src.include):
            continue
        fmt = format_of(f["path"], src.format)
        if fmt is None:
            skipped.append({"path": prefix + f["path"], "reason": "unknown file kind"})
            continue
        if src.domain == "code" and src.format == "auto" and fmt != "code":
            skipped.append({"path": prefix + f["path"], "reason": "not source code (code domain)"})
            continue
        chosen.append((f, fmt))
    tasks, read_at = [], {}
    for f, fmt in sorted(chosen, key=lambda c: (c[0]["link"], c[0]["path"])):  # a file before links to it
        if f["real"] in read_at:
            skipped.append(
                {"path": prefix + f["path"], "reason": "same file as one read", "read_as": read_at[f["real"]]}
            )
            continue
        read_at[f["real"]] = prefix + f["path"]
        tasks.append({"path": prefix + f["path"], "format": fmt, "domain": src.domain, "split": src.split,
                      "text_field": src.text_field, "id_field": src.id_field, "lang_field": src.lang_field,
                      "max_records": src.max_records or 0, "real_path": prefix + f["real"],
                      # what a re-run compares to see whether the input changed
                      "size": f["size"], "mtime_ns": f["mtime_ns"]})  # fmt: skip
    return sorted(tasks, key=lambda t: t["path"]), skipped


def read_bytes(path: str) -> bytes:
    fs, p = fs_and_path(path)
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


def _jsonl_record(task: dict, doc_id: str, line: bytes) -> dict:
    path, domain = task["path"], task["domain"]
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return _row(
            doc_id, path, domain, "jsonl", error=f"invalid utf-8: {e.reason} at byte {e.start}", raw=line
        )
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return _row(doc_id, path, domain, "jsonl", error=f"malformed json: {e.msg}", raw=line)
    if not isinstance(obj, dict):
        return _row(doc_id, path, domain, "jsonl", error=f"not an object: {type(obj).__name__}", raw=line)
    if isinstance(obj.get(task["id_field"]), str | int):
        doc_id = str(obj[task["id_field"]])
    text = obj.get(task["text_field"])
    if text is None:
        return _row(
            doc_id, path, domain, "jsonl", error=f"missing text field {task['text_field']!r}", raw=line
        )
    if not isinstance(text, str):
        return _row(doc_id, path, domain, "jsonl", error=f"non-string text: {type(text).__name__}", raw=line)
    lang = obj.get(task["lang_field"])
    return _row(doc_id, path, domain, "jsonl", text=text, lang=lang if isinstance(lang, str) else "")


def read_jsonl(task: dict, data: bytes):
    """One row per non-blank line. Blank lines are not records (no row, no ledger entry): the
    file's first row carries their count, for the manifest. A file without a single record is one
    quarantined row, as an empty text file is."""
    path, domain = task["path"], task["domain"]
    error = ""
    if path.endswith(".gz"):
        data, error = _gunzip(data)
    lines = data.split(b"\n")
    tail = None
    if error and lines:  # the last (partial) line belongs to the truncated tail
        tail = _row(f"{path}:{len(lines)}", path, domain, "jsonl", error=error, raw=lines.pop())
    elif lines and not lines[-1]:
        lines.pop()  # what follows the final newline is not a line
    blank = sum(1 for line in lines if not line.strip())  # a cheap scan: rows are made lazily (max_records)
    rows = (_jsonl_record(task, f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip())
    first = tail or next(rows, None)
    if first is None:
        first = _row(path, path, domain, "jsonl", error="no records in file", raw=data)
    first["blank_lines"] = blank
    yield first
    yield from rows


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
