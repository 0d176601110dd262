"""What every worker of a job is told at creation: the job's settings, as plain values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from train.step import Recipe


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a job is told at creation (no Ray or config objects inside)."""
    task: str
    task_args: Dict[str, Any]
    seed: int
    total_steps: int
    global_batch_size: int
    parallelism: str
    use_gpu: bool
    torch_threads: int
    collective_timeout_s: float
    checkpoint_uri: str = ""
    checkpoint_options: Dict[str, Any] = field(default_factory=dict)
    checkpoint_interval: int = 0  # 0 = no periodic saves
    memory_interval: int = 0  # steps between in-memory shard snapshots (0: none; FSDP2 only)
    checkpoint_async: bool = True
    checkpoint_beside_step: bool = True  # see CheckpointConfig.stage_beside_step
    checkpoint_final: bool = False  # save at the last step (so a longer rerun can continue)
    nonfinite: str = "rollback"  # failure.nonfinite: skip | rollback | stop
    nonfinite_limit: int = 3  # failure.nonfinite_limit
    checkpoint_persist_timeout_s: float = 60.0  # see CheckpointConfig.persist_timeout_s
    checkpoint_hash: str = "crc32c"  # see CheckpointConfig.hash
    eval_interval_steps: int = 0  # train.eval_interval_steps (0: no evaluation)
    eval_samples: int = 64  # train.eval_samples
    prefetch: bool = True  # train.prefetch
    micro_batch_size: Optional[int] = None  # train.micro_batch_size (see train.step.Recipe)
    precision: str = "fp32"  # train.precision
    max_grad_norm: Optional[float] = None  # train.max_grad_norm
    shard_group_size: Optional[int] = None  # train.shard_group_size (hsdp)

    def recipe(self) -> Recipe:
        return Recipe(self.micro_batch_size, self.precision, self.max_grad_norm)

    def eval_due(self, step: int) -> bool:
        iv = self.eval_interval_steps
        return iv > 0 and (step % iv == 0 or step == self.total_steps)
