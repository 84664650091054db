"""Hooks into the training loop, called on every rank. The loop knows nothing of what they do.

`KillWorkerOnce` is the fault-injection hook the fault-tolerance tests use: it kills one rank's
process once, hard (SIGKILL, like a lost node), at the start of a given step; a marker file makes
sure the restarted run does not die again. `AwaitNodeLoss` is the multi-node test's: at a given
step one rank writes its Ray node id to the marker and waits, so the test can kill that whole node.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


class Callback:
    def on_step_start(self, step: int, rank: int) -> None:
        pass


@dataclass
class KillWorkerOnce(Callback):
    rank: int
    step: int
    marker: str  # a path every worker can see; written just before the kill

    def on_step_start(self, step: int, rank: int) -> None:
        if rank == self.rank and step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class AwaitNodeLoss(Callback):
    rank: int
    step: int
    marker: str  # written with the rank's node id; the test kills that node (its raylet)
    timeout_s: float = 120.0

    def on_step_start(self, step: int, rank: int) -> None:
        if rank == self.rank and step == self.step and not Path(self.marker).exists():
            import ray

            Path(self.marker).write_text(ray.get_runtime_context().get_node_id())
            time.sleep(self.timeout_s)  # the node goes down with this process long before
            raise RuntimeError(f"node of rank {rank} was not killed within {self.timeout_s} s")
