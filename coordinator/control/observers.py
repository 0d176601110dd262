"""Side concerns behind one small protocol, so a new metric never touches the state machine.

The controller (and the committer) say what happened through `Bus.emit`, which writes the event to
events.jsonl and hands the record to every observer's `on_event`; while training, the controller
calls `Bus.tick` once per poll with a `Snapshot`. Observers: the `progress` events, Ray metrics,
the automatic checkpoint interval and the chaos schedule (coordinator/chaos.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List

from coordinator.events import Event
from coordinator.chaos import ChaosInjector, ChaosPlan
from coordinator.checkpoint.interval import AutoInterval, AutoSchedule
from coordinator.control.accounting import Snapshot
from coordinator.config import Config

logger = logging.getLogger(__name__)


class Observer:
    """Override what you need; every method is optional."""

    def on_event(self, record: Dict[str, Any]) -> None:
        """A record just written to events.jsonl (its `event` field names the kind)."""

    def on_tick(self, snap: Snapshot) -> None:
        """Once per poll of a training group."""

    def summary(self) -> Dict[str, Any]:
        """Fields this observer adds to summary.json."""
        return {}

    def close(self) -> None:
        """The job is over: flush what is buffered."""


class Bus:
    def __init__(self, log, observers: Iterable[Observer] = ()):
        self.log = log  # coordinator.events.EventLog
        self.observers: List[Observer] = list(observers)

    def emit(self, event: str, **fields: Any) -> Dict[str, Any]:
        record = self.log.emit(event, **fields)
        for o in self.observers:
            o.on_event(record)
        return record

    def tick(self, snap: Snapshot) -> None:
        for o in self.observers:
            o.on_tick(snap)

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for o in self.observers:
            out.update(o.summary())
        return out

    def close(self) -> None:
        for o in self.observers:
            close = getattr(o, "close", None)  # observers need not subclass Observer
            if close is None:
                continue
            try:
                close()
            except Exception as e:  # an observer's files must not fail the job's ending
                logger.warning("closing %s: %s", type(o).__name__, e)


class ProgressEvents(Observer):
    """A `progress` event every run.log_interval_s while steps complete: the step-over-time curve
    of the report, and the last known step of a driver that crashed."""

    def __init__(self, bus: Bus, interval_s: float):
        self.bus, self.interval_s = bus, interval_s
        self._t, self._step = -1e18, -1

    def on_tick(self, snap: Snapshot) -> None:
        if snap.step == self._step or snap.now - self._t < self.interval_s:
            return
        self._t, self._step = snap.now, snap.step
        self.bus.emit(Event.PROGRESS, step=snap.step, step_t=snap.step_t,
                      world_size=snap.world_size,
                      loss=None if snap.loss is None else round(snap.loss, 6),
                      grad_norm=None if snap.grad_norm is None else round(snap.grad_norm, 6),
                      steps_per_s=None if snap.steps_per_s is None else round(snap.steps_per_s, 3))


class MetricsObserver(Observer):
    """Feeds coordinator.metrics.JobMetrics (Ray's metrics API) from events and polls."""

    def __init__(self, metrics, interval_s: float):
        self.metrics, self.interval_s = metrics, interval_s
        self._t = -1e18

    def on_event(self, record: Dict[str, Any]) -> None:
        kind = record["event"]
        if kind == Event.FAILURE_DETECTED and record["ranks"]:
            self.metrics.failure(record["kind"], len(record["ranks"]))
        elif kind == Event.CHECKPOINT_COMMITTED:
            self.metrics.checkpoint(record["stall_s"], record["persist_s"])
        elif kind == Event.EVAL:
            self.metrics.evaluated(record["loss"])

    def on_tick(self, snap: Snapshot) -> None:
        if snap.now - self._t < self.interval_s:
            return
        self._t = snap.now
        self.metrics.progress(snap.step, snap.world_size, snap.steps_per_s,
                              snap.step_time_s / snap.wall_s if snap.wall_s > 0 else None)


class AutoIntervalObserver(Observer):
    """`checkpoint.interval_steps: auto`: re-chooses the interval from measured stalls and
    failure rates (checkpoint/interval.py) and asks the workers for each checkpoint."""

    def __init__(self, cfg: Config, bus: Bus, group, warmup_steps: int):
        self.bus, self.group = bus, group
        self.schedule = AutoSchedule(AutoInterval(cfg.failure.expected_mtbf_s, cfg.train.steps,
                                                  warmup_steps))

    def on_event(self, record: Dict[str, Any]) -> None:
        kind = record["event"]
        if kind == Event.CHECKPOINT_COMMITTED:
            self.schedule.committed(record["step"], record["stall_s"], record["persist_s"])
            self.schedule.settled([record["step"]])
        elif kind == Event.CHECKPOINT_FAILED:
            self.schedule.settled([record["step"]])
        elif kind == Event.GROUP_FORMED:
            self.schedule.new_generation(record["step"] if record["source"] == "checkpoint"
                                         else None)

    def on_tick(self, snap: Snapshot) -> None:
        choice, ask = self.schedule.tick(snap.step, snap.world_size, snap.incidents,
                                         snap.exposure_worker_s, snap.step_s or None)
        if choice is not None:
            logger.info("checkpoint interval (auto): every %d steps: %s; %s MTBF per worker "
                        "(%d failure(s) in %.0f worker-s)", choice.interval_steps, choice.reason,
                        choice.mtbf_source, choice.failures, choice.exposure_worker_s)
            self.bus.emit(Event.CHECKPOINT_INTERVAL, step=snap.step, **choice.fields())
        if ask:
            self.group.request_checkpoint(self.schedule.number)

    def summary(self) -> Dict[str, Any]:
        choice = self.schedule.choice
        return {"checkpoint_interval": choice.fields()} if choice is not None else {}


def standard_observers(cfg: Config, bus: Bus, group, warmup_steps: int, hooks=None,
                       metrics=None) -> List[Observer]:
    """The observers a job runs with: progress events, the chaos schedule, the auto interval
    (when configured) and metrics (when given). Appended to `bus` and returned."""
    found: List[Observer] = [
        ChaosInjector(ChaosPlan(cfg.chaos, cfg.train.steps, cfg.scaling.max_workers), group,
                      bus, hooks),
        ProgressEvents(bus, cfg.run.log_interval_s),
    ]
    if cfg.checkpoint.interval_steps == "auto":
        found.append(AutoIntervalObserver(cfg, bus, group, warmup_steps))
    if metrics is not None:
        found.append(MetricsObserver(metrics, cfg.run.log_interval_s))
    if cfg.run.tensorboard and cfg.run.dir:
        from coordinator.tensorboard import TensorBoardObserver

        found.append(TensorBoardObserver(os.path.join(cfg.run.dir, "tensorboard")))
    bus.observers.extend(found)
    return found
