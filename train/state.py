"""The training state of one rank: model, optimizer, scheduler, step, and how to fingerprint it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from train import parallel
from train.step import Recipe
from train.task import Task


@dataclass
class TrainState:
    task: Task
    model: nn.Module  # wrapped (DDP) or sharded in place (FSDP2)
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    step: int = 0  # completed optimizer steps; also the data cursor
    recipe: Recipe = field(default_factory=Recipe)  # micro-batches, precision, clipping
    grad_norm: Optional[float] = None  # the last step's global gradient norm (before clipping)


def build_state(task: Task, parallelism: str, device: torch.device, seed: int,
                total_steps: int, wrap_ddp: bool = True,
                recipe: Optional[Recipe] = None, mesh_name: str = "dp",
                shard_group_size: Optional[int] = None) -> TrainState:
    """Build the model over the current process group. Every rank seeds identically, so every
    rank starts from the same weights (FSDP2 shards them in place, DDP verifies them when it wraps).
    `wrap_ddp=False` leaves a DDP model unwrapped (see `parallel.wrap`), for a caller that loads
    state into it before wrapping. `recipe`: how steps are computed (`train.step.Recipe`).
    `mesh_name`, `shard_group_size` (HSDP): see `parallel.wrap`."""
    recipe = recipe or Recipe()
    torch.manual_seed(seed)
    model = task.build_model().to(device)
    if parallelism != "ddp" or wrap_ddp:
        model = parallel.wrap(model, parallelism, device, task, precision=recipe.precision,
                              mesh_name=mesh_name, shard_group_size=shard_group_size)
    optimizer = task.build_optimizer(parallel.unwrap(model))
    scheduler = task.build_scheduler(optimizer, total_steps)
    return TrainState(task, model, optimizer, scheduler, recipe=recipe)


def full_model_state(state: TrainState) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU. A collective under FSDP2: every rank must call
    it; only rank 0 receives the tensors (the others get an empty dict)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(state.model, options=opts)


# A rank's whole training state in full (unsharded) form, as a peer sends it to a new group:
# {"model": FQN -> tensor, "optim": optimizer state keyed by FQN, "step": int, "scheduler": dict}.
FullState = Dict[str, Any]


def _keep_unstepped(state: TrainState) -> None:
    """A state at step 0 has an optimizer that never stepped. DCP's state-dict calls initialise
    an empty optimizer state with a zero-lr step (Adam's step count then reads 1, and the first
    real step would be corrected as its second): give such an optimizer its empty state back, on
    the rank that sends it and on those that load it."""
    if state.step == 0:
        state.optimizer.state.clear()


def full_state(state: TrainState, sharded: bool) -> FullState:
    """The full training state. DDP (`sharded=False`): this rank's own replica, wrapped or not
    (no collective). FSDP2: a collective that gathers every shard; only rank 0 receives the
    tensors (offloaded to CPU)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=opts)
    _keep_unstepped(state)
    return {"model": model_sd, "optim": optim_sd, "step": state.step,
            "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None}


def _drop_gradients(state: TrainState) -> None:
    """Gradients left by a step that failed (a peer died inside its backward or the bucket
    priming) are garbage, and while any exist DCP's set_state_dict does not initialise an
    optimizer that never stepped: it then fails with 'Expected device to be set'."""
    state.optimizer.zero_grad(set_to_none=True)


def apply_full_state(state: TrainState, full: FullState) -> None:
    """Load a full state into this rank's model and optimizer (FSDP2 keeps its own shard)."""
    _drop_gradients(state)
    opts = StateDictOptions(full_state_dict=True)
    if full["optim"].get("state"):
        set_state_dict(state.model, state.optimizer, model_state_dict=full["model"],
                       optim_state_dict=full["optim"], options=opts)
    else:
        # A stateless optimizer (plain SGD) has no per-parameter tensors, and DCP's full-state
        # load of one fails ("Expected device to be set"): take the hyperparameters alone.
        set_model_state_dict(state.model, full["model"], options=opts)
        for group, sent in zip(state.optimizer.param_groups, full["optim"]["param_groups"]):
            group.update({k: v for k, v in sent.items() if k != "params"})
        state.optimizer.state.clear()
    state.step = int(full["step"])
    _keep_unstepped(state)
    if state.scheduler is not None and full.get("scheduler") is not None:
        state.scheduler.load_state_dict(full["scheduler"])


def weights_digest(sd: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in canonical key order (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # the bytes in place, no copy
    return h.hexdigest()


# ---- checkpoint state --------------------------------------------------------------------------
# Everything a resume needs, as a DCP state dict of tensors only (no pickled objects, so nothing
# but tensors is ever deserialised): model and optimizer (DTensor shards under FSDP2, replicated
# tensors under DDP), the step (= data cursor), the scheduler as JSON bytes, and this rank's RNG.

def _rng_key(rank: int) -> str:
    return f"rng/rank{rank}"


def _json_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).clone()


def _tensor_json(t: torch.Tensor):
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode())


def checkpoint_state(state: TrainState, rank: int) -> Dict[str, object]:
    """The state dict to save. Keys shared by all ranks hold equal values (DCP writes each once);
    `rng/rank<r>` is this rank's own."""
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    return {"model": model_sd, "optim": optim_sd, **checkpoint_extras(state, rank)}


def checkpoint_extras(state: TrainState, rank: int) -> Dict[str, object]:
    """The entries of the checkpoint state that are made afresh at every call: the step, the
    scheduler (as JSON bytes) and this rank's RNG."""
    extra = {"step": torch.tensor(state.step, dtype=torch.int64)}
    if state.scheduler is not None:
        try:
            extra["scheduler"] = _json_tensor(state.scheduler.state_dict())
        except TypeError as e:
            raise ValueError(f"the task's LR scheduler state is not JSON-serialisable ({e}); "
                             "checkpoints hold tensors and JSON only") from None
    return {"extra": extra, _rng_key(rank): torch.get_rng_state()}


def load_template(state: TrainState, rank: int,
                  saved: Dict[str, torch.Size]) -> Dict[str, object]:
    """The state dict to load into, given the saved tensors' flattened keys and sizes: this rank's
    current tensors give shapes and shardings (DCP reshards to them). This rank's RNG is loaded
    only if the checkpoint has one for its rank (a world that grew has new ranks)."""
    sd = checkpoint_state(state, rank)
    if _rng_key(rank) not in saved:
        del sd[_rng_key(rank)]
    if "extra.scheduler" in saved and "scheduler" in sd["extra"]:
        # The saved JSON may be longer or shorter than ours: load into a tensor of its size.
        sd["extra"]["scheduler"] = torch.empty(saved["extra.scheduler"], dtype=torch.uint8)
    else:
        sd["extra"].pop("scheduler", None)
    return sd


def apply_loaded(state: TrainState, sd: Dict[str, object], rank: int) -> None:
    _drop_gradients(state)
    set_state_dict(state.model, state.optimizer, model_state_dict=sd["model"],
                   optim_state_dict=sd["optim"])
    state.step = int(sd["extra"]["step"])
    if state.scheduler is not None and "scheduler" in sd["extra"]:
        state.scheduler.load_state_dict(_tensor_json(sd["extra"]["scheduler"]))
    if _rng_key(rank) in sd:
        torch.set_rng_state(sd[_rng_key(rank)])


def _finite(t: torch.Tensor) -> bool:
    """No NaN and no infinity in `t` (not empty). min and max propagate a NaN, and an infinity
    is one of them: one reduction, no temporary (isfinite().all() writes a bool per element:
    18x slower here, 1.5 s per GB, on the persist's path)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def first_nonfinite(sd: Any, prefix: str = "") -> Optional[str]:
    """The key path of the first floating-point tensor in the (nested) state dict `sd` holding a
    NaN or an infinity, or None. A DTensor is checked on this rank's shard only."""
    if isinstance(sd, dict):
        items = sd.items()
    elif isinstance(sd, (list, tuple)):
        items = enumerate(sd)
    else:
        if isinstance(sd, torch.Tensor) and sd.is_floating_point():
            local = sd.to_local() if hasattr(sd, "to_local") else sd
            if local.numel() and not _finite(local):
                return prefix or "<tensor>"
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None
