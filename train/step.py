"""The training step: pure, and ignorant of Ray, membership and storage."""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import nn


class StepOutcome(NamedTuple):
    loss: float  # this rank's mean loss (non-finite when its batch was)
    applied: bool  # False: the step was skipped (non-finite, or `skip` asked for it)


def _grad_norm(model: nn.Module) -> Optional[torch.Tensor]:
    """The total gradient norm over the whole model, the same on every rank. DDP's gradients
    are already averaged; FSDP2's are shards (DTensors), whose partial norms are summed over the
    mesh: one scalar all-reduce, which gradient clipping needs anyway."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
               loss_fn: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor],
               batch: Dict[str, torch.Tensor], loss_scale: float,
               skip: bool = False) -> StepOutcome:
    """One optimizer step on this rank's slice of the global batch.

    `loss_scale` (= world_size * local_samples / global_batch) makes the gradient average that
    DDP/FSDP compute equal to the gradient of the global-batch mean loss.

    A step whose loss or gradient norm is non-finite on any rank is skipped on every rank: no
    optimizer step (the scheduler still steps, so the learning rate stays a function of the step
    count). The ranks agree without a collective of their own: a rank whose loss is non-finite
    multiplies its loss by NaN, so every gradient it sends into the gradient all-reduce is NaN and
    every rank's averaged gradients, and so their norm, come out non-finite. `skip`: skip this
    step whatever it computes (a replay of a step skipped before): forward and backward still
    run, so the RNG stream and the collectives are those of the first time."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    detached = loss.detach()
    poison = torch.where(torch.isfinite(detached), 1.0, float("nan"))
    (loss * (loss_scale * poison)).backward()
    norm = _grad_norm(model)
    finite = bool(torch.isfinite(norm)) if norm is not None else True
    applied = finite and not skip
    if applied:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepOutcome(detached.item(), applied)
