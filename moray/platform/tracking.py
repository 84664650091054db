"""MLflow tracking: the server in `MLFLOW_TRACKING_URI`, else SQLite under the work directory.

(MLflow 3.17 refuses its plain file store, so the embedded default is `sqlite:///...`.)
"""

from __future__ import annotations

import os

from moray.platform.workdir import work_dir


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_dir() / 'mlflow.db'}"


def setup_mlflow(experiment: str):
    """Point mlflow at the tracking URI and select (creating if needed) the experiment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    return mlflow


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat `a.b.c` params (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out
