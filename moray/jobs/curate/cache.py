"""The stage cache: every curation stage runs through it, so a re-run skips what is already done.

A stage's fingerprint hashes the previous stage's fingerprint, the stage's name and everything its
output depends on besides the previous stage (its config section; for `prepare`, also the input
files' sizes and modification times). A stage is skipped when its record
`<out>/_stages/<name>.json` holds the same fingerprint and the outputs it lists are still there
with the sizes it wrote; otherwise it runs again, and so does every stage after it (their
fingerprints chain on it, and a stage that ran anew removes its record first, so an interrupted
run is never taken for a finished one).

Two kinds of stage:
- dataset stages (prepare ... mix) return a Ray Dataset; its rows are written to
  `<out>/_stages/<name>/` and read back, so the next stage reads Parquet, not a lineage;
- file stages (quarantine, tokenizer, pack) write their own files where the output contract wants
  them and return the paths written.
Each returns a JSON-able `extra` (its report data), kept in the record and given back on a skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fingerprint(previous: str, name: str, config: Any) -> str:
    conf = json.dumps(_plain(config), sort_keys=True, default=str)
    return hashlib.sha256(f"{previous}|{name}|{conf}".encode()).hexdigest()[:16]


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


# A stage whose node (or worker) dies under it runs again, whole: its inputs are the previous stage's
# files, and it rewrites its own outputs. Ray retries lost tasks itself, but not every Ray Data path
# survives a lost actor (the Parquet footer readers, for one).
STAGE_ATTEMPTS = 3
LOST = ("ActorDiedError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError",
        "ActorUnavailableError", "node has died", "node was terminated")  # fmt: skip


def lost_to_the_cluster(error: BaseException) -> bool:
    """True when `error` comes from a node or worker that died, not from the stage's own code (Ray
    Data may hand it on wrapped, or as an exception it could not deserialize: its text names it)."""
    import ray.exceptions as rex

    lost = (
        rex.ActorDiedError,
        rex.NodeDiedError,
        rex.WorkerCrashedError,
        rex.ObjectLostError,
        rex.OwnerDiedError,
    )
    return isinstance(error, lost) or any(marker in str(error) for marker in LOST)


class StageCache:
    def __init__(self, out: Path, row_schema, resume: bool = True):
        self.row_schema = row_schema  # of the dataset stages' rows: what an empty stage output holds
        self.root = Path(out) / "_stages"
        self.out = Path(out)
        self.resume = resume
        self.fingerprint = ""  # of the last stage run or skipped
        self.extras: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self.on_done: Callable[[str, float], None] | None = None  # (stage, seconds) after each stage run

    def dataset(self, name: str, config: Any, build: Callable[[], tuple[Any, dict]]):
        """build() -> (Ray Dataset, extra). Returns the stage's rows read back from Parquet. With
        no rows, an empty file with the row schema is written: Ray Data writes no file for an empty
        dataset, and the next stage must still read one (with its columns)."""
        import ray.data

        d = self.root / name

        def produce():
            shutil.rmtree(d, ignore_errors=True)
            ds, extra = build()
            ds.write_parquet(str(d))
            if not any(d.glob("*.parquet")):
                import pyarrow.parquet as pq

                d.mkdir(parents=True, exist_ok=True)
                pq.write_table(self.row_schema.empty_table(), d / "empty.parquet")
            return extra, [d]

        self._run(name, config, produce)
        return ray.data.read_parquet(str(d))

    def files(self, name: str, config: Any, build: Callable[[], tuple[dict, list[Path]]]) -> dict:
        """build() -> (extra, the files it wrote). Returns extra."""
        return self._run(name, config, build)

    def _run(self, name: str, config: Any, produce) -> dict:
        self.fingerprint = fingerprint(self.fingerprint, name, config)
        record = self.root / f"{name}.json"
        if self.resume and record.exists():
            done = json.loads(record.read_text())
            if done.get("fingerprint") == self.fingerprint and self._intact(done.get("outputs", {})):
                self.extras[name] = done.get("extra", {})
                self.skipped.append(name)
                print(f"[curate] {name}: already done for this config, skipped")
                return self.extras[name]
        self.root.mkdir(parents=True, exist_ok=True)
        record.unlink(missing_ok=True)
        t0 = time.perf_counter()
        for attempt in range(STAGE_ATTEMPTS):
            try:
                extra, outputs = produce()
                break
            except Exception as e:
                if attempt + 1 == STAGE_ATTEMPTS or not lost_to_the_cluster(e):
                    raise
                print(f"[curate] {name}: lost a node or worker ({type(e).__name__}); running the stage again")
        self.timings[name] = time.perf_counter() - t0
        extra = json.loads(json.dumps(extra, default=str))  # as a skip would give it back
        self.extras[name] = extra
        sizes = {str(Path(p).relative_to(self.out)): _size(Path(p)) for p in outputs}
        record.write_text(json.dumps({"fingerprint": self.fingerprint, "outputs": sizes, "extra": extra},
                                     default=str))  # fmt: skip
        print(f"[curate] {name}: done in {self.timings[name]:.1f}s")
        if self.on_done is not None:
            self.on_done(name, self.timings[name])
        return extra

    def _intact(self, outputs: dict[str, int]) -> bool:
        return all(_size(self.out / p) == size for p, size in outputs.items())


def _size(p: Path) -> int:
    """Bytes of a file, or of a folder's files; -1 when it is gone."""
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return -1
