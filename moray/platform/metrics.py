"""Prometheus gauges through `ray.util.metrics`, created on first use and kept current.

Ray exports a gauge only when it is set, and its metrics agent drops a series not refreshed for two
export intervals (about 20 s). A figure set once (a curation stage's time, the funnel) would vanish
before Prometheus is sure to scrape it, so the last value of every series is set again every few
seconds while the process lives, the way a Prometheus client library keeps a gauge. A metric holder
can exist outside Ray (a unit test, a local tool); it then records nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

REFRESH_S = 5.0  # under half of Ray's 10 s export interval


class LazyGauges:
    """`build(ray.util.metrics)` -> {key: Gauge}, called the first time `set` runs inside Ray."""

    def __init__(self, build: Callable[[object], dict]):
        self._build, self._gauges = build, None
        self._last: dict[tuple[str, tuple], float] = {}  # (key, tags) -> value
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def set(self, key: str, value: float, tags: dict[str, str]) -> None:
        gauges = self._get()
        if not gauges:
            return
        gauges[key].set(value, tags)
        with self._lock:
            self._last[(key, tuple(sorted(tags.items())))] = value
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, name="moray-gauges", daemon=True)
                self._refresher.start()

    def _get(self) -> dict:
        if self._gauges is None:
            import ray

            if not ray.is_initialized():
                return {}
            from ray.util import metrics

            self._gauges = self._build(metrics)
        return self._gauges

    def _refresh(self) -> None:
        while True:
            time.sleep(REFRESH_S)
            with self._lock:
                last = list(self._last.items())
            for (key, tags), value in last:
                self._gauges[key].set(value, dict(tags))
