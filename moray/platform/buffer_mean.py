"""The mean of one flat buffer over a process group: through shared memory where every rank runs
on this machine, else the group's all-reduce.

Two gloo ranks on one 2-core machine all-reduce the small preset's 336 MB of fp32 gradients in
about 300 ms: its ring sends every byte through loopback TCP and sums it on arrival. In shared
memory the same mean is two passes of memory traffic: every rank's buffer lives in one /dev/shm
file, mapped by all of them; each rank averages its 1/W of the elements over the W buffers in
place, then copies the other ranks' averaged parts into its own (what oneCCL and DeepSpeed do
between the ranks of one CPU node). `benchmarks/bench_pretrain.py` measures both.

Shared memory is used when rank 0's file can be opened by every rank (the same machine, the same
/dev/shm) and /dev/shm has room for it (reserved up front: a tmpfs that runs out mid-step would
kill the process); otherwise, or on GPUs, the buffer is private and all-reduced. `shared_tensor`
maps such a file for other state the ranks share (moray.jobs.pretrain.shared_update: the weights
and optimizer state of replicas that split the update, which take `sum_part_`, the first half of
the mean, only).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid

import torch
import torch.distributed as dist

log = logging.getLogger("moray.buffer_mean")

SHM_DIR = "/dev/shm"


class BufferMean:
    """`buffer` (numel,) is this rank's; `mean_()` replaces it on every rank by the mean of all
    ranks' buffers (a collective: every rank of `group` calls it)."""

    def __init__(self, numel: int, group=None, dtype: torch.dtype = torch.float32, device="cpu",
                 shared_memory: bool = True):  # fmt: skip
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.slots = None  # (world, numel): every rank's buffer, mapped from one file
        if shared_memory and torch.device(device).type == "cpu" and self.world > 1:
            self.slots = shared_tensor((self.world, numel), dtype, group)
        if self.slots is not None:
            self.buffer = self.slots[self.rank]
        else:
            self.buffer = torch.empty(numel, dtype=dtype, device=device)
        # the elements each rank averages: [bounds[r], bounds[r + 1])
        self.bounds = [numel * r // self.world for r in range(self.world + 1)]
        self.seconds = 0.0  # the last mean's, waiting for the other ranks included

    @property
    def transport(self) -> str:
        return "shared memory" if self.slots is not None else "all-reduce"

    def mean_(self) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.slots is not None:
            self._shared_mean()
        elif self.world > 1:
            dist.all_reduce(self.buffer, group=self.group)
            self.buffer.div_(self.world)
        self.seconds = time.perf_counter() - t0
        return self.buffer

    def sum_part_(self) -> torch.Tensor:
        """This rank's part of the sum of every rank's buffer (`part`), in place in its own buffer;
        the rest of it is left as it was (the reduce-scatter half of `mean_`, for ranks that each
        update their part of the weights: moray.jobs.pretrain.shared_update). Shared memory only.
        The other ranks read this rank's buffer until they have their own part: the caller keeps
        every rank from writing its buffer again before then (a barrier)."""
        t0 = time.perf_counter()
        dist.barrier(group=self.group)  # every rank's buffer is complete
        mine = self.part(self.rank, self.buffer)
        for r in range(self.world):
            if r != self.rank:
                mine.add_(self.part(self.rank, self.slots[r]))
        self.seconds = time.perf_counter() - t0
        return mine

    def _shared_mean(self) -> None:
        self.sum_part_().div_(self.world)
        dist.barrier(group=self.group)  # every part is averaged
        for r in range(self.world):
            if r != self.rank:
                self.part(r, self.buffer).copy_(self.part(r, self.slots[r]))
        # no rank writes its buffer again (the next step's gradients) before the others have read it
        dist.barrier(group=self.group)

    def part(self, r: int, t: torch.Tensor) -> torch.Tensor:
        """Rank r's elements of a (numel,) tensor."""
        return t[self.bounds[r] : self.bounds[r + 1]]


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype, group=None) -> torch.Tensor | None:
    """A tensor of zeros in a /dev/shm file every rank of `group` maps (the same memory on every
    rank), or None on every rank where one cannot map it. A collective."""
    rank = dist.get_rank(group)
    numel = math.prod(shape)
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    path = None
    if rank == 0:
        path = os.path.join(SHM_DIR, f"moray-shared-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now, not SIGBUS when a page is first touched
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("%s cannot hold %.0f MB (%s): every rank keeps its own", SHM_DIR, nbytes / 1e6, e)
            _remove(path)
            path = None
    box = [path]
    dist.broadcast_object_list(box, group=group, group_src=0)
    path, mapped = box[0], None
    # on another machine, or with another /dev/shm, there is no such file (from_file would create one)
    if path is not None and os.path.isfile(path) and os.path.getsize(path) == nbytes:
        # (posix_fallocate's blocks of a tmpfs read as zeros)
        mapped = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    found = torch.tensor([0 if mapped is None else 1])
    dist.all_reduce(found, op=dist.ReduceOp.MIN, group=group)
    if rank == 0 and path is not None:
        _remove(path)  # every rank has mapped it or given up: the memory lives as long as the mappings
    return mapped if bool(found) else None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
