"""Loading for serving: an HF directory, and an MLflow registered model by version and by alias
(registered here in a temporary SQLite tracking store)."""

import pytest
import torch

from moray.jobs.serve.loading import load_for_serving, resolve_model


def test_hf_directory(tiny_model_dir):
    model, tok, path = load_for_serving(str(tiny_model_dir))
    assert path == tiny_model_dir and tok is not None
    assert tok.decode(tok.encode("My lord")) == "My lord"
    assert "<|user|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tiny_model_dir / "nope"))


def test_mlflow_registered_model_version_and_alias(tiny_model_dir, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = MlflowClient(uri).create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(tiny_model_dir), artifact_path="model")
    client = MlflowClient(uri)
    client.create_registered_model("tiny-moe")
    v = client.create_model_version("tiny-moe", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("tiny-moe", "champion", v.version)

    ref, _, _ = load_for_serving(str(tiny_model_dir))
    for model_uri in (f"models:/tiny-moe/{v.version}", "models:/tiny-moe@champion"):
        path = resolve_model(model_uri, uri, tmp_path / "cache")
        assert (path / "tokenizer.json").is_file()
        model, tok, _ = load_for_serving(model_uri, uri, cache_dir=tmp_path / "cache")
        ids = torch.tensor([[5, 6, 7]])
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_chat_template_from_tokenizer_config(tiny_model_dir, tmp_path):
    import json
    import shutil

    from moray.actors.engine import Tokenizer

    d = tmp_path / "with_template"
    shutil.copytree(tiny_model_dir, d)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = Tokenizer.from_dir(d)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "[user] hi\n[assistant] "
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # takes precedence
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
