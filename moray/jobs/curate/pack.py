"""Tokenize and pack: documents -> sequences of seq_len + 1 token ids, EOS after every document.

The split is per document (a hash of its uid), so a document and all its mix copies land on one
side and validation never sees training text. Per split and domain, documents (with their mix
copies) are laid out in a seeded random order, concatenated with EOS after each and cut into
windows of seq_len + 1 (inputs = w[:-1], labels = w[1:]); the last partial window is dropped and
counted. Every sequence holds one domain. The sequences of a split are shuffled (seeded) and
written as Parquet shards in the data contract's schema (`data_contract.packed_table`).
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
    """map_batches body: (uid, domain, text) -> ids (int32 array) per document."""
    from tokenizers import Tokenizer

    key = hashlib.blake2b(tokenizer_json.encode(), digest_size=8).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    tok = _TOKENIZERS[key]
    enc = tok.encode_batch(list(batch["text"]), add_special_tokens=False)
    return {
        "uid": batch["uid"],
        "domain": batch["domain"],
        "ids": [np.asarray(e.ids, dtype=np.int32) for e in enc],
    }


def pack(
    docs: list[tuple[str, str, np.ndarray]], cfg: PackConfig, eos: int, ratios: dict[str, float]
) -> dict:
    """[(uid, domain, ids)] -> {split: {"seqs": (N, seq_len+1) int32, "domains": [...], "tokens": {domain: n},
    "dropped_tokens": {domain: n}}}. Deterministic for a seed whatever the input order.

    `ratios[domain]` is the mix's sampling ratio: the domain's documents are laid out ceil(ratio)
    times (each pass in a fresh seeded order) and the first round(ratio * tokens / width) windows
    are kept, so the mix is met at sequence granularity even when one document is a whole book."""
    width = cfg.seq_len + 1
    groups: dict[tuple[str, str], list] = {}
    for uid, domain, ids in sorted(docs, key=lambda d: d[0]):
        groups.setdefault((split_of(uid, cfg.val_fraction, cfg.seed), domain), []).append(ids)
    out = {s: {"seqs": [], "domains": [], "dropped_tokens": {}, "tokens": {}} for s in ("train", "val")}
    for (split, domain), items in sorted(groups.items()):
        ratio = ratios.get(domain, 1.0)
        if ratio <= 0:
            continue
        rng = np.random.default_rng([cfg.seed, sum(map(ord, split + domain))])
        passes = [
            np.append(items[i], np.int32(eos))
            for _ in range(math.ceil(ratio))
            for i in rng.permutation(len(items))
        ]
        stream = np.concatenate(passes).astype(np.int32)
        once = len(stream) / math.ceil(ratio)
        n_seq = min(len(stream) // width, round(ratio * once / width))
        o = out[split]
        o["seqs"].append(stream[: n_seq * width].reshape(n_seq, width))
        o["domains"] += [domain] * n_seq
        o["dropped_tokens"][domain] = int(len(stream) - n_seq * width)
        o["tokens"][domain] = int(n_seq * width)
    for split, o in out.items():
        seqs = np.concatenate(o["seqs"]) if o["seqs"] else np.zeros((0, width), np.int32)
        perm = np.random.default_rng([cfg.seed, 7 if split == "train" else 11]).permutation(len(seqs))
        o["seqs"] = seqs[perm]
        o["domains"] = [o["domains"][i] for i in perm]
    return out


def write_shards(
    out_dir: Path, split: str, seqs: np.ndarray, domains: list[str], cfg: PackConfig
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
        pq.write_table(packed_table(part, domains[start : start + cfg.rows_per_shard]), path)
        shards.append({"path": f"{split}/{path.name}", "rows": len(part), "tokens": int(part.size),
                       "bytes": path.stat().st_size, "sha256": sha256_file(path)})  # fmt: skip
    return shards


def stage(
    ds, tokenizer_path: Path, cfg: PackConfig, mix: MixConfig, out_dir: Path
) -> tuple[dict, list[Path]]:
    """The kept documents in the mix -> tokenized -> packed -> train/val shards. The mix is planned
    again on real token counts. Returns (report data, the shard files)."""
    from tokenizers import Tokenizer

    tokenizer_json = Path(tokenizer_path).read_text()
    in_mix = ds.map_batches(
        lambda df: df[(df["outcome"] == "kept") & (df["copies"] > 0)], batch_format="pandas"
    )
    toks = in_mix.select_columns(["uid", "domain", "text", "copies"]).map_batches(
        tokenize_batch, fn_kwargs={"tokenizer_json": tokenizer_json}, batch_format="numpy", batch_size=128
    )
    docs = []
    for b in toks.iter_batches(batch_format="numpy", batch_size=1024):
        docs += list(zip(b["uid"], b["domain"], b["ids"]))
    tok = Tokenizer.from_str(tokenizer_json)
    special = special_tokens_of(tok)
    available: dict[str, float] = {}
    for _, d, ids in docs:
        available[d] = available.get(d, 0.0) + len(ids) + 1
    mix_plan = plan(available, mix) if mix.enabled else {}
    ratios = {d: p["ratio"] for d, p in mix_plan.items()} if mix_plan else {d: 1.0 for d in available}
    packed = pack(docs, cfg, special.eos, ratios)
    splits, files = {}, []
    for split, o in packed.items():
        shards = write_shards(out_dir, split, o["seqs"], o["domains"], cfg)
        files += [out_dir / s["path"] for s in shards]
        splits[split] = {"sequences": int(len(o["seqs"])), "tokens": int(o["seqs"].size), "shards": shards,
                         "tokens_per_domain": o["tokens"], "dropped_tail_tokens": o["dropped_tokens"]}  # fmt: skip
    extra = {"splits": splits, "special_tokens": special.as_dict(), "vocab_size": tok.get_vocab_size(),
             "documents": len(docs), "doc_tokens": int(sum(len(d[2]) for d in docs)), "mix_tokens": mix_plan}  # fmt: skip
    return extra, files
