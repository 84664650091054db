"""MLflow tracking: the server in `MLFLOW_TRACKING_URI`, else SQLite under the work directory.

(MLflow 3.17 refuses its plain file store, so the embedded default is `sqlite:///...`.)
"""

from __future__ import annotations

import os
from pathlib import Path

from moray.platform.workdir import work_dir


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_dir() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Beside a SQLite store, `mlartifacts/` (MLflow would use ./mlruns of whatever directory the
    job runs in); a tracking server keeps its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def setup_mlflow(experiment: str):
    """Point mlflow at the tracking URI and select (creating if needed) the experiment. With a
    SQLite store (the embedded default's, under the work directory), artifacts go beside it."""
    import mlflow

    embedded = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports it
    mlflow.set_tracking_uri(tracking_uri())
    if embedded:  # don't leak the embedded URI into this process's environment (and children's)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = _artifact_location(tracking_uri())
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently by another process: fine
            pass
    mlflow.set_experiment(experiment)
    return mlflow


def register_hf_model(hf_dir, name: str, run_id: str, artifact_path: str = "model") -> int:
    """Log a Hugging Face model directory as run artifacts and register it as a new version of
    `name`; `models:/NAME/VERSION` then downloads that directory. Returns the version."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    client.log_artifacts(run_id, str(hf_dir), artifact_path=artifact_path)
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # already registered: add a version
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return int(client.create_model_version(name, source=source, run_id=run_id).version)


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
