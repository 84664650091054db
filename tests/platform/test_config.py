from dataclasses import dataclass, field

import pytest

from moray.platform.config import ConfigError, apply_overrides, from_dict


@dataclass
class Train:
    max_steps: int = 10
    lr: float = 1e-3

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ConfigError(f"max_steps={self.max_steps}: must be positive")


@dataclass
class Job:
    name: str = "x"
    train: Train = field(default_factory=Train)
    workers: int | None = None


def test_overrides_and_nested_dataclasses():
    data = apply_overrides({"train": {"lr": 0.1}}, ["train.max_steps=20", "workers=2", "name=run"])
    job = from_dict(Job, data)
    assert job == Job(name="run", train=Train(max_steps=20, lr=0.1), workers=2)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"train": {"max_steps": -1}}, r"^train\.max_steps=-1: must be positive"),
        ({"train": {"max_step": 3}}, r"unknown field\(s\) in train: max_step"),
        ({"train": {"lr": "fast"}}, r"train\.lr='fast': expected float"),
        ({"bogus": 1}, r"unknown field\(s\): bogus"),
    ],
)
def test_errors_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Job, data)


def test_exponent_without_a_dot_is_a_float():
    assert from_dict(Job, apply_overrides({}, ["train.lr=5e-3"])).train.lr == 0.005


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.max_steps"])


def test_register_hf_model_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MORAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from moray.platform.tracking import register_hf_model, setup_mlflow

    mlflow = setup_mlflow("unit")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with mlflow.start_run() as run:
        pass
    assert register_hf_model(hf, "unit-model", run.info.run_id) == 1
    assert register_hf_model(hf, "unit-model", run.info.run_id) == 2
    local = mlflow.artifacts.download_artifacts("models:/unit-model/2")
    assert (tmp_path / "home").as_posix() in mlflow.get_experiment_by_name("unit").artifact_location
    assert sorted(p.name for p in __import__("pathlib").Path(local).iterdir()) == ["config.json"]


def test_a_sqlite_store_keeps_artifacts_beside_it(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever directory the job (or a test) runs in."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    (tmp_path / "store").mkdir()
    from moray.platform.tracking import setup_mlflow

    mlflow = setup_mlflow("beside")
    assert (
        mlflow.get_experiment_by_name("beside").artifact_location
        == (tmp_path / "store" / "mlartifacts").as_uri()
    )
