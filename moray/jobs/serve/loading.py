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
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{uri!r} is neither an HF model directory nor an MLflow model URI")
    return path


def load_for_serving(uri: str, tracking: str | None = None, dtype=None, cache_dir: str | Path | None = None):
    """(model, tokenizer or None, local dir)."""
    import torch

    from moray.actors.engine.tokenizer import Tokenizer
    from moray.model import load_pretrained

    path = resolve_model(uri, tracking, cache_dir)
    model = load_pretrained(path, dtype=dtype or torch.float32).eval()
    tok = None
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(path, eos_token_id=model.config.eos_token_id)
    return model, tok, path
