"""Mixed-precision helpers for code that autocast does not reach, or must not.

autocast casts the operands of matmuls to its dtype (bf16) and leaves the parameters fp32. Two
places in the model need to know: the router keeps its scores fp32 under autocast, and the routed
experts' custom autograd Function, which autocast does not see into, casts its operands itself.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")  # meta tensors (plans, HF loading) have no autocast state


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on this device type, or None when it is off."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def full_precision(device_type: str):
    """A context that turns autocast off where it is on (and does nothing elsewhere)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
