"""Curation's figures as Prometheus gauges through `ray.util.metrics` (what
dashboards/moray-curation.json charts), tagged with the output's name: each stage's seconds and
records per second as it finishes, then the funnel (documents left after each step) and the
documents by outcome. A no-op outside Ray."""

from __future__ import annotations

from moray.jobs.curate.ledger import OUTCOMES
from moray.platform.metrics import LazyGauges


class CurationGauges:
    def __init__(self, output: str):
        self.tags = {"output": output}
        self._gauges = LazyGauges(self._build)

    @staticmethod
    def _build(rm) -> dict:
        keys = ("output", "stage")
        return {
            "seconds": rm.Gauge("moray_curate_stage_seconds", "Seconds a curation stage took", keys),
            "rate": rm.Gauge(
                "moray_curate_stage_records_per_second", "Records a stage read per second", keys
            ),
            "funnel": rm.Gauge("moray_curate_funnel_documents", "Documents left after each step", keys),
            "outcome": rm.Gauge("moray_curate_documents", "Documents by outcome", ("output", "outcome")),
        }

    def stage(self, name: str, seconds: float, records: int | None) -> None:
        tags = {**self.tags, "stage": name}
        self._gauges.set("seconds", seconds, tags)
        if records is not None:
            self._gauges.set("rate", records / max(seconds, 1e-9), tags)

    def result(self, funnel: list[dict], counts: dict) -> None:
        """The ledger's funnel (rows of {"stage", "all", per domain}) and its counts["all"] by outcome."""
        for row in funnel:
            self._gauges.set("funnel", row["all"], {**self.tags, "stage": row["stage"]})
        for outcome in ("input", *OUTCOMES):
            self._gauges.set("outcome", counts["all"][outcome], {**self.tags, "outcome": outcome})
