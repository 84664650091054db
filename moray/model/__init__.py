"""The DeepSeek-V2 model in plain PyTorch: no Ray, no MLflow, single-device semantics."""

from moray.model.cache import LatentCache
from moray.model.capacity import CapacityController
from moray.model.config import ModelConfig
from moray.model.generation import generate
from moray.model.hf import load_pretrained, save_pretrained
from moray.model.presets import PRESETS, preset
from moray.model.sampling import SamplingParams
from moray.model.transformer import ModelOutput, Transformer

__all__ = [
    "CapacityController", "LatentCache", "ModelConfig", "ModelOutput", "PRESETS",
    "SamplingParams", "Transformer", "generate", "load_pretrained", "preset", "save_pretrained",
]  # fmt: skip
