"""What a checkpoint restores besides the model and optimizer tensors, as components that each
have `state_dict` / `load_state_dict` (torchtitan's "stateful" pieces).

    data       the data position: the next step, and the sequences consumed so far
    scheduler  the learning-rate schedule (LambdaLR's state)
    rng        torch's generators (CPU, and CUDA when present)
    capacity   the dynamic capacity-factor controller (absent when dropless)

The model's own buffers (the router's score-correction bias) travel with the model's tensors in
the DCP checkpoint, so they have no second copy here. `TrainState.state_dict()` is JSON: it goes
into rank 0's checkpoint manifest.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import torch


@dataclass
class DataPosition:
    """Step s consumes global sequences [s*G, (s+1)*G) of the epoch order (see data.py)."""

    global_batch: int
    step: int = 0

    @property
    def samples_consumed(self) -> int:
        return self.step * self.global_batch

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        if state["samples_consumed"] % self.global_batch:
            raise ValueError(
                f"checkpoint consumed {state['samples_consumed']} sequences, not a whole number of "
                f"global batches of {self.global_batch}: data.global_batch_size changed since it was saved"
            )
        self.step = state["samples_consumed"] // self.global_batch


class RNGState:
    def state_dict(self) -> dict:
        out = {"cpu": _b64(torch.get_rng_state())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = _b64(torch.cuda.get_rng_state())
        return out

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(_unb64(state["cpu"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_unb64(state["cuda"]))


class CapacityState:
    """The controller, re-applied to the model's MoE layers when loaded."""

    def __init__(self, controller, model):
        self.controller, self.model = controller, model

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)
        self.controller.apply(self.model)


class TrainState:
    def __init__(self, **parts):
        self.parts = {name: part for name, part in parts.items() if part is not None}

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise ValueError(f"checkpoint state lacks {missing} (saved by another configuration?)")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
