"""The work directory: data, checkpoints, artifacts and the embedded MLflow database.

`MORAY_HOME` if set, else `.moray/` under the current directory. On a cluster, jobs take a
storage URI from their config instead; this is the embedded single-machine default.
"""

from __future__ import annotations

import os
from pathlib import Path


def work_dir() -> Path:
    path = Path(os.environ.get("MORAY_HOME", ".moray")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
