"""BufferMean: every rank's buffer becomes the mean of all of them, through shared memory or the
group's all-reduce, step after step; the shared file is gone once mapped."""

import os

import pytest
import torch

from moray.platform.buffer_mean import SHM_DIR, BufferMean
from tests.fixtures.ranks import run_ranks

NUMEL = 10  # over 3 ranks: parts of 3, 3 and 4 elements


def _means(rank: int, world: int, shared_memory: bool, shm_dir: str = SHM_DIR, elsewhere: int = -1) -> dict:
    import moray.platform.buffer_mean

    moray.platform.buffer_mean.SHM_DIR = shm_dir
    if rank == elsewhere:  # this rank runs on another machine: rank 0's file is not there
        moray.platform.buffer_mean.os.path.isfile = lambda path: False
    mean = BufferMean(NUMEL, shared_memory=shared_memory)
    out = []
    for step in range(3):  # the buffer is written again after each mean, as the next step's gradients
        mean.buffer.copy_(torch.arange(NUMEL, dtype=torch.float32) * (rank + 1) + step)
        out.append(mean.mean_().clone())
    return {"transport": mean.transport, "means": out}


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "all-reduce"])
def test_every_rank_gets_the_mean_of_every_buffer(tmp_path, shared_memory):
    before = set(os.listdir(SHM_DIR))
    results = run_ranks(_means, 3, tmp_path, shared_memory)
    for rank, got in enumerate(results):
        assert got["transport"] == ("shared memory" if shared_memory else "all-reduce")
        for step, mean in enumerate(got["means"]):
            want = torch.arange(NUMEL, dtype=torch.float32) * 2 + step  # ranks scale by 1, 2, 3
            torch.testing.assert_close(mean, want, rtol=0, atol=1e-6, msg=f"rank {rank} step {step}")
    assert not {f for f in set(os.listdir(SHM_DIR)) - before if f.startswith("moray-shared-")}


@pytest.mark.parametrize("case", ["no-room", "another-machine"])
def test_without_a_file_every_rank_maps_the_ranks_all_reduce(tmp_path, case):
    """Rank 0 cannot create the file (no /dev/shm, or no room in it), or rank 1 cannot see it (on
    another machine): every rank takes the all-reduce."""
    if case == "no-room":
        results = run_ranks(_means, 2, tmp_path, True, str(tmp_path / "no-such-dir"))
    else:
        results = run_ranks(_means, 2, tmp_path, True, SHM_DIR, 1)
    for got in results:
        assert got["transport"] == "all-reduce"
        want = torch.arange(NUMEL, dtype=torch.float32) * 1.5 + 2
        torch.testing.assert_close(got["means"][2], want, rtol=0, atol=1e-6)
