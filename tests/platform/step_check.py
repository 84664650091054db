"""The check shared by the model-level layout tests: one step on several ranks against one process."""

from __future__ import annotations

import pytest
import torch


def assert_step_matches(got: dict, want: dict) -> None:
    """The same drops (capacity binds, so the global decision matters), the loss and each balance
    loss within 1e-5 relative, and every gradient (averaged over ranks as FSDP reduces them)."""
    assert want["dropped"] > 0 and got["dropped"] == want["dropped"]
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    for name, v in want["losses"].items():
        assert float(got["losses"][name]) == pytest.approx(float(v), rel=1e-5), name
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
