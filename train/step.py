"""The training step: pure, and ignorant of Ray, membership and storage."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
               loss_fn: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor],
               batch: Dict[str, torch.Tensor], loss_scale: float) -> float:
    """One optimizer step on this rank's slice of the global batch; returns its mean loss.

    `loss_scale` (= world_size * local_samples / global_batch) makes the gradient average that
    DDP/FSDP compute equal to the gradient of the global-batch mean loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    (loss * loss_scale).backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()
