"""The DeepSeek-V2 model in plain PyTorch: no Ray, no MLflow, single-device semantics."""

from moray.model.cache import LatentCache
from moray.model.capacity import CapacityController
from moray.model.config import ConfigError, ModelConfig
from moray.model.presets import PRESETS, preset
from moray.model.transformer import ModelOutput, Transformer


def __getattr__(name):  # heavier submodules load on first use
    if name in ("load_pretrained", "save_pretrained"):
        from moray.model import hf

        return getattr(hf, name)
    if name in ("generate", "SamplingParams"):
        from moray.model import generate

        return getattr(generate, name)
    raise AttributeError(name)


__all__ = [
    "CapacityController", "ConfigError", "LatentCache", "ModelConfig", "ModelOutput", "PRESETS",
    "Transformer", "generate", "load_pretrained", "preset", "save_pretrained", "SamplingParams",
]  # fmt: skip
