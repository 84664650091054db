"""Dynamic capacity factor: moves the factor toward a target drop rate, within bounds.

Each training step feeds the observed drop rate (dropped / routed pairs, summed over MoE layers
and, by the caller, over ranks). Too many drops: raise the factor, which costs memory and
compute; too few: lower it. The update is multiplicative and damped so the factor settles
instead of oscillating; its state goes into checkpoints for exact resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class CapacityController:
    factor: float = 1.25
    target_drop_rate: float = 0.01
    min_factor: float = 1.0
    max_factor: float = 4.0
    gain: float = 2.0  # log-factor change per unit of drop-rate error
    max_step: float = 0.05  # at most +-5% per update

    def __post_init__(self) -> None:
        if not 0 < self.min_factor <= self.factor <= self.max_factor:
            raise ValueError(
                f"capacity factor {self.factor} must lie within [min_factor={self.min_factor}, "
                f"max_factor={self.max_factor}] and be positive"
            )
        if not 0 <= self.target_drop_rate < 1:
            raise ValueError(f"target_drop_rate={self.target_drop_rate} must be in [0, 1)")

    def update(self, drop_rate: float) -> float:
        error = drop_rate - self.target_drop_rate
        step = max(-self.max_step, min(self.max_step, self.gain * error))
        self.factor = min(self.max_factor, max(self.min_factor, self.factor * math.exp(step)))
        return self.factor

    def apply(self, model) -> None:
        """Set this factor on every MoE layer of a moray Transformer."""
        model.set_capacity_factor(self.factor)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise ValueError(f"unknown capacity controller state {unknown}; expected {sorted(names)}")
        checked = CapacityController(**{**asdict(self), **state})  # the factor must lie within its bounds
        for k, v in asdict(checked).items():
            setattr(self, k, v)
