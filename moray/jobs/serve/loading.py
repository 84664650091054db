"""Where serving gets its model: an HF directory, or an MLflow registered model
(`models:/NAME/VERSION`, `models:/NAME@ALIAS`, also `runs:/RUN/PATH`) downloaded to a local
directory first. The directory holds config.json, *.safetensors and tokenizer.json."""

from __future__ import annotations

import hashlib
from pathlib import Path

from moray.platform.tracking import tracking_uri
from moray.platform.workdir import work_dir

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def _find_model_dir(root: Path) -> Path:
    candidates = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    for c in candidates:
        if any(c.parent.glob("*.safetensors")):
            return c.parent
    raise FileNotFoundError(f"{root} holds no HF model directory (config.json + *.safetensors)")


def resolve_model(uri: str, tracking: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local HF directory for `uri` (a path, or an MLflow URI that is downloaded)."""
    if uri.startswith(MLFLOW_SCHEMES):
        import mlflow

        mlflow.set_tracking_uri(tracking or tracking_uri())
        key = hashlib.sha1(f"{mlflow.get_tracking_uri()}|{uri}".encode()).hexdigest()[:16]
        dst = Path(cache_dir or work_dir() / "serve_models") / key
        if not dst.is_dir() or not any(dst.iterdir()):
            dst.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
        return _find_model_dir(dst)
    path = Path(uri)
    check_model_dir(path)
    return path


def check_model_dir(path: Path) -> None:
    """FileNotFoundError, in one line, unless `path` is an HF directory with config.json and weights."""
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(path)!r}: no such directory (and not an MLflow models:/ URI)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {str(path)!r}: no config.json there (not an HF model directory)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model {str(path)!r}: no *.safetensors weights there")


def check_model_source(uri: str, tracking: str | None = None) -> None:
    """Refuse a model that cannot load, before anything starts: a local directory is checked in full;
    a registered model (models:/NAME/VERSION, models:/NAME@ALIAS) must exist in the registry."""
    if not uri.startswith(MLFLOW_SCHEMES):
        check_model_dir(Path(uri))
        return
    if not uri.startswith("models:/"):
        return  # runs:/ and artifact URIs: checked by the download itself
    import mlflow
    from mlflow.exceptions import MlflowException

    from moray.platform.registry import model_version

    where = tracking or tracking_uri()
    try:
        model_version(mlflow.MlflowClient(where), uri)
    except (MlflowException, LookupError) as e:
        why = e.message.splitlines()[0] if isinstance(e, MlflowException) else str(e)
        raise FileNotFoundError(f"model {uri!r}: not in the registry at {where} ({why})") from None


def model_config(uri: str, tracking: str | None = None):
    """The ModelConfig of a model directory or registered model (downloaded once, like serving)."""
    import json

    from moray.model.config import ModelConfig

    path = resolve_model(uri, tracking)
    return ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))


def load_for_serving(
    uri: str,
    tracking: str | None = None,
    dtype=None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    routed_experts: bool = True,
    **parts,
):
    """(model, tokenizer or None, local dir). routed_experts=False: the routed experts stay unread
    (expert shards hold them); `parts` (layers=, ends=) go to load_pretrained (pipeline stages)."""
    import torch

    from moray.actors.engine.tokenizer import Tokenizer
    from moray.model import load_pretrained

    path = resolve_model(uri, tracking, cache_dir)
    model = load_pretrained(
        path, dtype=dtype or torch.float32, device=device, routed_experts=routed_experts, **parts
    )
    model.eval()
    tok = None
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(path, eos_token_id=model.config.eos_token_id)
    return model, tok, path
