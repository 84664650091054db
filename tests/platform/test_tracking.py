"""moray's experiments open in MLflow's UI as machine-learning experiments (runs, metrics, charts),
not in its GenAI view: checked against the UI that the installed MLflow serves (no browser runs
here), so an MLflow upgrade that renames the tag or its value fails this test."""

import re
from pathlib import Path

import mlflow

from moray.platform.tracking import EXPERIMENT_KIND, MODEL_TRAINING, setup_mlflow


def _ui_bundle() -> str:
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(p.read_text(errors="replace") for p in js.glob("main.*.js"))


def test_the_ui_reads_the_experiment_kind_tag_moray_sets():
    ui = _ui_bundle()
    assert f'"{EXPERIMENT_KIND}"===e.key' in ui  # the tag the UI looks the experiment's kind up by
    # ... and the value moray sets is the UI's "Machine learning" kind (not GenAI apps & agents)
    kinds = dict(re.findall(r'e\.([A-Z_]+)="([a-z_]+)"', ui))
    assert kinds["CUSTOM_MODEL_DEVELOPMENT"] == MODEL_TRAINING
    label = r'\.CUSTOM_MODEL_DEVELOPMENT\]:\(0,\w+\.\w+\)\(\{id:"[^"]+",defaultMessage:"([^"]+)"'
    assert "Machine learning" in re.findall(label, ui)


def test_experiments_are_created_with_that_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking = setup_mlflow("moray-kind-check")
    experiment = tracking.get_experiment_by_name("moray-kind-check")
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING
