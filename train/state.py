"""The training state of one rank: model, optimizer, scheduler, step, and how to fingerprint it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from train import parallel
from train.task import Task


@dataclass
class TrainState:
    task: Task
    model: nn.Module  # wrapped (DDP) or sharded in place (FSDP2)
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    step: int = 0  # completed optimizer steps; also the data cursor


def build_state(task: Task, parallelism: str, device: torch.device, seed: int,
                total_steps: int) -> TrainState:
    """Build and wrap the model over the current process group. Every rank seeds identically, so
    every rank starts from the same weights (FSDP2 shards them, DDP verifies them)."""
    torch.manual_seed(seed)
    model = task.build_model().to(device)
    model = parallel.wrap(model, parallelism, device, task)
    optimizer = task.build_optimizer(parallel.unwrap(model))
    scheduler = task.build_scheduler(optimizer, total_steps)
    return TrainState(task, model, optimizer, scheduler)


def full_model_state(state: TrainState) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU. A collective under FSDP2: every rank must call
    it; only rank 0 receives the tensors (the others get an empty dict)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(state.model, options=opts)


def weights_digest(sd: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in canonical key order (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
