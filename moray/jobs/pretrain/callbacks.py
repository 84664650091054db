"""Hooks into the training loop, called on every rank. The loop knows nothing of what they do.

`KillWorkerOnce` is the fault-injection hook the fault-tolerance tests use: it kills one rank's
process once, hard (SIGKILL, like a lost node), at the start of a given step; a marker file makes
sure the restarted run does not die again.
"""

from __future__ import annotations

import os
import signal
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
