"""MLflow tracking: the server in `MLFLOW_TRACKING_URI`, else SQLite under the work directory.

(MLflow 3.17 refuses its plain file store, so the embedded default is `sqlite:///...`.)
"""

from __future__ import annotations

import os
from pathlib import Path

from moray.platform.workdir import work_dir

# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, "Evaluations");
# moray's experiments are model training: the UI then opens on runs, metrics and charts.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: MODEL_TRAINING}


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
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        location = _artifact_location(tracking_uri())
        try:
            mlflow.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:  # created concurrently by another process: fine
            pass
    elif found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:  # made before moray tagged its experiments
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
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


def find_run(client, ref: str, where: str):
    """The MLflow run `ref` names: a run id, else the newest run of that name (moray's run name or
    MLflow's) in any experiment. Raises LookupError naming the store searched (`where`)."""
    from mlflow.exceptions import MlflowException

    if len(ref) == 32 and all(ch in "0123456789abcdef" for ch in ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    for key in ("tags.`moray.run_name`", "attributes.run_name"):
        runs = client.search_runs(experiments, f"{key} = '{ref}'", order_by=["attributes.start_time DESC"],
                                  max_results=1)  # fmt: skip
        if runs:
            return runs[0]
    raise LookupError(f"no MLflow run with id or name {ref!r} in {where}")
