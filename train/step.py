"""The training step: pure, and ignorant of Ray, membership and storage."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Batch = Dict[str, torch.Tensor]
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    """How each step is computed, beyond what the task says (the `train` settings of the same
    names). `micro_batch_size`: samples per forward pass, the rank's slice run in micro-batches
    with gradients accumulated and synchronised once (None: the whole slice at once).
    `precision`: "bf16" computes in bfloat16 (autocast for DDP; FSDP2's MixedPrecisionPolicy,
    see `train.parallel.wrap`), with fp32 master weights, optimizer state, gradient reduction
    and checkpoints. `max_grad_norm`: clip the gradients by their global norm (None: off)."""
    micro_batch_size: Optional[int] = None
    precision: str = "fp32"
    max_grad_norm: Optional[float] = None

    def __post_init__(self) -> None:
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size}: must be >= 1 or None")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of "
                             f"{', '.join(PRECISIONS)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: must be > 0 or None")


class StepOutcome(NamedTuple):
    loss: float  # this rank's mean loss (non-finite when its batch was)
    applied: bool  # False: the step was skipped (non-finite, or `skip` asked for it)
    grad_norm: Optional[float] = None  # the global gradient norm before clipping


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


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def _no_sync(model: nn.Module):
    """Backward passes inside accumulate gradients locally, without synchronising them: DDP's
    `no_sync`, FSDP2's gradient-sync switch; a plain module has nothing to skip."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def autocast(model: nn.Module, precision: str):
    """bf16 compute for DDP (or a plain module): autocast. FSDP2 casts its own parameters
    (MixedPrecisionPolicy), so it runs without."""
    if precision != "bf16" or is_fsdp(model):
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
               loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
               batch: Union[Batch, Sequence[Tuple[Batch, float]]], loss_scale: float,
               skip: bool = False, recipe: Optional[Recipe] = None) -> StepOutcome:
    """One optimizer step on this rank's slice of the global batch.

    `batch`: the slice, or its micro-batches as (batch, weight) pairs, each weight the
    micro-batch's share of the slice (they sum to 1): each is forwarded and backwarded in turn,
    its mean loss weighted by its share, the gradients accumulated and synchronised over the
    ranks only in the last backward, so the step's gradient is that of the slice's mean loss.

    `loss_scale` (= world_size * local_samples / global_batch) makes the gradient average that
    DDP/FSDP compute equal to the gradient of the global-batch mean loss.

    A step whose loss or gradient norm is non-finite on any rank is skipped on every rank: no
    optimizer step (the scheduler still steps, so the learning rate stays a function of the step
    count). The ranks agree without a collective of their own: a rank whose loss is non-finite
    multiplies its loss by NaN, so every gradient it sends into the gradient all-reduce is NaN and
    every rank's averaged gradients, and so their norm, come out non-finite. `skip`: skip this
    step whatever it computes (a replay of a step skipped before): forward and backward still
    run, so the RNG stream and the collectives are those of the first time.

    `recipe.max_grad_norm` clips by the global norm (the one that decides finiteness), so DDP
    and FSDP2 clip alike; the norm before clipping is returned."""
    recipe = recipe or Recipe()
    parts = [(batch, 1.0)] if isinstance(batch, dict) else list(batch)
    optimizer.zero_grad(set_to_none=True)
    total: Optional[torch.Tensor] = None
    for i, (micro, weight) in enumerate(parts):
        last = i == len(parts) - 1
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(_no_sync(model))
            with autocast(model, recipe.precision):
                loss = loss_fn(model, micro)
            detached = loss.detach().float()
            poison = torch.where(torch.isfinite(detached), 1.0, float("nan"))
            (loss * (loss_scale * weight * poison)).backward()
        part = detached * weight if len(parts) > 1 else detached
        total = part if total is None else total + part
    norm = _grad_norm(model)
    norm_value = float(norm) if norm is not None else None
    finite = math.isfinite(norm_value) if norm_value is not None else True
    applied = finite and not skip
    if applied:
        if recipe.max_grad_norm is not None and norm_value is not None:
            coef = recipe.max_grad_norm / (norm_value + 1e-6)
            if coef < 1.0:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepOutcome(total.item(), applied, norm_value)
