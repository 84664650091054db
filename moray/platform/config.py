"""Job configs: YAML files plus dotted overrides (`--set train.max_steps=20 scaling.num_workers=2`),
parsed into dataclasses and validated in full before any cluster work starts.

Errors name the field by its dotted path: `ConfigError("train.max_steps=-1: must be positive")`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is invalid; the message names the field by its dotted path. The one config
    error of the platform: the model package raises plain ValueErrors naming the field, which
    `from_dict` turns into ConfigErrors with the path."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML: numbers, booleans, lists...)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields; unknown keys,
    wrong types and the dataclasses' own __post_init__ checks become ConfigErrors with the path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"unknown field(s){where}: {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        dotted = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path + '.' if path else ''}{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, dotted) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, dotted)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{dotted}={value!r}: expected {tp.__name__}")
    return value


@dataclasses.dataclass
class ModelSpec:
    """A model named by a preset plus ModelConfig field overrides: the `model:` section of a job
    config and the shape of configs/model/*.yaml. The one way a preset becomes a ModelConfig."""

    preset: str = "tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self, **fixed: Any):
        """The ModelConfig, with `fixed` fields (set by the caller: data, layout) over the overrides."""
        from moray.model import preset

        try:
            return preset(self.preset, **{**self.overrides, **fixed})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None


def load_model_config(name_or_path: str):
    """A preset name, a model YAML (a ModelSpec), or an HF directory / config.json."""
    import json

    from moray.model import ModelConfig
    from moray.model.presets import PRESETS

    if name_or_path in PRESETS:
        return ModelSpec(name_or_path).build()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return from_dict(ModelSpec, load_yaml(path)).build()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ConfigError(
            f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}), a model YAML, nor a config.json"
        )
    try:
        return ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{config_file}: {e}") from None
