"""The curation job: sources -> packed token shards, tokenizer, ledger, quarantine, manifest, report.

Stages run on Ray Data and each writes its rows to `<out>/_stages/<name>/` with a fingerprint of
the config that produced it (and of the stage before); a re-run with the same config skips the
stages already done. Every stage keeps all rows and only changes their `outcome`, so the last
stage holds exactly one row per input record: that is the ledger.

    prepare     read (one task per file) -> normalize -> quarantine bad records -> langid -> quality
    perplexity  bigram proxy LM on a reference slice -> per-domain head/middle/tail, drop tail cut
    dedup       exact (normalized text) -> code (normalized Python) -> MinHash-LSH near duplicates
                (every key in one pass and one shuffle; the cascade is resolved on the driver)
    semdedup    MiniLM embeddings in an actor pool -> k-means -> cosine >= 1 - eps
    mix         copies per document for the target token shares
    tokenizer   byte-level BPE on a sample of the mix
    pack        tokenize -> seq_len + 1 windows -> train/val Parquet shards -> manifest.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moray.jobs.curate import (
    code_norm,
    dedup_exact,
    langid,
    minhash,
    mixing,
    pack,
    perplexity,
    quality,
    semdedup,
)
from moray.jobs.curate import ledger as ledger_mod
from moray.jobs.curate import tokenizer as tok_mod
from moray.jobs.curate.normalize import NormalizeConfig, normalize_row
from moray.jobs.curate.readers import SourceConfig, discover, read_task
from moray.platform.config import ConfigError
from moray.platform.config import apply_overrides, from_dict, load_yaml

STAGES = ["read", "normalize", "langid", "quality", "perplexity", "dedup", "semdedup"]
REPO_ROOT = Path(__file__).resolve().parents[3]
COLUMNS = ["uid", "doc_id", "source", "domain", "format", "lang", "lang_pred", "lang_score", "text", "raw",
           "outcome", "reason", "stage", "n_chars", "ppl", "bucket", "dup_of", "copies"]  # fmt: skip


@dataclass
class CurateConfig:
    sources: list = field(default_factory=list)  # of SourceConfig (built by load_config)
    output: str = ".moray/curated"
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    langid: langid.LangIdConfig = field(default_factory=langid.LangIdConfig)
    quality: quality.QualityConfig = field(default_factory=quality.QualityConfig)
    perplexity: perplexity.PerplexityConfig = field(default_factory=perplexity.PerplexityConfig)
    exact: dedup_exact.ExactDedupConfig = field(default_factory=dedup_exact.ExactDedupConfig)
    code_norm: code_norm.CodeNormConfig = field(default_factory=code_norm.CodeNormConfig)
    minhash: minhash.MinHashConfig = field(default_factory=minhash.MinHashConfig)
    semdedup: semdedup.SemDedupConfig = field(default_factory=semdedup.SemDedupConfig)
    mix: mixing.MixConfig = field(default_factory=mixing.MixConfig)
    tokenizer: tok_mod.TokenizerConfig = field(default_factory=tok_mod.TokenizerConfig)
    pack: pack.PackConfig = field(default_factory=pack.PackConfig)
    num_blocks: int = 8  # hash partitions for the dedup groupings
    resume: bool = True  # skip stages whose output exists for the same config
    mlflow: bool = True
    experiment: str = "moray-curate"
    report: bool = True


def resolve_path(p: str) -> str:
    """Relative source paths are tried from the current directory, then from the repo root."""
    if "://" in p or Path(p).is_absolute() or Path(p).exists() or Path(p).parent.exists():
        return p
    alt = REPO_ROOT / p
    return str(alt) if alt.exists() or alt.parent.exists() else p


def load_config(path: str | None = None, overrides: list[str] | None = None, data: dict | None = None):
    data = dict(data or (load_yaml(path) if path else {}))
    data = apply_overrides(data, list(overrides or []))
    raw_sources = data.pop("sources", [])
    if not isinstance(raw_sources, list):
        raise ConfigError("sources: expected a list of {path, domain, ...}")
    cfg = from_dict(CurateConfig, data)
    cfg.sources = []
    for i, s in enumerate(raw_sources):
        src = from_dict(SourceConfig, s if isinstance(s, dict) else {"path": s}, f"sources[{i}]")
        src.path = resolve_path(src.path)
        cfg.sources.append(src)
    if not cfg.sources:
        raise ConfigError("sources: at least one source is needed")
    return cfg


# -- row-level work (runs inside Ray Data tasks) ----------------------------------------------------


def prepare_batch(df: pd.DataFrame, cfg: CurateConfig) -> pd.DataFrame:
    rows = []
    for row in df.to_dict("records"):
        row.update(lang_pred="", lang_score=0.0, outcome="kept", reason="", stage="", ppl=float("nan"), bucket="",
                   dup_of="", copies=0)  # fmt: skip
        if row["error"]:
            row.update(outcome="quarantined", reason=row["error"], stage="read")
        else:
            row = normalize_row(row, cfg.normalize)
            if row["error"]:
                row.update(outcome="quarantined", reason=row["error"], stage="normalize")
        if row["outcome"] == "kept":
            row["raw"] = b""  # raw bytes are only kept for quarantine
            if cfg.langid.enabled:
                row["lang_pred"], row["lang_score"] = langid.predict(row["text"], cfg.langid)
                reason = langid.check(row["domain"], row["lang_pred"], row["lang_score"], cfg.langid)
                if reason:
                    row.update(outcome="filtered", reason=reason, stage="langid")
        if row["outcome"] == "kept":
            reason, text = quality.apply_filters(row["text"], row["domain"], cfg.quality)
            row["text"] = text
            if reason:
                row.update(outcome="filtered", reason=reason, stage="quality")
        row["n_chars"] = len(row["text"])
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _score_batch(df: pd.DataFrame, lm, domains: list[str], max_chars: int) -> pd.DataFrame:
    mask = (df["outcome"] == "kept") & df["domain"].isin(domains)
    df["ppl"] = [lm.perplexity(t[:max_chars]) if m else float("nan") for t, m in zip(df["text"], mask)]
    return df


def _apply_ppl(df: pd.DataFrame, thresholds: dict, cfg) -> pd.DataFrame:
    for i in np.flatnonzero(((df["outcome"] == "kept") & df["domain"].isin(list(thresholds))).to_numpy()):
        bucket, reason = perplexity.check(df.at[i, "domain"], df.at[i, "ppl"], thresholds, cfg)
        df.at[i, "bucket"] = bucket
        if reason:
            df.at[i, "outcome"], df.at[i, "reason"], df.at[i, "stage"] = "filtered", reason, "perplexity"
    return df


def _apply_dups(df: pd.DataFrame, dups: dict, stage: str) -> pd.DataFrame:
    for i, uid in enumerate(df["uid"]):
        if uid in dups and df.at[i, "outcome"] == "kept":
            survivor, reason = dups[uid]
            df.at[i, "outcome"], df.at[i, "reason"], df.at[i, "stage"], df.at[i, "dup_of"] = (
                "duplicate", reason, stage, survivor,
            )  # fmt: skip
    return df


def _apply_copies(df: pd.DataFrame, copies: dict) -> pd.DataFrame:
    df["copies"] = [copies.get(u, 0) for u in df["uid"]]
    return df


def _dedup_keys(df: pd.DataFrame, cfg: CurateConfig, kinds: list[str]) -> pd.DataFrame:
    """Kept rows -> one (key, uid) row per dedup key, prefixed by kind: `e` the exact key, `c` the
    normalized-code key (code domain, Python), `n` one MinHash-LSH band key per band."""
    keys: list[str] = []
    uids: list[str] = []
    if "e" in kinds:
        keys += ["e" + dedup_exact.exact_key(t, cfg.exact.lowercase) for t in df["text"]]
        uids += df["uid"].tolist()
    if "c" in kinds:
        for uid, text, domain, lang in zip(df["uid"], df["text"], df["domain"], df["lang"]):
            k = code_norm.code_key(text, lang, cfg.code_norm) if domain == "code" else None
            if k is not None:
                keys.append("c" + k)
                uids.append(uid)
    if "n" in kinds:
        keys += [
            f"n{k:x}" for k in minhash.texts_band_keys(df["text"].tolist(), cfg.minhash).ravel().tolist()
        ]
        uids += np.repeat(df["uid"].to_numpy(dtype=object), cfg.minhash.num_bands).tolist()
    return pd.DataFrame({"key": keys, "uid": uids}, columns=["key", "uid"])


def _kept(df: pd.DataFrame, domains: list[str] | None = None) -> pd.DataFrame:
    mask = df["outcome"] == "kept"
    if domains is not None:
        mask &= df["domain"].isin(domains)
    return df[mask]


def _sample_uid(uid: str, seed: int) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "little") / 2**64


# -- the job ----------------------------------------------------------------------------------------


class Curation:
    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.fingerprint = ""
        self.extras: dict = {}
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    # Each stage: fingerprint = hash(previous fingerprint + this stage's config).
    def _stage(self, name: str, section, build):
        import ray.data

        conf = json.dumps([dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in section],
                          sort_keys=True, default=str)  # fmt: skip
        self.fingerprint = hashlib.sha256((self.fingerprint + name + conf).encode()).hexdigest()[:16]
        d = self.out / "_stages" / name
        marker = d / "_DONE.json"
        if self.cfg.resume and marker.exists():
            info = json.loads(marker.read_text())
            if info.get("fingerprint") == self.fingerprint:
                self.extras[name] = info.get("extra", {})
                self.skipped.append(name)
                print(f"[curate] {name}: already done for this config, skipped")
                return ray.data.read_parquet(str(d))
        t0 = time.perf_counter()
        shutil.rmtree(d, ignore_errors=True)
        ds, extra = build()
        ds.write_parquet(str(d))
        self.extras[name] = extra
        self.timings[name] = time.perf_counter() - t0
        marker.write_text(json.dumps({"fingerprint": self.fingerprint, "extra": extra}, default=str))
        print(f"[curate] {name}: done in {self.timings[name]:.1f}s")
        return ray.data.read_parquet(str(d))

    def prepare(self):
        import ray.data

        def build():
            tasks, skipped = [], []
            for src in self.cfg.sources:
                t, s = discover(src)
                tasks += t
                skipped += s
            ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).flat_map(read_task)
            ds = ds.map_batches(
                prepare_batch, fn_kwargs={"cfg": self.cfg}, batch_format="pandas", batch_size=256
            )
            return ds, {"files": len(tasks), "skipped_files": skipped}

        return self._stage(
            "prepare", [self.cfg.sources, self.cfg.normalize, self.cfg.langid, self.cfg.quality], build
        )

    def perplexity(self, ds):
        c = self.cfg.perplexity

        def build():
            if not c.enabled:
                return ds, {}
            meta = ds.select_columns(["uid", "domain", "outcome", "n_chars"]).to_pandas()
            meta = _kept(meta, c.domains).copy()
            meta["h"] = [_sample_uid(u, c.seed) for u in meta["uid"]]
            meta = meta.sort_values("h")
            ref = set(meta["uid"][np.cumsum(meta["n_chars"].clip(upper=c.max_chars)) <= c.reference_chars])
            if not ref and len(meta):
                ref = {meta["uid"].iloc[0]}
            texts = [
                t[: c.max_chars]
                for t in ds.filter(lambda r: r["uid"] in ref).select_columns(["text"]).to_pandas()["text"]
            ]
            lm = perplexity.BigramLM.train(texts, c.discount)
            scored = ds.map_batches(_score_batch, fn_kwargs={"lm": lm, "domains": c.domains, "max_chars": c.max_chars},
                                    batch_format="pandas").materialize()  # fmt: skip
            m = _kept(scored.select_columns(["domain", "outcome", "ppl"]).to_pandas(), c.domains)
            thresholds = perplexity.buckets({d: g["ppl"].tolist() for d, g in m.groupby("domain")}, c)
            out = scored.map_batches(
                _apply_ppl, fn_kwargs={"thresholds": thresholds, "cfg": c}, batch_format="pandas"
            )
            return out, {"thresholds": thresholds, "reference_docs": len(texts)}

        return self._stage("perplexity", [c], build)

    def dedup(self, ds):
        cfg = self.cfg

        def build():
            cur = ds.materialize()  # read once: every step below reads these blocks
            meta = cur.select_columns(["uid", "doc_id", "n_chars"]).to_pandas()
            sizes = dict(zip(meta["uid"], meta["n_chars"]))
            doc_ids = dict(zip(meta["uid"], meta["doc_id"]))
            steps = [(reason, kind) for reason, kind, on in (("exact_duplicate", "e", cfg.exact.enabled),
                     ("code_normalized_duplicate", "c", cfg.code_norm.enabled),
                     ("near_duplicate", "n", cfg.minhash.enabled)) if on]  # fmt: skip
            groups: dict[str, list[list[str]]] = {kind: [] for _, kind in steps}
            if steps:  # every key of every kind in one pass over the text and one shuffle
                keyed = cur.map_batches(_kept, batch_format="pandas").map_batches(
                    _dedup_keys, fn_kwargs={"cfg": cfg, "kinds": [k for _, k in steps]}, batch_format="pandas"
                )
                for key, members in dedup_exact.groups_by_key(keyed, cfg.num_blocks).items():
                    groups[key[0]].append(members)
            dups: dict[str, tuple[str, str]] = {}
            clusters_info = []
            for reason, kind in steps:
                # in order, each step sees only the documents no earlier step marked duplicate
                edges = []
                for members in groups[kind]:
                    live = [u for u in members if u not in dups]
                    edges += [(live[0], u) for u in live[1:]]
                new = dedup_exact.clusters(edges, sizes)
                dups.update({u: (s, reason) for u, s in new.items()})
                clusters_info += _cluster_summary(new, reason, doc_ids)
            clusters_info.sort(key=lambda c: -c["size"])
            out = cur.map_batches(
                _apply_dups, fn_kwargs={"dups": dups, "stage": "dedup"}, batch_format="pandas"
            )
            return out, {"largest_clusters": clusters_info[:20]}

        return self._stage("dedup", [cfg.exact, cfg.code_norm, cfg.minhash], build)

    def semdedup(self, ds):
        c = self.cfg.semdedup

        def build():
            if not c.enabled:
                return ds, {}
            meta = ds.select_columns(["uid", "doc_id", "n_chars"]).to_pandas()
            sizes = dict(zip(meta["uid"], meta["n_chars"]))
            doc_ids = dict(zip(meta["uid"], meta["doc_id"]))
            kept = ds.map_batches(_kept, fn_kwargs={"domains": c.domains}, batch_format="pandas")
            emb = semdedup.embed(kept, c).to_pandas()
            if emb.empty:
                return ds, {"largest_clusters": []}
            emb = emb.sort_values("uid")
            pairs, _ = semdedup.duplicate_pairs(list(emb["uid"]), np.stack(emb["embedding"].to_list()), c)
            new = dedup_exact.clusters(pairs, sizes)
            out = ds.map_batches(_apply_dups, fn_kwargs={"dups": {u: (s, "semantic_duplicate") for u, s in new.items()},
                                                         "stage": "semdedup"}, batch_format="pandas")  # fmt: skip
            return out, {"largest_clusters": _cluster_summary(new, "semantic_duplicate", doc_ids)[:20],
                         "embedded": len(emb)}  # fmt: skip

        return self._stage("semdedup", [c], build)

    def mix(self, ds):
        c = self.cfg.mix

        def build():
            meta = _kept(ds.select_columns(["uid", "domain", "outcome", "n_chars"]).to_pandas())
            docs = [
                (u, d, n / c.bytes_per_token) for u, d, n in zip(meta["uid"], meta["domain"], meta["n_chars"])
            ]
            if c.enabled:
                copies, plan = mixing.copies(docs, c)
            else:
                copies, plan = {u: 1 for u, _, _ in docs}, {}
            return ds.map_batches(_apply_copies, fn_kwargs={"copies": copies}, batch_format="pandas"), {
                "plan": plan
            }

        return self._stage("mix", [c], build)

    def train_tokenizer(self, ds):
        c = self.cfg.tokenizer
        path = self.out / "tokenizer.json"
        marker = self.out / "_stages" / "tokenizer.json.fingerprint"
        self.fingerprint = hashlib.sha256(
            (self.fingerprint + json.dumps(dataclasses.asdict(c))).encode()
        ).hexdigest()[:16]
        if self.cfg.resume and path.exists() and marker.exists() and marker.read_text() == self.fingerprint:
            self.skipped.append("tokenizer")
            return path.read_text()
        t0 = time.perf_counter()
        meta = ds.select_columns(["uid", "outcome", "n_chars", "copies"]).to_pandas()
        meta = meta[(meta["outcome"] == "kept") & (meta["copies"] > 0)].copy()
        meta["h"] = [_sample_uid(u, 1) for u in meta["uid"]]
        meta = meta.sort_values("h")
        chosen = set(meta["uid"][np.cumsum(meta["n_chars"].clip(upper=c.max_doc_chars)) <= c.train_chars])
        chosen |= set(meta["uid"].iloc[:1])
        texts = ds.filter(lambda r: r["uid"] in chosen).select_columns(["uid", "text"]).to_pandas()
        texts = texts.sort_values("uid")["text"].tolist()  # order fixed: the merges are deterministic
        tok = tok_mod.train(texts, c)
        tok.save(str(path))
        marker.write_text(self.fingerprint)
        self.timings["tokenizer"] = time.perf_counter() - t0
        return path.read_text()

    def pack(self, ds, tokenizer_json: str) -> dict:
        from tokenizers import Tokenizer

        t0 = time.perf_counter()
        c = self.cfg.pack
        kept = ds.map_batches(
            lambda df: df[(df["outcome"] == "kept") & (df["copies"] > 0)], batch_format="pandas"
        )
        toks = kept.select_columns(["uid", "domain", "text", "copies"]).map_batches(
            pack.tokenize_batch,
            fn_kwargs={"tokenizer_json": tokenizer_json},
            batch_format="numpy",
            batch_size=128,
        )
        docs = []
        for b in toks.iter_batches(batch_format="numpy", batch_size=1024):
            docs += list(zip(b["uid"], b["domain"], b["ids"]))
        tok = Tokenizer.from_str(tokenizer_json)
        special = tok_mod.special_ids(tok)
        available: dict[str, float] = {}
        for _, d, ids in docs:
            available[d] = available.get(d, 0.0) + len(ids) + 1
        plan = mixing.plan(available, self.cfg.mix) if self.cfg.mix.enabled else {}
        self.extras["mix_tokens"] = plan
        ratios = {d: p["ratio"] for d, p in plan.items()} if plan else {d: 1.0 for d in available}
        packed = pack.pack(docs, c, special["eos"], ratios)
        splits = {}
        for split, o in packed.items():
            shards = pack.write_shards(self.out, split, o["seqs"], o["domains"], c)
            splits[split] = {"sequences": int(len(o["seqs"])), "tokens": int(o["seqs"].size), "shards": shards,
                             "tokens_per_domain": o["tokens"], "dropped_tail_tokens": o["dropped_tokens"]}  # fmt: skip
        self.timings["pack"] = time.perf_counter() - t0
        return {"splits": splits, "special_tokens": special, "vocab_size": tok.get_vocab_size(),
                "doc_tokens": int(sum(len(d[2]) for d in docs))}  # fmt: skip

    def run(self) -> dict:
        t0 = time.perf_counter()
        ds = self.prepare()
        records_read = ds.count()
        self._write_quarantine(ds)
        ds = self.perplexity(ds)
        ds = self.dedup(ds)
        ds = self.semdedup(ds)
        ds = self.mix(ds)
        tokenizer_json = self.train_tokenizer(ds)
        packed = self.pack(ds, tokenizer_json)
        table = pa.Table.from_pandas(
            ds.select_columns(
                [
                    "uid",
                    "doc_id",
                    "source",
                    "domain",
                    "outcome",
                    "reason",
                    "stage",
                    "dup_of",
                    "copies",
                    "n_chars",
                    "ppl",
                    "lang_pred",
                    "lang",
                ]
            ).to_pandas(),  # fmt: skip
            preserve_index=False,
        )
        ledger = ledger_mod.build(table)
        counts = ledger_mod.check(ledger, records_read)
        pq.write_table(ledger, self.out / "ledger.parquet")
        manifest = self._manifest(ledger, counts, packed, records_read, time.perf_counter() - t0)
        rows = table.select(["domain", "lang", "lang_pred"]).to_pylist()
        manifest["langid_accuracy"] = langid.accuracy_on_labels(
            (r["lang"], r["lang_pred"])
            for r in rows
            if r["domain"] != "code"  # code's lang: python, c...
        )
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        if self.cfg.report:
            from moray.jobs.curate import report

            report.write(self.out, manifest, table)
        if self.cfg.mlflow:
            self._log_mlflow(manifest)
        return manifest

    def _write_quarantine(self, ds):
        q = self.out / "quarantine"
        shutil.rmtree(q, ignore_errors=True)
        q.mkdir(parents=True)
        rows = ds.filter(lambda r: r["outcome"] == "quarantined").select_columns(
            ["uid", "doc_id", "source", "domain", "reason", "raw"]).to_pandas()  # fmt: skip
        schema = pa.schema([("uid", pa.string()), ("doc_id", pa.string()), ("source", pa.string()),
                            ("domain", pa.string()), ("reason", pa.string()), ("raw", pa.binary())])  # fmt: skip
        pq.write_table(
            pa.Table.from_pandas(rows, schema=schema, preserve_index=False), q / "quarantined.parquet"
        )

    def _manifest(self, ledger, counts, packed, records_read, seconds) -> dict:
        funnel = ledger_mod.funnel(ledger, STAGES)
        train_val = packed["splits"]
        tokens = {}
        for s in train_val.values():
            for d, n in s["tokens_per_domain"].items():
                tokens[d] = tokens.get(d, 0) + n
        total = sum(tokens.values()) or 1
        plan = self.extras.get("mix_tokens") or self.extras.get("mix", {}).get("plan", {})
        reasons: dict[str, int] = {}
        for r, o in zip(ledger.column("reason").to_pylist(), ledger.column("outcome").to_pylist()):
            if o != "kept":
                key = r if o != "quarantined" else r.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        return {
            "format_version": 1,
            "seq_len": self.cfg.pack.seq_len,
            "sequence_length_stored": self.cfg.pack.seq_len + 1,
            "vocab_size": packed["vocab_size"],
            "tokenizer": "tokenizer.json",
            "special_tokens": packed["special_tokens"],
            "columns": {"input_ids": "list<int32>, length seq_len + 1", "domain": "string"},
            "splits": train_val,
            "records_read": records_read,
            "counts": counts,
            "funnel": funnel,
            "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "mix": {
                d: {
                    "target": plan.get(d, {}).get("target_share", 0.0),
                    "achieved": tokens.get(d, 0) / total,
                    "tokens": tokens.get(d, 0),
                    "sampling_ratio": plan.get(d, {}).get("ratio", 0.0),
                }
                for d in sorted(set(tokens) | set(plan))
            },  # fmt: skip
            "dedup": {k: self.extras.get(k, {}) for k in ("dedup", "semdedup")},
            "perplexity": self.extras.get("perplexity", {}),
            "skipped_files": self.extras.get("prepare", {}).get("skipped_files", []),
            "stages_skipped_on_resume": self.skipped,
            "timings_s": self.timings,
            "seconds": seconds,
            "config": _config_dict(self.cfg),
        }

    def _log_mlflow(self, manifest: dict):
        from moray.platform.tracking import flatten, setup_mlflow

        mlflow = setup_mlflow(self.cfg.experiment)
        with mlflow.start_run(run_name=f"curate-{Path(self.cfg.output).name}"):
            params = flatten(manifest["config"])
            mlflow.log_params({k[:250]: v[:500] for k, v in list(params.items())[:400]})
            metrics = {f"count.{d}.{k}": v for d, row in manifest["counts"].items() for k, v in row.items()}
            metrics.update({f"mix.{d}.achieved": m["achieved"] for d, m in manifest["mix"].items()})
            metrics.update({f"tokens.{s}": v["tokens"] for s, v in manifest["splits"].items()})
            metrics["seconds"] = manifest["seconds"]
            mlflow.log_metrics({k.replace("#", "_"): float(v) for k, v in metrics.items()})
            for name in ("manifest.json", "report.md"):
                if (self.out / name).exists():
                    mlflow.log_artifact(str(self.out / name))
            plots = self.out / "report_plots"
            if plots.exists():
                mlflow.log_artifacts(str(plots), "report_plots")


def _cluster_summary(dup_of: dict[str, str], reason: str, doc_ids: dict[str, str]) -> list[dict]:
    groups: dict[str, list[str]] = {}
    for dup, survivor in dup_of.items():
        groups.setdefault(survivor, []).append(dup)
    out = [{"survivor": doc_ids.get(s, s), "size": len(m) + 1, "reason": reason,
            "members": [doc_ids.get(x, x) for x in sorted(m)[:5]]} for s, m in groups.items()]  # fmt: skip
    return sorted(out, key=lambda c: (-c["size"], c["survivor"]))


def _config_dict(cfg: CurateConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["sources"] = [dataclasses.asdict(s) for s in cfg.sources]
    return d


def run(cfg: CurateConfig) -> dict:
    from moray.platform.cluster import connect

    connect()
    return Curation(cfg).run()


__all__ = ["CurateConfig", "Curation", "load_config", "run"]
