"""Data that survives any world size.

The samples of step s are the global indices [s*B, (s+1)*B) with B the global batch size, each
generated from (seed, index) alone. Rank r of a world of W takes a contiguous slice of them; slices
differ by at most one sample. Because each rank's mean loss is scaled by W * n_r / B (see
`loss_scale`), the gradient averaged by DDP/FSDP equals the gradient of the mean loss over the whole
global batch, whatever W is. The data cursor is simply the step number.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

from train.task import Task


def rank_slice(global_batch_size: int, world_size: int, rank: int) -> Tuple[int, int]:
    """(start, stop) offsets inside the global batch owned by `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    base, extra = divmod(global_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def loss_scale(global_batch_size: int, world_size: int, rank: int) -> float:
    """Factor on the rank's mean loss so that the all-reduce *average* of gradients equals the
    gradient of the global-batch mean loss: W * n_r / B."""
    start, stop = rank_slice(global_batch_size, world_size, rank)
    return world_size * (stop - start) / global_batch_size


def share(global_batch_size: int, world_size: int, rank: int) -> float:
    """The rank's share of the global batch, n_r / B (weights its loss in the global mean)."""
    start, stop = rank_slice(global_batch_size, world_size, rank)
    return (stop - start) / global_batch_size


def local_batch(task: Task, seed: int, step: int, global_batch_size: int, world_size: int,
                rank: int) -> Dict[str, torch.Tensor]:
    start, stop = rank_slice(global_batch_size, world_size, rank)
    first = step * global_batch_size
    return task.collate([task.sample(first + i, seed) for i in range(start, stop)])


def micro_batch_spans(samples: int, micro_batch_size: Optional[int]) -> List[Tuple[int, int]]:
    """(start, stop) offsets of the micro-batches of a slice of `samples` (at least one span,
    empty for an empty slice)."""
    m = micro_batch_size or max(samples, 1)
    return [(a, min(a + m, samples)) for a in range(0, samples, m)] or [(0, 0)]


def local_micro_batches(task: Task, seed: int, step: int, global_batch_size: int,
                        world_size: int, rank: int, micro_batch_size: Optional[int]
                        ) -> Union[Dict[str, torch.Tensor], List[Tuple[Dict[str, torch.Tensor],
                                                                       float]]]:
    """The rank's slice of step `step` for `train_step`: the whole slice as one batch without a
    micro-batch size (or when it fits one), else its micro-batches of at most
    `micro_batch_size` samples, in sample order, each with its share of the slice. Each is
    collated on its own, so no more than one micro-batch is ever built at once."""
    start, stop = rank_slice(global_batch_size, world_size, rank)
    n = stop - start
    if micro_batch_size is None or n <= micro_batch_size:
        return local_batch(task, seed, step, global_batch_size, world_size, rank)
    first = step * global_batch_size + start
    return [(task.collate([task.sample(first + i, seed) for i in range(a, b)]), (b - a) / n)
            for a, b in micro_batch_spans(n, micro_batch_size)]


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 32-bit seed from (seed, index) (splitmix64's finaliser). 32 bits because
    torch's CPU generator (mt19937) keeps only the low 32 bits of what it is seeded with."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 32


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, index) alone: the per-sample randomness of built-in tasks."""
    return torch.Generator().manual_seed(sample_seed(seed, index))


def held_out_generator(seed: int, index: int) -> torch.Generator:
    """The generator of held-out sample `index` (built-in tasks' `eval_sample`): the training
    stream's sample -1 - index, which no training sample (index >= 0) ever draws."""
    return sample_generator(seed, -1 - index)
