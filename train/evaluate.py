"""Evaluation: the mean loss over a fixed held-out set, computed by the current world.

The held-out samples 0 .. n-1 (the task's `eval_sample`) are split over the ranks like a global
batch (`data.rank_slice`); each rank sums its samples' losses and one all-reduce adds the sums, so
the mean is the same at any world size (up to the order of a float sum). It runs in eval mode,
without gradients, and under a fork of the RNG state, so a run with evaluations trains exactly
as one without.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from train import data as data_lib
from train import parallel
from train.step import autocast, is_fsdp
from train.task import Task


def eval_loss(model: nn.Module, task: Task, *, seed: int, samples: int, world_size: int,
              rank: int, device: torch.device, batch_size: int, precision: str = "fp32",
              group: Optional[dist.ProcessGroup] = None) -> float:
    """The mean of `task.loss` over held-out samples 0 .. samples-1, on every rank alike (a
    collective over `group`, the default group if None; no collective at world size 1 without
    a process group). `batch_size`: samples per forward pass. Under FSDP2 every forward gathers
    shards with all ranks, so every rank runs as many passes as the rank with the most samples
    (a rank with fewer repeats one and leaves it out of its sum); DDP evaluates its own replica,
    with no collective but the sum."""
    start, stop = data_lib.rank_slice(samples, world_size, rank)
    spans = data_lib.micro_batch_spans(stop - start, batch_size)
    passes = len(spans)
    if is_fsdp(model):
        widest = -(-samples // world_size)
        passes = len(data_lib.micro_batch_spans(widest, batch_size))
    net = parallel.unwrap(model)  # DDP's local replica; an FSDP2 module is its own
    was_training = net.training
    devices = [device.index or 0] if device.type == "cuda" else []
    total = torch.zeros((), dtype=torch.float64)
    net.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for i in range(passes):
                a, b = spans[i] if i < len(spans) else spans[0]
                index = range(start + a, start + b) if b > a else range(0, 1)  # a spare pass
                batch = task.collate([task.eval_sample(j, seed) for j in index])
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(net, precision):  # (FSDP2 casts its own: nothing to do)
                    loss = task.loss(net, batch)
                if i < len(spans) and b > a:
                    total += loss.detach().double().cpu() * (b - a)
    finally:
        net.train(was_training)
    if dist.is_initialized():
        t = total.to(device)
        dist.all_reduce(t, group=group)
        total = t.cpu()
    return float(total) / samples
