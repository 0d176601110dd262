"""The controller stepped one transition at a time with a fake worker group (no Ray)."""

import pytest

from coordinator.config import load_config
from coordinator.controller import Controller, Phase
from coordinator.events import EventLog, read_events
from coordinator.scaling_policy import ScalingPolicy
from coordinator.worker import Heartbeat, StepReport
from coordinator.worker_group import CapacityError, PollResult, WorkerFailure, WorkerInfo


class FakeGroup:
    """Workers that advance `steps_per_poll` steps per poll; a scripted failure can be set."""

    def __init__(self, steps_per_poll=5, fail_at_step=None, fail_kind="process_exit"):
        self.steps_per_poll = steps_per_poll
        self.fail_at_step, self.fail_kind = fail_at_step, fail_kind
        self.world = 0
        self.step = 0
        self.until = None
        self.generation = None
        self.shut = False
        self.killed = []
        self.silent = {}  # rank -> seconds without a heartbeat, reported by poll

    def start(self, world_size):
        self.world = world_size
        return [WorkerInfo(r, 1000 + r, f"node{r % 2}", "host") for r in range(world_size)]

    def form(self, generation, restore_path=None):
        self.generation = generation
        self.restored_from = restore_path
        return []

    def launch(self, until_step):
        self.until = until_step

    def poll(self):
        res = PollResult(silent_s={r: self.silent.get(r, 0.0) for r in range(self.world)})
        if self.fail_at_step is not None and self.step >= self.fail_at_step:
            res.failures = [WorkerFailure(1, self.fail_kind, 1001, "boom"),
                            WorkerFailure(0, "collective_error", 1000, "peer closed")]
            return res
        new = list(range(self.step + 1, min(self.until, self.step + self.steps_per_poll) + 1))
        self.step = new[-1] if new else self.step
        for r in range(self.world):
            # rank r's weighted loss: (10 - step) * share, shares equal
            reps = [StepReport(s, (10.0 - s / 10) / self.world, 100.0 + s, 0.01) for s in new]
            res.heartbeats[r] = Heartbeat(r, self.generation, self.step, reps)
        if self.step >= self.until:
            res.finished = {r: self.step for r in range(self.world)}
        return res

    def final_digest(self):
        return "abc123"

    def pid(self, rank):
        return 1000 + rank

    def kill(self, rank):
        self.killed.append(rank)

    def shutdown(self):
        self.shut = True


def _controller(tmp_path, group, capacity=4, overrides=()):
    cfg = load_config(None, ["train.steps=20", "scaling.min_workers=2", "scaling.max_workers=4",
                             f"run.dir={tmp_path}", *overrides])
    events = EventLog(str(tmp_path / "events.jsonl"))
    clock = iter(range(0, 10_000)).__next__  # one second per call
    return Controller(cfg, group, events, lambda: capacity, clock=lambda: float(clock())), events


def test_happy_path_one_transition_at_a_time(tmp_path):
    group = FakeGroup(steps_per_poll=5)
    c, events = _controller(tmp_path, group)
    t = c.step()
    assert (t.before, t.after) == (Phase.STARTING, Phase.FORMING) and group.world == 4
    t = c.step()
    assert (t.before, t.after) == (Phase.FORMING, Phase.RUNNING)
    assert group.generation == 1 and group.until == 20
    seen = []
    while c.phase == Phase.RUNNING:
        t = c.step()
        seen.append(t.progress.step)
    assert seen == [5, 10, 15, 20]
    assert t.after == Phase.FINALIZING
    assert c.last_loss == pytest.approx(10.0 - 20 / 10)  # the weighted losses summed over ranks
    t = c.step()
    assert (t.before, t.after) == (Phase.FINALIZING, Phase.DONE) and c.done
    assert c.step().note == "terminal"
    s = c.summary()
    assert s["status"] == "finished" and s["steps"] == 20 and s["weights_digest"] == "abc123"
    assert s["world_sizes"] == [4]
    kinds = [e["event"] for e in read_events(events.path)]
    assert kinds == ["worker_start"] * 4 + ["group_formed"]
    formed = list(read_events(events.path))[-1]
    assert formed["source"] == "init" and formed["ranks"] == [0, 1, 2, 3]


def test_partial_step_reports_wait_for_every_rank(tmp_path):
    c, _ = _controller(tmp_path, FakeGroup())
    c.world_size = 2
    c._account(1, 0.5, 1.0, 0.1)
    assert c.last_step == 0 and c.last_loss is None
    c._account(1, 0.25, 1.5, 0.2)
    assert c.last_step == 1 and c.last_loss == 0.75 and c.step_time_s == pytest.approx(0.2)


def test_starts_narrower_when_capacity_is_short(tmp_path):
    group = FakeGroup()
    c, _ = _controller(tmp_path, group, capacity=3)
    c.step()
    assert group.world == 3 and c.world_size == 3


def test_waits_for_capacity_then_fails_with_a_message(tmp_path):
    c, _ = _controller(tmp_path, FakeGroup(), capacity=1,
                       overrides=["failure.wait_for_workers_s=3"])
    notes = [c.step().note for _ in range(3)]  # the fake clock ticks 1 s per reading
    assert notes == ["waiting for capacity"] * 3 and c.phase == Phase.STARTING
    c.step()
    assert c.phase == Phase.FAILED
    assert "capacity for 1 workers, scaling.min_workers=2" in c.error
    assert "failure.wait_for_workers_s=3" in c.error


def test_placement_timeout_fails(tmp_path):
    class Unplaceable(FakeGroup):
        def start(self, world_size):
            raise CapacityError("could not place 4 workers")

    c, _ = _controller(tmp_path, Unplaceable())
    c.step()
    assert c.phase == Phase.FAILED and "could not place" in c.error


def test_worker_loss_is_reported_once_with_its_cause(tmp_path):
    c, events = _controller(tmp_path, FakeGroup(fail_at_step=10))
    while not c.done:
        c.step()
    assert c.phase == Phase.FAILED
    failures = [e for e in read_events(events.path) if e["event"] == "failure_detected"]
    # The survivor's collective error is a consequence: only the lost worker is reported.
    assert len(failures) == 1
    assert failures[0]["kind"] == "process_exit" and failures[0]["ranks"] == [1]
    assert failures[0]["pids"] == [1001] and failures[0]["step"] == 10
    assert c.summary()["failures"] == 1 and c.summary()["status"] == "failed"


def test_scaling_policy():
    p = ScalingPolicy(2, 4)
    assert p.initial(8).world_size == 4
    assert p.initial(3).world_size == 3
    assert p.initial(1).world_size is None


def test_a_silent_worker_is_killed_as_hung(tmp_path):
    group = FakeGroup()
    c, events = _controller(tmp_path, group, overrides=["failure.hang_timeout_s=5"])
    c.step(), c.step()
    group.silent = {2: 4.0}
    c.step()
    assert c.phase == Phase.RUNNING and group.killed == []
    group.silent = {2: 6.0}
    c.step()
    assert c.phase == Phase.FAILED and group.killed == [2]
    (f,) = [e for e in read_events(events.path) if e["event"] == "failure_detected"]
    assert f["kind"] == "hang" and f["ranks"] == [2] and f["pids"] == [1002]
    assert "worker 2 lost (hang, pid 1002)" in c.error


def test_nobody_answering_is_not_a_hang(tmp_path):
    group = FakeGroup()
    c, _ = _controller(tmp_path, group, overrides=["failure.hang_timeout_s=5"])
    c.step(), c.step()
    group.silent = {r: 60.0 for r in range(4)}
    c.step()
    assert c.phase == Phase.RUNNING and group.killed == []
