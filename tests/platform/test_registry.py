"""The MLflow side of the platform on a throwaway SQLite store: moray's experiments open as model
training in MLflow's UI, runs are found by id or name, and `moray models list|promote` shows
versions with their lineage and moves the alias that `models:/NAME@champion` follows."""

import json

import pytest

from moray.platform.registry import main, model_version, parse_model_uri


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MORAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from moray.platform.tracking import setup_mlflow

    return setup_mlflow("unit")


def _register(mlflow, tmp_path, name: str, tags: dict) -> None:
    from moray.platform.tracking import register_hf_model

    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text("{}")
    with mlflow.start_run(run_name="pretrain-a") as run:
        pass
    version = register_hf_model(hf, name, run.info.run_id)
    for k, v in tags.items():
        mlflow.MlflowClient().set_model_version_tag(name, str(version), k, v)
    return run.info.run_id


def test_experiments_are_model_training_in_the_ui(store):
    from moray.platform.tracking import EXPERIMENT_KIND, setup_mlflow

    assert store.get_experiment_by_name("unit").tags[EXPERIMENT_KIND] == "custom_model_development"
    # an experiment made before moray tagged them gets the tag when a job next uses it
    client = store.MlflowClient()
    client.delete_experiment_tag(store.get_experiment_by_name("unit").experiment_id, EXPERIMENT_KIND)
    setup_mlflow("unit")
    assert store.get_experiment_by_name("unit").tags[EXPERIMENT_KIND] == "custom_model_development"


def test_find_run_by_id_or_name(store):
    from moray.platform.tracking import find_run

    client = store.MlflowClient()
    with store.start_run(run_name="mine", tags={"moray.run_name": "mine"}) as old:
        pass
    with store.start_run(run_name="mine", tags={"moray.run_name": "mine"}) as new:
        pass
    assert find_run(client, old.info.run_id, "here").info.run_id == old.info.run_id
    assert find_run(client, "mine", "here").info.run_id == new.info.run_id  # the newest of the name
    with pytest.raises(LookupError, match="no MLflow run with id or name 'other' in here"):
        find_run(client, "other", "here")


def test_list_shows_versions_lineage_and_evaluations(store, tmp_path, capsys):
    run_id = _register(store, tmp_path, "m", {"moray.lineage.curation_run": "c0ffee", "eval.mmlu.acc": "0.25",
                                              "moray.data.manifest_sha256": "ab" * 32, "eval.tasks": "mmlu"})  # fmt: skip
    _register(store, tmp_path, "m", {})
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"]) for r in rows] == [("m", 1), ("m", 2)]
    assert rows[0]["run_id"] == run_id
    assert rows[0]["lineage"] == {"curation_run": "c0ffee", "manifest_sha256": "ab" * 32}
    assert rows[0]["eval"] == {"mmlu.acc": "0.25", "tasks": "mmlu"}
    assert main(["list", "m"]) == 0
    table = capsys.readouterr().out
    assert "curation run c0ffee" in table and "mmlu.acc 0.25" in table


def test_promote_moves_the_alias_that_models_uris_follow(store, tmp_path, capsys):
    _register(store, tmp_path, "m", {})
    _register(store, tmp_path, "m", {})
    client = store.MlflowClient()
    assert main(["promote", "m", "1"]) == 0
    assert capsys.readouterr().out.strip() == "models:/m@champion -> version 1"
    assert int(model_version(client, "models:/m@champion").version) == 1
    assert main(["promote", "m", "2", "--alias", "champion"]) == 0
    assert "(was version 1)" in capsys.readouterr().out
    assert int(model_version(client, "models:/m@champion").version) == 2
    assert int(model_version(client, "models:/m").version) == 2  # newest
    assert int(model_version(client, "models:/m/1").version) == 1
    main(["list", "--json"])
    assert [r["aliases"] for r in json.loads(capsys.readouterr().out)] == [[], ["champion"]]


def test_bad_references_are_refused_with_a_message(store, tmp_path, capsys):
    _register(store, tmp_path, "m", {})
    assert main(["promote", "m", "7"]) == 2
    assert "moray models:" in capsys.readouterr().err
    assert main(["list", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prom", "m", "1"])  # no abbreviations


def test_parse_model_uri():
    assert parse_model_uri("models:/m/3") == ("m", "3", None)
    assert parse_model_uri("models:/m@champion") == ("m", None, "champion")
    assert parse_model_uri("models:/m") == ("m", None, None)
