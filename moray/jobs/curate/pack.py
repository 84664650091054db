"""Tokenize and pack: documents -> sequences of seq_len + 1 token ids, EOS after every document.

The split is per document (a hash of its uid), so a document and all its mix copies land on one
side and validation never sees training text. Per split and domain, documents (with their mix
copies) are laid out in a seeded random order, concatenated with EOS after each and cut into
windows of seq_len + 1 (inputs = w[:-1], labels = w[1:]); the last partial window is dropped and
counted. Every sequence holds one domain. The sequences of a split are shuffled (seeded) and
written as Parquet shards in the data contract's schema (`data_contract.packed_table`).

Translation groups (`pair_id`, from the crosslingual stage) are laid out as one unit: the split
is per group, and a group's documents follow each other in the stream (in a seeded order), so the
model sees a document next to its translation. A group that would straddle a window boundary
but fits in one window waits until a window's remainder holds it (`lay_out`). Without groups the
layout is exactly the one of plain documents.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moray.jobs.curate.mixing import MixConfig, plan
from moray.platform.data_contract import packed_table, special_tokens_of
from moray.platform.files import sha256_file

_TOKENIZERS: dict[str, object] = {}


@dataclass
class PackConfig:
    seq_len: int = 1024
    val_fraction: float = 0.02
    rows_per_shard: int = 4096
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len}: must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}: must be in [0, 1)")


def split_of(uid: str, val_fraction: float, seed: int = 0) -> str:
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "little")
    return "val" if h / 2**64 < val_fraction else "train"


def tokenize_batch(batch, tokenizer_json: str):
    """map_batches body: (uid, domain, text[, pair_id]) -> ids (int32 array) per document."""
    from tokenizers import Tokenizer

    key = hashlib.blake2b(tokenizer_json.encode(), digest_size=8).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    tok = _TOKENIZERS[key]
    enc = tok.encode_batch(list(batch["text"]), add_special_tokens=False)
    out = {
        "uid": batch["uid"],
        "domain": batch["domain"],
        "ids": [np.asarray(e.ids, dtype=np.int32) for e in enc],
    }
    if "pair_id" in batch:
        out["pair_id"] = batch["pair_id"]
    return out


def lay_out(
    units: list[list[np.ndarray]], width: int, max_waiting: int = 16
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Units (a document, or a translation group's documents, each with its EOS) in order -> the
    documents in stream order, and each group's (start, length) in the stream.

    A group that would cross a window boundary although it fits in one window waits (up to
    `max_waiting` of them), and the units after it move up, until the current window's remainder
    holds it: the group then lands in one sequence. At the end, the groups still waiting go where
    they fit, else in order. Units of one document never wait, so without groups this is the plain
    concatenation."""
    stream: list[np.ndarray] = []
    placed: list[tuple[int, int]] = []
    waiting: list[tuple[list[np.ndarray], int]] = []
    pos = 0

    def put(unit: list[np.ndarray], n: int) -> None:
        nonlocal pos
        if len(unit) > 1:
            placed.append((pos, n))
        stream.extend(unit)
        pos += n

    def first_fit() -> int | None:
        return next((k for k, (_, n) in enumerate(waiting) if pos % width + n <= width), None)

    for unit in units:
        n = sum(len(d) for d in unit)
        if len(unit) > 1 and n <= width and pos % width + n > width and len(waiting) < max_waiting:
            waiting.append((unit, n))
        else:
            put(unit, n)
        while (k := first_fit()) is not None:  # the position moved: waiting groups that fit now go
            put(*waiting.pop(k))
    while waiting:
        k = first_fit()
        put(*waiting.pop(0 if k is None else k))
    return stream, placed


def pack(
    docs: list[tuple[str, str, np.ndarray]],
    cfg: PackConfig,
    eos: int,
    ratios: dict[str, float],
    groups: dict[str, str] | None = None,
    exec_labels: dict[str, int] | None = None,
) -> dict:
    """[(uid, domain, ids)] -> {split: {"seqs": (N, seq_len+1) int32, "domains": [...], "tokens": {domain: n},
    "dropped_tokens": {domain: n}, "translation_groups": {"laid_out": n, "in_one_sequence": n}}}.
    Deterministic for a seed whatever the input order.

    `ratios[domain]` is the mix's sampling ratio: the domain's documents are laid out ceil(ratio)
    times (each pass in a fresh seeded order) and the first round(ratio * tokens / width) windows
    are kept, so the mix is met at sequence granularity even when one document is a whole book.
    `groups` ({uid: pair_id}) keeps each translation group's documents together (module doc).
    `exec_labels` ({uid: 0 or 1}, curation's code_exec stage): each split also gets "exec_labels",
    (N, seq_len+1) int8 aligned with "seqs": the document's label on its closing EOS, -1 elsewhere."""
    groups = groups or {}
    labels = exec_labels or {}
    width = cfg.seq_len + 1
    units: dict[tuple[str, str], dict[str, list]] = {}
    for uid, domain, ids in sorted(docs, key=lambda d: d[0]):
        key = groups.get(uid) or uid  # a translation group is one unit: one split, laid out together
        split = split_of(key, cfg.val_fraction, cfg.seed)
        # (n + 1, 2): the ids with their EOS, beside the labels (-1, or the document's on its EOS)
        doc = np.full((len(ids) + 1, 2), -1, np.int32)
        doc[:-1, 0], doc[-1, 0], doc[-1, 1] = ids, eos, labels.get(uid, -1)
        units.setdefault((split, domain), {}).setdefault(key, []).append(doc)
    out = {s: {"seqs": [], "labels": [], "domains": [], "dropped_tokens": {}, "tokens": {},
               "translation_groups": {"laid_out": 0, "in_one_sequence": 0}} for s in ("train", "val")}  # fmt: skip
    for (split, domain), by_key in sorted(units.items()):
        ratio = ratios.get(domain, 1.0)
        if ratio <= 0:
            continue
        items = list(by_key.values())
        rng = np.random.default_rng([cfg.seed, sum(map(ord, split + domain))])
        order = []
        for _ in range(math.ceil(ratio)):
            for i in rng.permutation(len(items)):
                members = items[i]
                if len(members) > 1:  # a group: its documents in a seeded order (no draw for one)
                    members = [members[k] for k in rng.permutation(len(members))]
                order.append(members)
        passes, placed = lay_out(order, width)
        stream, stream_labels = np.concatenate(passes).T  # (n,), (n,)
        once = len(stream) / math.ceil(ratio)
        n_seq = min(len(stream) // width, round(ratio * once / width))
        o = out[split]
        kept = [(p, n) for p, n in placed if p + n <= n_seq * width]  # groups laid out in kept windows
        o["translation_groups"]["laid_out"] += len(kept)
        o["translation_groups"]["in_one_sequence"] += sum(p // width == (p + n - 1) // width for p, n in kept)
        o["seqs"].append(stream[: n_seq * width].reshape(n_seq, width))
        o["labels"].append(stream_labels[: n_seq * width].reshape(n_seq, width).astype(np.int8))
        o["domains"] += [domain] * n_seq
        o["dropped_tokens"][domain] = int(len(stream) - n_seq * width)
        o["tokens"][domain] = int(n_seq * width)
    for split, o in out.items():
        seqs = np.concatenate(o["seqs"]) if o["seqs"] else np.zeros((0, width), np.int32)
        perm = np.random.default_rng([cfg.seed, 7 if split == "train" else 11]).permutation(len(seqs))
        o["seqs"] = seqs[perm]
        o["domains"] = [o["domains"][i] for i in perm]
        labels_of = np.concatenate(o.pop("labels")) if o["labels"] else np.zeros((0, width), np.int8)
        if exec_labels is not None:
            o["exec_labels"] = labels_of[perm]
    return out


def write_shards(
    out_dir: Path, split: str, seqs: np.ndarray, domains: list[str], cfg: PackConfig, labels=None
) -> list[dict]:
    """One split's sequences -> `<out>/<split>/<split>-NNNNN.parquet` in the data contract's schema.
    A split without sequences still gets one (empty) shard: the output then says "0 sequences"
    rather than lacking the split."""
    d = out_dir / split
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.parquet"):
        old.unlink()
    shards = []
    for k, start in enumerate(range(0, max(len(seqs), 1), cfg.rows_per_shard)):
        part = seqs[start : start + cfg.rows_per_shard]
        path = d / f"{split}-{k:05d}.parquet"
        part_labels = None if labels is None else labels[start : start + cfg.rows_per_shard]
        pq.write_table(packed_table(part, domains[start : start + cfg.rows_per_shard], part_labels), path)
        shards.append({"path": f"{split}/{path.name}", "rows": len(part), "tokens": int(part.size),
                       "bytes": path.stat().st_size, "sha256": sha256_file(path)})  # fmt: skip
    return shards


def stage(
    ds, tokenizer_path: Path, cfg: PackConfig, mix: MixConfig, out_dir: Path, exec_labels: dict | None = None
) -> tuple[dict, list[Path]]:
    """The kept documents in the mix -> tokenized -> packed -> train/val shards (with the code-execution
    labels column when `exec_labels` is given). The mix is planned again on real token counts.
    Returns (report data, the shard files)."""
    from tokenizers import Tokenizer

    tokenizer_json = Path(tokenizer_path).read_text()
    in_mix = ds.map_batches(
        lambda df: df[(df["outcome"] == "kept") & (df["copies"] > 0)], batch_format="pandas"
    )
    cols = ["uid", "domain", "text", "copies"] + (["pair_id"] if "pair_id" in ds.schema().names else [])
    toks = in_mix.select_columns(cols).map_batches(
        tokenize_batch, fn_kwargs={"tokenizer_json": tokenizer_json}, batch_format="numpy", batch_size=128
    )
    docs, groups = [], {}
    for b in toks.iter_batches(batch_format="numpy", batch_size=1024):
        docs += list(zip(b["uid"], b["domain"], b["ids"]))
        if "pair_id" in b:
            groups.update({u: g for u, g in zip(b["uid"], b["pair_id"]) if g})
    tok = Tokenizer.from_str(tokenizer_json)
    special = special_tokens_of(tok)
    available: dict[str, float] = {}
    for _, d, ids in docs:
        available[d] = available.get(d, 0.0) + len(ids) + 1
    mix_plan = plan(available, mix) if mix.enabled else {}
    ratios = {d: p["ratio"] for d, p in mix_plan.items()} if mix_plan else {d: 1.0 for d in available}
    packed = pack(docs, cfg, special.eos, ratios, groups, exec_labels)
    translation_groups = {"groups": len(set(groups.values())), "documents": len(groups),
                          "laid_out": sum(o["translation_groups"]["laid_out"] for o in packed.values()),
                          "in_one_sequence": sum(o["translation_groups"]["in_one_sequence"] for o in packed.values())}  # fmt: skip
    splits, files = {}, []
    for split, o in packed.items():
        shards = write_shards(out_dir, split, o["seqs"], o["domains"], cfg, o.get("exec_labels"))
        files += [out_dir / s["path"] for s in shards]
        splits[split] = {"sequences": int(len(o["seqs"])), "tokens": int(o["seqs"].size), "shards": shards,
                         "tokens_per_domain": o["tokens"], "dropped_tail_tokens": o["dropped_tokens"]}  # fmt: skip
    extra = {"splits": splits, "special_tokens": special.as_dict(), "vocab_size": tok.get_vocab_size(),
             "documents": len(docs), "doc_tokens": int(sum(len(d[2]) for d in docs)), "mix_tokens": mix_plan,
             "translation_groups": translation_groups}  # fmt: skip
    return extra, files
