"""The task protocol: how a user plugs a model, optimizer, data and loss into the coordinator.

The coordinator owns the loop (process groups, data slicing, loss weighting, checkpoints and
recovery); a task only answers questions about *what* to train. Subclass `Task`, implement the four
abstract methods, and point `train.task` at it as `package.module:Class`. `train.task_args` are
passed to the constructor as keyword arguments.

Rules that keep runs exact and elastic:
- `sample(index, seed)` must depend only on its arguments (no global RNG, no iterator state): it is
  how the same global batch is rebuilt for any world size and after any failure.
- `loss(model, batch)` returns the *mean* over the samples of `batch`; the coordinator weights it by
  the rank's share of the global batch.
- `build_model()` runs under `torch.manual_seed(job.seed)` on every rank, so all ranks start equal.
- `eval_sample(index, seed)` (optional) gives the held-out set `train.eval_interval_steps` uses.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn


class Task:
    """Base class of user tasks. Override the abstract methods; the others have sane defaults."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        """The global sample number `index` (0, 1, 2, ... over the whole job) as a dict of tensors."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the samples of `batch` (a scalar tensor with a graph)."""
        raise NotImplementedError

    # ---- optional ------------------------------------------------------------------------
    def build_scheduler(self, optimizer: torch.optim.Optimizer,
                        total_steps: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        """An LR scheduler stepped once per optimizer step, or None."""
        return None

    def collate(self, samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def eval_sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        """Held-out sample number `index` (0 .. train.eval_samples - 1), never one `sample`
        gives, by the same rules as `sample`. Needed only for `train.eval_interval_steps`; the
        eval loss is `loss` over these samples, in eval mode, without gradients."""
        raise NotImplementedError

    def fsdp_units(self, model: nn.Module) -> Iterable[nn.Module]:
        """Submodules to shard one by one under FSDP2 (e.g. transformer blocks); the root is
        always sharded last."""
        return ()


def has_eval(task: Any) -> bool:
    """Whether `task` overrides `eval_sample` (or, not a `Task`, has one)."""
    fn = getattr(type(task), "eval_sample", None)
    return callable(fn) and fn is not Task.eval_sample


def load_task_class(path: str) -> type:
    """Import `package.module:Class`. Raises ValueError naming what is missing."""
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"train.task={path!r}: cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"train.task={path!r}: module {module_name!r} has no class {class_name!r}")
    missing = [m for m in ("build_model", "build_optimizer", "sample", "loss")
               if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"train.task={path!r}: class lacks {', '.join(missing)} (see train.task.Task)")
    return cls


def make_task(path: str, task_args: Dict[str, Any]) -> Task:
    cls = load_task_class(path)
    try:
        return cls(**task_args)
    except (TypeError, ValueError) as e:
        if str(e).startswith("train.task_args"):  # it names the setting already
            raise ValueError(f"{path}: {e}") from None
        raise ValueError(f"train.task_args={task_args!r}: {path} rejected them ({e})") from None
