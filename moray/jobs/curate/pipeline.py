"""The curation job: sources -> packed token shards, tokenizer, ledger, quarantine, manifest, report.

Orchestration only: each stage's work lives in its module, and every stage runs through one
stage cache (cache.StageCache), so a re-run with the same config and inputs skips what is done.
Every stage keeps all rows and only changes their `outcome`, so the last stage holds exactly one
row per input record: that is the ledger.

    prepare     read (one task per file) -> normalize -> quarantine bad records -> langid -> quality
    quarantine  the quarantined records with their raw bytes -> <out>/quarantine/
    perplexity  bigram proxy LM on a seeded reference slice -> per-domain head/middle/tail, drop tail cut
    dedup       exact (normalized text) -> code (normalized Python) -> MinHash-LSH near duplicates
    semdedup    MiniLM embeddings in an actor pool -> k-means -> cosine >= 1 - eps
    crosslingual  translations paired from the texts (names, numbers, structure, a lexicon it
                learns) -> `pair_id` per translation group; runs only where two languages of
                `crosslingual.domains` have `min_docs` kept documents each
    mix         copies per document for the target token shares
    code_exec   (off by default) each code document in the mix run in the sandbox, doctests included
                -> <out>/code_exec/labels.parquet, for pre-training's code-execution objective
    tokenizer   byte-level BPE on a seeded sample of the mix -> <out>/tokenizer.json
    pack        tokenize -> seq_len + 1 windows (a translation group together; the code-execution
                labels on each code document's closing EOS) -> <out>/train, <out>/val

Then the ledger is checked (every record accounted for), and the manifest (the data contract's
`Manifest`), the report and the MLflow run are written. Seeds come from the config sections
(perplexity.seed, semdedup.seed, tokenizer.seed, pack.seed).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moray.jobs.curate import (
    code_exec,
    code_norm,
    crosslingual,
    dedup,
    dedup_exact,
    langid,
    minhash,
    mixing,
    pack,
    perplexity,
    prepare,
    quality,
    quarantine,
    semdedup,
)
from moray.jobs.curate import ledger as ledger_mod
from moray.jobs.curate import tokenizer as tok_mod
from moray.jobs.curate.cache import StageCache
from moray.jobs.curate.metrics import CurationGauges
from moray.jobs.curate.normalize import NormalizeConfig
from moray.jobs.curate.readers import SourceConfig
from moray.jobs.curate.rows import ROW_SCHEMA, columns
from moray.platform.config import ConfigError, apply_overrides, from_dict, load_yaml
from moray.platform.data_contract import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Manifest,
    SpecialTokens,
    write_manifest,
)

# the ledger's stages, in the order they decide outcomes (the report's funnel)
FUNNEL = ["read", "normalize", "langid", "quality", "perplexity", "dedup", "semdedup"]
REPO_ROOT = Path(__file__).resolve().parents[3]
LEDGER_SOURCE = ["uid", "doc_id", "source", "domain", "outcome", "reason", "stage", "dup_of", "copies", "n_chars",
                 "ppl", "lang_pred", "lang", "blank_lines"]  # fmt: skip


class EmptyCurationError(RuntimeError):
    """Curation ran to the end but left nothing to train on; the ledger and report say why."""


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
    crosslingual: crosslingual.CrossLingualConfig = field(default_factory=crosslingual.CrossLingualConfig)
    mix: mixing.MixConfig = field(default_factory=mixing.MixConfig)
    code_exec: code_exec.CodeExecConfig = field(default_factory=code_exec.CodeExecConfig)
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


class Curation:
    """The stages in order, each through the stage cache; `run` adds the ledger, manifest and report."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.out, ROW_SCHEMA, cfg.resume)
        self.gauges = CurationGauges(self.out.name)
        self.cache.on_done = self._stage_done
        self.documents_in: int | None = None  # what the file stages read: every record, then the mix

    def _stage_done(self, name: str, seconds: float) -> None:
        """A dataset stage carries every record (filtered ones keep their reason), counted from its
        Parquet footers; a file stage reads `documents_in`."""
        parts = list((self.cache.root / name).glob("*.parquet"))
        records = sum(pq.ParquetFile(f).metadata.num_rows for f in parts) if parts else self.documents_in
        self.gauges.stage(name, seconds, records)

    @property
    def timings(self) -> dict[str, float]:
        return self.cache.timings

    def prepare(self):
        c = self.cfg
        tasks, skipped = prepare.discover_all(c.sources)
        # the inputs' sizes and times are part of the fingerprint: a changed file re-runs curation
        return self.cache.dataset(
            "prepare",
            [c.sources, c.normalize, c.langid, c.quality, tasks],
            lambda: (
                prepare.stage(tasks, c.normalize, c.langid, c.quality),
                {"files": len(tasks), "skipped_files": skipped},
            ),  # fmt: skip
        )

    def quarantine(self, ds) -> dict:
        return self.cache.files("quarantine", [], lambda: quarantine.stage(ds, self.out))

    def perplexity(self, ds):
        return self.cache.dataset(
            "perplexity", self.cfg.perplexity, lambda: perplexity.stage(ds, self.cfg.perplexity)
        )

    def dedup(self, ds):
        c = self.cfg
        return self.cache.dataset(
            "dedup",
            [c.exact, c.code_norm, c.minhash, c.num_blocks],
            lambda: dedup.stage(ds, c.exact, c.code_norm, c.minhash, c.num_blocks),
        )

    def semdedup(self, ds):
        return self.cache.dataset(
            "semdedup", self.cfg.semdedup, lambda: semdedup.stage(ds, self.cfg.semdedup)
        )

    def crosslingual(self, ds):
        """Off, or no two languages to pair in its domains (no multilingual data): no stage at all."""
        c = self.cfg.crosslingual
        if not crosslingual.worth_running(ds, c):
            return ds
        return self.cache.dataset("crosslingual", c, lambda: crosslingual.stage(ds, c))

    def mix(self, ds):
        return self.cache.dataset("mix", self.cfg.mix, lambda: mixing.stage(ds, self.cfg.mix))

    def tokenizer(self, ds) -> dict:
        c = self.cfg.tokenizer
        return self.cache.files("tokenizer", c, lambda: tok_mod.stage(ds, c, self.out / TOKENIZER_FILE))

    def code_exec(self, ds) -> dict:
        c = self.cfg.code_exec
        return self.cache.files("code_exec", c, lambda: code_exec.stage(ds, c, self.out)) if c.enabled else {}

    def pack(self, ds) -> dict:
        c = self.cfg
        labels = code_exec.read_labels(self.out) if c.code_exec.enabled else None
        # the mix is planned again on real token counts here, so its config is part of this stage's too
        return self.cache.files(
            "pack",
            [c.pack, c.mix, c.code_exec],
            lambda: pack.stage(ds, self.out / TOKENIZER_FILE, c.pack, c.mix, self.out, labels),
        )

    def run(self) -> dict:
        """All stages, then the ledger, manifest, report (and MLflow run). Returns the manifest as
        written. Raises EmptyCurationError, after writing the ledger and report, when nothing is
        left to train on."""
        t0 = time.perf_counter()
        # the manifest marks a finished output: a run that fails must not leave an older one behind
        (self.out / MANIFEST_FILE).unlink(missing_ok=True)
        ds = self.prepare()
        records_read = self.documents_in = ds.count()
        self.quarantine(ds)
        ds = self.mix(self.crosslingual(self.semdedup(self.dedup(self.perplexity(ds)))))

        frame = columns(ds, LEDGER_SOURCE)
        schema = pa.schema([ROW_SCHEMA.field(c) for c in LEDGER_SOURCE])
        rows = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        ledger = ledger_mod.build(rows)
        counts = ledger_mod.check(ledger, records_read)
        pq.write_table(ledger, self.out / "ledger.parquet")
        extra = self._report_data(ledger, counts, rows, records_read)

        in_mix = self.documents_in = sum(c > 0 for c in ledger.column("copies").to_pylist())
        self.gauges.result(extra["funnel"], counts)
        if not in_mix:
            self._fail(extra, rows, self._nothing_kept(records_read, counts, extra["reasons"]))
        self.tokenizer(ds)
        extra["code_exec"] = self.code_exec(ds)
        packed = self.pack(ds)
        if not packed["splits"]["train"]["sequences"]:
            self._fail(extra, rows, (
                f"the {in_mix:,} documents in the mix make {packed['doc_tokens']:,} tokens: not one training "
                f"sequence of seq_len + 1 = {self.cfg.pack.seq_len + 1} tokens (lower pack.seq_len, or add data)"
            ))  # fmt: skip

        if extra["crosslingual"]:  # how many translation groups packing kept in one sequence
            extra["crosslingual"]["packing"] = packed.get("translation_groups", {})
        extra.update(self._mix_data(packed), tokenizer_training=self.cache.extras.get("tokenizer", {}),
                     stages_skipped_on_resume=self.cache.skipped, timings_s=self.cache.timings,
                     seconds=time.perf_counter() - t0)  # fmt: skip
        manifest = Manifest(
            seq_len=self.cfg.pack.seq_len,
            vocab_size=packed["vocab_size"],
            special_tokens=SpecialTokens(**packed["special_tokens"]),
            splits=packed["splits"],
            extra=extra,
            exec_labels=self.cfg.code_exec.enabled,
        )
        write_manifest(self.out, manifest)
        data = manifest.to_json()
        if self.cfg.report:
            from moray.jobs.curate import report

            report.write(self.out, data, rows)
        if self.cfg.mlflow:
            self._log_mlflow(data)
        return data

    def _report_data(self, ledger, counts, rows, records_read) -> dict:
        reasons: dict[str, int] = {}
        for r, o in zip(ledger.column("reason").to_pylist(), ledger.column("outcome").to_pylist()):
            if o != "kept":
                key = r if o != "quarantined" else r.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        prepared = self.cache.extras.get("prepare", {})
        skipped = prepared.get("skipped_files", [])
        by_reason: dict[str, int] = {}
        for s in skipped:
            by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
        langs = rows.select(["domain", "lang", "lang_pred"]).to_pylist()
        return {
            "records_read": records_read,
            # blank lines of JSON-lines files are not records (no ledger row): counted here
            "blank_lines": int(pc.sum(rows.column("blank_lines")).as_py() or 0),
            "counts": counts,
            "funnel": ledger_mod.funnel(ledger, FUNNEL),
            "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "files_read": prepared.get("files", 0),
            "skipped_files": skipped,
            "skipped_files_by_reason": by_reason,
            "dedup": {k: self.cache.extras.get(k, {}) for k in ("dedup", "semdedup")},
            "perplexity": self.cache.extras.get("perplexity", {}),
            "crosslingual": dict(self.cache.extras.get("crosslingual", {})),
            # code's `lang` is its programming language: not a language-id label
            "langid_accuracy": langid.accuracy_on_labels(
                (r["lang"], r["lang_pred"]) for r in langs if r["domain"] != "code"
            ),
            "config": _config_dict(self.cfg),
        }

    def _mix_data(self, packed: dict) -> dict:
        tokens: dict[str, int] = {}
        for s in packed["splits"].values():
            for d, n in s["tokens_per_domain"].items():
                tokens[d] = tokens.get(d, 0) + n
        total = sum(tokens.values()) or 1
        plan = packed.get("mix_tokens") or self.cache.extras.get("mix", {}).get("plan", {})
        return {"mix": {d: {"target": plan.get(d, {}).get("target_share", 0.0), "achieved": tokens.get(d, 0) / total,
                            "tokens": tokens.get(d, 0), "sampling_ratio": plan.get(d, {}).get("ratio", 0.0)}
                        for d in sorted(set(tokens) | set(plan))}}  # fmt: skip

    def _nothing_kept(self, records_read: int, counts: dict, reasons: dict) -> str:
        if not records_read:
            files = self.cache.extras.get("prepare", {}).get("files", 0)
            return f"no record was read ({files} input files)"
        c = counts["all"]
        top = ", ".join(f"{r} ({n:,})" for r, n in list(reasons.items())[:3])
        return (f"no document was kept: of {records_read:,} records, {c['filtered']:,} filtered, "
                f"{c['duplicate']:,} duplicates, {c['quarantined']:,} quarantined; top reasons: {top}")  # fmt: skip

    def _fail(self, extra: dict, rows, why: str):
        """Write the report of what happened, then refuse: there is no output to train on."""
        extra.update(stages_skipped_on_resume=self.cache.skipped, timings_s=self.cache.timings, no_output=why)
        if self.cfg.report:
            from moray.jobs.curate import report

            report.write(self.out, {"seq_len": self.cfg.pack.seq_len, **extra}, rows)
        raise EmptyCurationError(
            f"curation left nothing to train on: {why}. Each record's outcome is in {self.out}/ledger.parquet"
            + (f" and {self.out}/report.md" if self.cfg.report else "")
        )

    def _log_mlflow(self, manifest: dict):
        from moray.platform.tracking import flatten, setup_mlflow

        mlflow = setup_mlflow(self.cfg.experiment)
        from moray.platform.files import sha256_file

        with mlflow.start_run(run_name=f"curate-{Path(self.cfg.output).name}"):
            # pre-training finds this run (its lineage) by the checksum of the manifest it reads
            mlflow.set_tags({"moray.job": "curate", "moray.data.path": str(self.out.resolve()),
                             "moray.data.manifest_sha256": sha256_file(self.out / MANIFEST_FILE)})  # fmt: skip
            params = flatten(manifest["config"])
            mlflow.log_params({k[:250]: v[:500] for k, v in list(params.items())[:400]})
            metrics = {f"count.{d}.{k}": v for d, row in manifest["counts"].items() for k, v in row.items()}
            metrics.update({f"mix.{d}.achieved": m["achieved"] for d, m in manifest["mix"].items()})
            metrics.update({f"tokens.{s}": v["tokens"] for s, v in manifest["splits"].items()})
            metrics["seconds"] = manifest["seconds"]
            x = manifest.get("crosslingual") or {}
            metrics.update(
                {f"crosslingual.{k}": v for k, v in x.items() if k in ("groups", "paired_documents")}
            )
            for dom, info in x.get("per_domain", {}).items():  # against ground truth, where ids give one
                for lp, s in info.get("ground_truth", {}).get("per_language_pair", {}).items():
                    metrics.update({f"crosslingual.{dom}.{lp}.{k}": s[k] for k in ("precision", "recall")})
            mlflow.log_metrics({k.replace("#", "_"): float(v) for k, v in metrics.items()})
            for name in (MANIFEST_FILE, "report.md"):
                if (self.out / name).exists():
                    mlflow.log_artifact(str(self.out / name))
            plots = self.out / "report_plots"
            if plots.exists():
                mlflow.log_artifacts(str(plots), "report_plots")


def _config_dict(cfg: CurateConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["sources"] = [dataclasses.asdict(s) for s in cfg.sources]
    return d


def run(cfg: CurateConfig) -> dict:
    from moray.platform.cluster import connect

    connect()
    return Curation(cfg).run()


__all__ = ["CurateConfig", "Curation", "EmptyCurationError", "load_config", "run"]
