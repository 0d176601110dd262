"""TensorBoard curves, read back with tensorboard's own event reader."""

import pytest

from coordinator.control.accounting import Snapshot
from coordinator.events import Event
from coordinator.tensorboard import TensorBoardObserver

pytestmark = pytest.mark.unit


def _snap(step, loss, world=4):
    return Snapshot(now=0.0, step=step, step_t=None, loss=loss, world_size=world,
                    steps_per_s=10.0, grad_norm=0.5, lr=1e-3, eval_loss=None, step_s=0.1,
                    step_time_s=0.5, wall_s=1.0, incidents=0, exposure_worker_s=0.0)


def _read(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _attempt(log_dir, resumed, steps, events=()):
    tb = TensorBoardObserver(str(log_dir))
    tb.on_event({"event": Event.GROUP_FORMED.value, "step": resumed})
    for rec in events:
        tb.on_event(rec)
    for s in steps:
        tb.on_tick(_snap(s, 1.0 / s))
        tb.on_tick(_snap(s, 1.0 / s))  # a poll without a new step draws nothing
    tb.close()


def test_curves_continue_by_step_across_a_rerun_without_duplicates(tmp_path):
    """An attempt draws steps 1..30 and dies; the rerun resumes from checkpoint step 20: the
    curve reads 1..20 from the first attempt and 21.. from the second, once each, increasing;
    a replay after a rollback inside a run draws nothing twice."""
    log_dir = tmp_path / "tensorboard"
    _attempt(log_dir, 0, range(1, 31), events=[
        {"event": Event.CHECKPOINT_COMMITTED.value, "step": 20, "stall_s": 0.04, "persist_s": 0.3},
        {"event": Event.FAILURE_DETECTED.value, "step": 15},
        {"event": Event.RECOVERED.value, "resumed_step": 15, "recovery_s": 0.8, "lost_steps": 0},
        {"event": Event.EVAL.value, "step": 10, "loss": 2.5},
        {"event": Event.FAILURE_DETECTED.value, "step": 25}])
    _attempt(log_dir, 20, list(range(21, 41)) + list(range(35, 41)))  # 35..40 replayed
    curves = _read(log_dir)
    assert {"train/loss", "train/grad_norm", "perf/steps_per_s", "job/world_size",
            "checkpoint/stall_s", "checkpoint/persist_s", "job/failures",
            "recovery/recovery_s", "recovery/lost_steps", "perf/goodput", "eval/loss"
            } <= set(curves)
    assert curves["eval/loss"] == [(10, 2.5)] and curves["perf/goodput"][-1] == (40, 0.5)
    steps = [s for s, _ in curves["train/loss"]]
    assert steps == list(range(1, 41))
    assert curves["train/loss"][-1] == (40, pytest.approx(1 / 40))
    assert curves["checkpoint/stall_s"] == [(20, pytest.approx(0.04))]
    assert curves["recovery/lost_steps"] == [(16, 0.0)]
    assert curves["job/failures"] == [(15, 1.0)]  # the one at step 25 was past the resume


def test_the_bus_closes_observers_that_can_be_closed_and_says_nothing_of_others(tmp_path,
                                                                              caplog):
    from coordinator.control.observers import Bus
    from coordinator.events import EventLog

    class Bare:  # an observer by protocol only (as ChaosInjector is): nothing to close
        def on_event(self, record):
            pass

    tb = TensorBoardObserver(str(tmp_path / "tb"))
    bus = Bus(EventLog(str(tmp_path / "events.jsonl")), [Bare(), tb])
    bus.emit(Event.GROUP_FORMED, generation=1, world_size=1, ranks=[0], source="init", step=0,
             restore_s=0.0)
    tb.on_tick(_snap(1, 0.5))
    with caplog.at_level("WARNING"):
        bus.close()
    assert caplog.records == [] and tb._writer is None
    assert _read(tmp_path / "tb")["train/loss"] == [(1, 0.5)]
