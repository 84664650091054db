"""Packed token shards -> per-rank micro-batches, in a deterministic order, resumable by step.

Ray Data reads the curated Parquet shards (in sorted file order, order preserved) and streams
them to every worker with `get_dataset_shard`. The data position is the optimizer step: step s
consumes global sequences [s*G, (s+1)*G) of the epoch's order (G = global batch size, fixed for
the run), and data-parallel rank r of dp takes the contiguous slice [r*G/dp, (r+1)*G/dp) of it.

Why every worker streams the whole split rather than a `streaming_split` part: Ray Data deals
blocks to splits dynamically, so which rank sees which sequence — and so the content of a step —
would depend on timing and on the world size. Reading G/dp of every G rows costs dp-fold I/O of
token ids (small next to the model's compute) and buys exactness: a resumed run, with the same or
another data-parallel size, neither skips nor repeats a sequence, and in deterministic mode
reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from moray.platform.data_contract import EXEC_LABELS_COLUMN, TOKENS_COLUMN, shard_files

# CPUs a read task asks Ray for. Reading token ids is light, and Ray Train's workers hold their CPUs
# away from Ray Data while every worker runs its own read of the split: a whole CPU per read task
# (Ray's default) would leave the reads of 4 workers on 2 CPUs waiting forever. The run needs this
# much CPU beyond its workers (job._check_cpus).
READ_TASK_CPUS = 0.25


def read_split(data_path: str, split: str, exec_labels: bool = False):
    """A Ray Dataset over one split's shards, in file order (with the code-execution labels)."""
    import ray.data

    # Ray Data's newer Parquet path lists files in tasks of a whole CPU each, whatever `num_cpus`
    # says; the file list is known here, so read through the path whose tasks take READ_TASK_CPUS.
    context = ray.data.DataContext.get_current()
    saved, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            shard_files(data_path, split),
            columns=[TOKENS_COLUMN, *([EXEC_LABELS_COLUMN] if exec_labels else [])],
            shuffle=None,
            num_cpus=READ_TASK_CPUS,
        )
    finally:
        context.use_datasource_v2 = saved
    # Every rank re-reads the split each epoch: per-worker progress bars would only be noise.
    ds.context.enable_progress_bars = False
    return ds


@dataclass
class Batch:
    step: int
    inputs: torch.Tensor  # (b, seq_len) tokens
    targets: torch.Tensor  # (b, seq_len) next tokens
    first_sample: int  # global index (within the epoch order) of this rank's first sequence
    exec_labels: torch.Tensor | None = None  # (b, seq_len + 1) int8, where the data carries them


def step_batches(
    iterate_epoch,  # () -> iterator over numpy batches of exactly G rows (drop_last), epoch order
    start_step: int,
    max_steps: int,
    steps_per_epoch: int,
    global_batch: int,
    rank: int,
    dp: int,
) -> Iterator[Batch]:
    """This rank's slice of every global batch from `start_step` to `max_steps`."""
    if global_batch % dp:
        raise ValueError(f"global batch {global_batch} is not divisible by data-parallel size {dp}")
    per_rank = global_batch // dp
    step = start_step
    if steps_per_epoch < 1:
        raise ValueError(f"the split holds less than one global batch of {global_batch} sequences")
    while step < max_steps:
        skip = step % steps_per_epoch  # batches of this epoch already consumed
        for i, batch in enumerate(iterate_epoch()):
            if i < skip:
                continue
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            seqs = torch.from_numpy(
                np.stack(list(batch[TOKENS_COLUMN]))[mine].astype(np.int64)
            )  # (b, seq_len + 1)
            labels = None
            if EXEC_LABELS_COLUMN in batch:
                labels = torch.from_numpy(np.stack(list(batch[EXEC_LABELS_COLUMN]))[mine].astype(np.int8))
            yield Batch(step, seqs[:, :-1], seqs[:, 1:], i * global_batch + rank * per_rank, labels)
            step += 1
            if step >= max_steps:
                return


def iterate_split(shard, global_batch: int):
    """An `iterate_epoch` for step_batches over a Ray DataIterator (or any object with iter_batches)."""

    def epoch():
        return shard.iter_batches(batch_size=global_batch, batch_format="numpy", drop_last=True)

    return epoch
