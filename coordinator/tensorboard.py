"""TensorBoard curves of a run (`run.tensorboard`, on by default), under RUN_DIR/tensorboard/.

An observer of the job's bus (control/observers.py): every poll that saw new steps adds a point
to train/loss, train/grad_norm, train/lr, perf/steps_per_s, perf/goodput (time in completed steps
over wall time so far, the live figure) and job/world_size at the newest step; evaluations add
eval/loss at their step, checkpoint commits checkpoint/stall_s and checkpoint/persist_s, failures
job/failures, recoveries recovery/recovery_s and recovery/lost_steps. Written with torch.utils.tensorboard.

Curves continue across reruns and requeues by step: the writer opens at the step the first
generation resumed from, with `purge_step` there, so points an earlier attempt wrote past that step
(steps it lost) are dropped by TensorBoard and replaced; within a run a curve never goes back (a
replay after a rollback adds no point at a step already drawn).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

from coordinator.control.observers import Observer
from coordinator.events import Event

logger = logging.getLogger(__name__)

FLUSH_S = 5  # seconds between flushes to disk (TensorBoard reads what is flushed)


class TensorBoardObserver(Observer):
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer = None
        self._last: Dict[str, int] = {}  # tag -> the newest step drawn
        self._failures = 0
        self._tick_step = 0  # the newest step a poll drew

    def _open(self, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(self.log_dir, exist_ok=True)
        # purge_step: what an earlier attempt wrote at or after this step is superseded.
        self._writer = SummaryWriter(self.log_dir, purge_step=resumed_step + 1,
                                     flush_secs=FLUSH_S)

    def _add(self, tag: str, value: Optional[float], step: int) -> None:
        if self._writer is None or value is None or step <= self._last.get(tag, -1):
            return
        self._last[tag] = step
        self._writer.add_scalar(tag, float(value), step)

    def on_event(self, record: Dict[str, Any]) -> None:
        kind = record["event"]
        if kind == Event.GROUP_FORMED.value and self._writer is None:
            try:
                self._open(int(record["step"]))
            except Exception as e:  # a run goes on without its curves, said once
                logger.warning("tensorboard: cannot write %s: %s (run.tensorboard=false turns "
                               "this off)", self.log_dir, e)
                self._writer = None
        elif kind == Event.EVAL.value:
            self._add("eval/loss", record["loss"], record["step"])
        elif kind == Event.CHECKPOINT_COMMITTED.value:
            self._add("checkpoint/stall_s", record["stall_s"], record["step"])
            self._add("checkpoint/persist_s", record["persist_s"], record["step"])
        elif kind == Event.FAILURE_DETECTED.value:
            self._failures += 1
            self._add("job/failures", self._failures, record["step"])
        elif kind == Event.RECOVERED.value:
            self._add("recovery/recovery_s", record["recovery_s"], record["resumed_step"] + 1)
            self._add("recovery/lost_steps", record["lost_steps"], record["resumed_step"] + 1)

    def on_tick(self, snap) -> None:
        if snap.step <= self._tick_step:
            return
        self._tick_step = snap.step
        self._add("train/loss", snap.loss, snap.step)
        self._add("train/grad_norm", snap.grad_norm, snap.step)
        self._add("train/lr", snap.lr, snap.step)
        self._add("perf/steps_per_s", snap.steps_per_s, snap.step)
        self._add("perf/goodput", snap.step_time_s / snap.wall_s if snap.wall_s > 0 else None,
                  snap.step)
        self._add("job/world_size", snap.world_size, snap.step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
