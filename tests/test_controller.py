"""The controller stepped one transition at a time with a fake worker group (no Ray)."""

import pytest

from coordinator.config import load_config
from coordinator.control.accounting import StepAccounting
from coordinator.control.controller import Controller
from coordinator.control.observers import Bus, standard_observers
from coordinator.control.scaling_policy import ScalingPolicy
from coordinator.control.state import Phase
from coordinator.events import EventLog, read_events
from coordinator.protocol import StepReport, TransferCheck, WorkerFailure
from fakes import FakeCommitter, FakeGroup

pytestmark = pytest.mark.unit


def _controller(tmp_path, group, capacity=None, overrides=(), committer=None):
    """A controller on `group` with the job's standard observers; `committer(bus)` builds one."""
    cfg = load_config(None, ["train.steps=20", "scaling.min_workers=2", "scaling.max_workers=4",
                             f"run.dir={tmp_path}", *overrides])
    events = EventLog(str(tmp_path / "events.jsonl"))
    bus = Bus(events)
    clock = iter(range(0, 10_000)).__next__  # one second per call
    cap = capacity if callable(capacity) else (
        group.free if capacity is None else (lambda: capacity))
    c = Controller(cfg, group, bus, lambda exclude=(): cap(),
                   committer=committer(bus) if committer else None,
                   clock=lambda: float(clock()))
    standard_observers(cfg, bus, group, c.steps.warmup_steps)
    return c, events


def test_happy_path_one_transition_at_a_time(tmp_path):
    group = FakeGroup(steps_per_poll=5)
    c, events = _controller(tmp_path, group)
    t = c.step()
    assert (t.before, t.after) == (Phase.STARTING, Phase.FORMING) and len(group.members) == 4
    t = c.step()
    assert (t.before, t.after) == (Phase.FORMING, Phase.RUNNING)
    assert group.generation == 1 and group.until == 20
    seen = []
    while c.phase == Phase.RUNNING:
        t = c.step()
        seen.append(t.progress.step)
    assert seen == [5, 10, 15, 20]
    assert t.after == Phase.FINALIZING
    assert c.steps.last_loss == pytest.approx(10.0 - 20 / 10)  # the weighted losses summed over ranks
    t = c.step()
    assert (t.before, t.after) == (Phase.FINALIZING, Phase.DONE) and c.done
    assert c.step().note == "terminal"
    s = c.summary()
    assert s["status"] == "finished" and s["steps"] == 20 and s["weights_digest"] == "abc123"
    assert s["world_sizes"] == [4]
    kinds = [e["event"] for e in read_events(events.path)]
    assert kinds == ["worker_start"] * 4 + ["group_forming", "group_formed", "progress"]
    formed = list(read_events(events.path))[-2]
    assert formed["source"] == "init" and formed["ranks"] == [0, 1, 2, 3]


def test_partial_step_reports_wait_for_every_rank():
    c = StepAccounting(total_steps=20)
    c.add(StepReport(1, 0.5, 1.0, 0.1), world_size=2)
    assert c.last_step == 0 and c.last_loss is None
    c.add(StepReport(1, 0.25, 1.5, 0.2), world_size=2)
    assert c.last_step == 1 and c.last_loss == 0.75 and c.step_time_s == pytest.approx(0.2)


def test_starts_narrower_when_capacity_is_short(tmp_path):
    group = FakeGroup()
    c, _ = _controller(tmp_path, group, capacity=3)
    c.step()
    assert len(group.members) == 3 and c.job.world_size == 3


def test_waits_for_capacity_then_fails_with_a_message(tmp_path):
    c, _ = _controller(tmp_path, FakeGroup(slots=1),
                       overrides=["failure.wait_for_workers_s=3"])
    notes = [c.step().note for _ in range(3)]  # the fake clock ticks 1 s per reading
    assert notes == ["waiting for capacity"] * 3 and c.phase == Phase.STARTING
    c.step()
    assert c.phase == Phase.FAILED
    assert "capacity for 1 workers, scaling.min_workers=2" in c.error
    assert "failure.wait_for_workers_s=3" in c.error


def test_placement_timeout_fails(tmp_path):
    class Unplaceable(FakeGroup):
        def spawn(self, n, exclude=()):
            return 0

    c, _ = _controller(tmp_path, Unplaceable())
    c.step()
    assert c.phase == Phase.FAILED and "could not place" in c.error


def _run(c, limit=500):
    notes = []
    for _ in range(limit):
        if c.done:
            break
        notes.append(c.step().note)
    assert c.done, notes[-10:]
    return notes


def _events(events, kind):
    return [e for e in read_events(events.path) if e["event"] == kind]


def test_lost_worker_replaced_in_its_rank_from_a_peer(tmp_path):
    """(h) SIGKILL of rank 1 with room for a replacement: reported once with its cause (the
    survivors' collective errors are consequences), the newcomer takes rank 1, the state comes
    from a survivor, no step is lost."""
    group = FakeGroup()
    group.faults = [[10, [1], "process_exit"]]
    c, events = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.DONE and c.steps.last_step == 20
    (f,) = _events(events, "failure_detected")
    assert f["kind"] == "process_exit" and f["ranks"] == [1] and f["pids"] == [1001]
    assert f["step"] == 10
    gen, src = group.sources[1]
    assert gen == 2 and src.kind == "peer" and src.src == 0
    starts = _events(events, "worker_start")
    assert [e["rank"] for e in starts] == [0, 1, 2, 3, 1] and starts[-1]["generation"] == 2
    formed = _events(events, "group_formed")
    assert formed[1]["ranks"] == [0, 1, 2, 3] and formed[1]["source"] == "peer"
    (rec,) = _events(events, "recovered")
    assert rec["source"] == "peer" and rec["resumed_step"] == 10 and rec["lost_steps"] == 0
    assert rec["world_size"] == 4 and rec["recovery_s"] >= 0
    # where the recovery's time went: its phases add up to recovery_s
    ph = rec["phases"]
    assert set(ph) == {"settle_s", "replace_s", "form_s", "leave_s", "rendezvous_s", "build_s",
                       "transfer_s", "wrap_s", "first_step_s"}
    whole = ph["settle_s"] + ph["replace_s"] + ph["form_s"] + ph["first_step_s"]
    assert whole == pytest.approx(rec["recovery_s"], abs=0.005) and ph["form_s"] > 0
    s = c.summary()
    assert s["failures"] == 1 and s["recoveries"] == 1 and s["world_sizes"] == [4, 4]


def test_collective_errors_seen_before_the_death_are_not_the_cause(tmp_path):
    group = FakeGroup()
    group.faults = [[10, [1], "process_exit_late"]]
    c, events = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.DONE
    (f,) = _events(events, "failure_detected")
    assert f["kind"] == "process_exit" and f["ranks"] == [1]


def test_collective_errors_with_nobody_lost_are_reported_and_everyone_stays(tmp_path):
    group = FakeGroup()
    group.faults = [[10, [], "process_exit"]]  # every rank sees a collective error, none dies
    c, events = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["world_sizes"] == [4, 4]
    (f,) = _events(events, "failure_detected")
    assert f["kind"] == "collective_error" and f["ranks"] == [0, 1, 2, 3]
    assert [m["pid"] for _, m in sorted(group.members.items())] == [1000, 1001, 1002, 1003]


def test_shrinks_with_dense_ranks_when_no_replacement_fits(tmp_path):
    group = FakeGroup()
    group.faults = [[10, [1], "process_exit", 3]]
    c, events = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["world_sizes"] == [4, 3]
    assert sorted(group.members) == [0, 1, 2]
    assert [m["pid"] for _, m in sorted(group.members.items())] == [1000, 1002, 1003]


def test_the_survivor_with_the_highest_step_sends_the_state(tmp_path):
    group = FakeGroup()
    group.faults = [[10, [0], "process_exit", 3]]
    group.lag = {1: 1, 3: 1}  # ranks 1 and 3 did not finish step 10
    c, events = _controller(tmp_path, group)
    _run(c)
    _, src = group.sources[1]
    # survivors 1, 2, 3 become ranks 0, 1, 2; old rank 2 (step 10) is new rank 1
    assert src.kind == "peer" and src.src == 1
    (rec,) = _events(events, "recovered")
    assert rec["resumed_step"] == 10 and rec["lost_steps"] == 0


def test_budget_spent_fails_with_a_message(tmp_path):
    """(f) failure.max_failures=1: the second failure ends the job (exit 3 in the runner)."""
    group = FakeGroup()
    group.faults = [[5, [1], "process_exit"], [12, [2], "process_exit"]]
    c, events = _controller(tmp_path, group, overrides=["failure.max_failures=1"])
    _run(c)
    assert c.phase == Phase.FAILED
    assert "failure budget spent: 2 failures > failure.max_failures=1" in c.error
    assert len(_events(events, "recovered")) == 1


def test_below_min_workers_waits_then_fails_saying_what_is_missing(tmp_path):
    group = FakeGroup()
    group.faults = [[5, [1, 2, 3], "node_lost", 1]]
    c, events = _controller(tmp_path, group, overrides=["failure.wait_for_workers_s=5"])
    notes = _run(c)
    assert "waiting for capacity" in notes
    assert c.phase == Phase.FAILED
    assert "1 workers survive and 0 newcomers are ready: 1 short of scaling.min_workers=2" \
        in c.error and "failure.wait_for_workers_s=5" in c.error


def test_capacity_returning_during_the_wait_recovers(tmp_path):
    group = FakeGroup()
    group.faults = [[5, [1, 2, 3], "node_lost", 1]]
    c, events = _controller(tmp_path, group, overrides=["failure.wait_for_workers_s=30"])
    for _ in range(12):
        c.step()
    assert c.phase == Phase.RECOVERING
    group.slots = 4
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["world_sizes"] == [4, 4]


def test_a_silent_worker_is_killed_as_hung_and_replaced(tmp_path):
    """(h) + (d): a worker silent past failure.hang_timeout_s while its peers answer is killed,
    reported as a hang, and the job recovers."""
    group = FakeGroup()
    c, events = _controller(tmp_path, group, overrides=["failure.hang_timeout_s=5"])
    c.step(), c.step()
    group.silent = {2: 4.0}
    c.step()
    assert c.phase == Phase.RUNNING and group.killed == []
    group.silent = {2: 6.0}
    c.step()
    assert c.phase == Phase.RECOVERING and group.killed == [2]
    (f,) = _events(events, "failure_detected")
    assert f["kind"] == "hang" and f["ranks"] == [2] and f["pids"] == [1002]
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["recoveries"] == 1


def test_survivors_blocked_in_the_failed_group_are_released_in_place(tmp_path):
    """Survivors still in the failed collective after a loss (an FSDP2 peer waiting on one that
    waits on the lost rank) are released, not killed: their pids stay in the next generation."""
    group = FakeGroup()
    group.blocked = {0, 1}
    group.faults = [[7, [3], "process_exit"]]
    c, events = _controller(tmp_path, group, overrides=["train.parallelism=fsdp",
                                                        "checkpoint.memory_interval_steps=0"])
    c.step(), c.step()
    pids = {r: group.pid(r) for r in range(3)}
    while c.phase != Phase.RECOVERING:
        c.step()
    c.step()
    assert group.released == [([0, 1], 1)] and group.killed == []
    _run(c)
    assert c.phase == Phase.DONE and group.killed == []
    assert {r: group.pid(r) for r in range(3)} == pids
    (rec,) = _events(events, "recovered")
    assert rec["release_s"] >= 0


def test_fsdp_lost_before_any_step_starts_over_without_a_checkpoint(tmp_path):
    """Nothing trained yet, nothing lost: a worker lost while the first generation forms is
    replaced and the job starts from step 0 (not exit 3 for want of snapshots)."""
    group = FakeGroup()
    group.form_failures = [[WorkerFailure(1, "process_exit", 1001, "died joining"),
                            WorkerFailure(0, "collective_error", 1000, "aborted")]]
    c, _ = _controller(tmp_path, group, overrides=["train.parallelism=fsdp"])
    _run(c)
    assert c.phase == Phase.DONE and group.sources[1][1].kind == "init"


def _lose_rank3_with_memory(tmp_path, memory, committer=None):
    """FSDP2, 4 workers, rank 3 lost at step 7; the survivors' heartbeats then report the
    in-memory snapshots `memory` (rank -> (generation, owner -> steps, world))."""
    group = FakeGroup()
    group.faults = [[7, [3], "process_exit"]]
    c, events = _controller(tmp_path, group, overrides=["train.parallelism=fsdp"],
                            committer=committer)
    while c.phase != Phase.RECOVERING:
        c.step()
    group.memory = memory
    _run(c)
    return c, group, events


def test_fsdp_shards_come_back_from_the_survivors_and_the_buddy_copy(tmp_path):
    """Issue 11 (2): every old rank's shard is held at step 7 (rank 3's by its buddy, rank 0):
    the generation forms from memory at step 7, rank 3's rows from rank 0."""
    memory = {0: (1, {0: [6, 7], 3: [6, 7]}, 4), 1: (1, {1: [6, 7], 0: [6]}, 4),
              2: (1, {2: [6, 7], 1: [6, 7]}, 4)}
    c, group, events = _lose_rank3_with_memory(tmp_path, memory)
    assert c.phase == Phase.DONE
    gen, source = group.sources[1]
    assert source.kind == "memory" and source.step == 7 and source.generation == 1
    assert source.holders == {0: 0, 1: 1, 2: 2, 3: 0}
    (rec,) = _events(events, "recovered")
    assert rec["source"] == "memory" and rec["lost_steps"] == 0 and rec["resumed_step"] == 7


def test_a_failure_while_forming_from_memory_takes_the_same_snapshots_again(tmp_path):
    """Rank 1 dies while generation 2 forms from memory: nothing has replaced generation 1's
    snapshots (generation 2 never trained), so the next plan takes them again, rank 1's shard
    from the rank holding its copy, rather than fall back to a checkpoint (or exit 3)."""
    group = FakeGroup()
    group.faults = [[7, [3], "process_exit"]]
    group.form_failures = [[], [WorkerFailure(1, "process_exit", 1001, "died joining"),
                                WorkerFailure(0, "collective_error", 1000, "aborted")]]
    c, events = _controller(tmp_path, group, overrides=["train.parallelism=fsdp"])
    while c.phase != Phase.RECOVERING:
        c.step()
    group.memory = {0: (1, {0: [6, 7], 3: [6, 7], 1: [6, 7]}, 4), 1: (1, {1: [6, 7]}, 4),
                    2: (1, {2: [6, 7]}, 4)}
    _run(c)
    assert c.phase == Phase.DONE
    sources = [src for _, src in group.sources[1:3]]  # (a grow may follow)
    assert [s.kind for s in sources] == ["memory", "memory"]
    assert all(s.generation == 1 and s.step == 7 for s in sources)
    assert sources[1].holders[1] == 0, "rank 1's shard from the rank holding its copy"


def test_fsdp_takes_the_newest_step_every_shard_is_held_at(tmp_path):
    """Rank 3's copy reached its buddy only up to step 6: every shard comes back at step 6,
    never a mix of 6 and 7."""
    memory = {0: (1, {0: [6, 7], 3: [5, 6]}, 4), 1: (1, {1: [6, 7]}, 4),
              2: (1, {2: [6, 7]}, 4)}
    c, group, events = _lose_rank3_with_memory(tmp_path, memory)
    _, source = group.sources[1]
    assert source.kind == "memory" and source.step == 6
    (rec,) = _events(events, "recovered")
    assert rec["lost_steps"] == 1


def test_fsdp_shard_and_its_copy_lost_falls_back_to_the_checkpoint_or_exits(tmp_path):
    """No survivor holds rank 3's shard: the checkpoint is restored, and without one the job
    ends (exit 3) with a reason that names the rank."""
    memory = {0: (1, {0: [6, 7]}, 4), 1: (1, {1: [6, 7]}, 4), 2: (1, {2: [6, 7]}, 4)}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    c, group, _ = _lose_rank3_with_memory(tmp_path / "a", memory)
    assert c.phase == Phase.FAILED
    assert "the shards of rank 3 and every copy of them were lost" in c.state.error
    assert "no committed checkpoint" in c.state.error
    c, group, _ = _lose_rank3_with_memory(
        tmp_path / "b", memory, committer=lambda bus: FakeCommitter(5, bus, resume=False))
    assert c.phase == Phase.DONE
    _, source = group.sources[1]
    assert source.kind == "checkpoint" and source.path.endswith("step-00000005")


def test_a_survivor_that_stays_stuck_after_its_release_is_killed_after_the_grace(tmp_path):
    group = FakeGroup()
    group.blocked, group.stuck = {0, 1}, {1}
    group.faults = [[7, [3], "process_exit"]]
    c, _ = _controller(tmp_path, group, overrides=["failure.hang_timeout_s=5"])
    while c.phase != Phase.RECOVERING:
        c.step()
    for _ in range(8):  # one second per step of the clock: inside the 10 s grace
        c.step()
    assert group.released and group.killed == []
    _run(c)
    assert group.killed == [1] and c.phase == Phase.DONE


def test_nobody_answering_is_not_a_hang(tmp_path):
    group = FakeGroup()
    c, _ = _controller(tmp_path, group, overrides=["failure.hang_timeout_s=5"])
    c.step(), c.step()
    group.silent = {r: 60.0 for r in range(4)}
    c.step()
    assert c.phase == Phase.RUNNING and group.killed == []


def test_a_user_code_error_fails_at_once(tmp_path):
    group = FakeGroup()
    group.faults = [[5, [2], "task_error"]]
    c, _ = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.FAILED and "task error" in c.error


def test_a_step_every_rank_completed_counts_though_its_report_comes_after_the_error(tmp_path):
    """Rank 0's report of step 5 arrives a poll after rank 2's error in step 6: the job still
    failed at step 5, not 4 (the last reports are taken before the job ends)."""
    group = FakeGroup()
    group.faults = [[5, [2], "task_error"]]
    group.hold_last = {0}
    c, _ = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.FAILED and c.summary()["steps"] == 5


def test_grows_at_a_step_boundary_when_capacity_appears(tmp_path):
    """(h) a job started with 2 of max 4 workers grows when capacity appears: newcomers are
    started while training goes on, then the group pauses and re-forms with rank 0's state."""
    group = FakeGroup(steps_per_poll=2, slots=2)
    c, events = _controller(tmp_path, group,
                            overrides=["train.steps=40", "scaling.grow_check_s=1"])
    c.step(), c.step(), c.step()
    assert c.job.world_size == 2
    group.slots = 4
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["world_sizes"] == [2, 4]
    gen, src = group.sources[1]
    assert src.kind == "peer" and src.src == 0 and sorted(group.members) == [0, 1, 2, 3]
    formed = _events(events, "group_formed")[1]
    assert formed["world_size"] == 4 and 0 < formed["step"] < 40
    assert not _events(events, "failure_detected")


def test_preemption_takes_a_checkpoint_and_stops(tmp_path):
    group = FakeGroup()
    c, events = _controller(tmp_path, group)
    c.step(), c.step(), c.step()
    c.request_preempt("SIGUSR1")
    _run(c)
    assert c.phase == Phase.INTERRUPTED and group.stop_mode == 2  # STOP_CHECKPOINT
    (f,) = _events(events, "failure_detected")
    assert f["kind"] == "preempt" and "SIGUSR1" in f["error"]
    assert c.summary()["status"] == "interrupted" and c.steps.last_step < 20


def test_fsdp_rank_lost_restores_the_checkpoint(tmp_path):
    """(h) under FSDP2 a lost rank takes its shards: restore the last committed checkpoint."""
    group = FakeGroup()
    group.faults = [[12, [3], "process_exit", 3]]
    c, events = _controller(tmp_path, group, overrides=["train.parallelism=fsdp"],
                            committer=lambda bus: FakeCommitter(10, bus, resume=False))
    _run(c)
    _, src = group.sources[1]
    assert src.kind == "checkpoint" and src.path.endswith("step-00000010")
    (rec,) = _events(events, "recovered")
    assert rec["source"] == "checkpoint" and rec["resumed_step"] == 10
    assert rec["lost_steps"] == 2 and c.phase == Phase.DONE


def test_a_failure_while_forming_starts_a_new_recovery(tmp_path):
    group = FakeGroup()
    group.faults = [[5, [1], "process_exit"]]
    group.form_failures = [[], [WorkerFailure(1, "process_exit", 2000, "died joining"),
                                WorkerFailure(0, "collective_error", 1000, "aborted")]]
    c, events = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.DONE
    kinds = [(e["kind"], e["ranks"]) for e in _events(events, "failure_detected")]
    assert kinds == [("process_exit", [1]), ("process_exit", [1])]
    assert len(_events(events, "recovered")) == 1 and c.job.incidents == 2


def _mismatch(world, src, receivers):
    """What every member of a formation of `world` reports when `src`'s state failed its
    checksum on `receivers`."""
    check = TransferCheck(src, 0x1234abcd, {r: 0x0badf00d for r in receivers})
    return [WorkerFailure(r, "transfer_mismatch", None, "checksum", check) for r in range(world)]


def test_a_state_that_fails_its_checksum_is_taken_from_the_next_survivor(tmp_path):
    """Rank 1 lost; rank 0's state fails its checksum on the newcomer and on ranks 2 and 3: the
    same recovery goes on (not a second failure), rank 2 sends, no step is lost, and the
    mismatch is an event per receiver and a count in the summary."""
    group = FakeGroup()
    group.faults = [[12, [1], "process_exit"]]
    group.form_failures = [[], _mismatch(4, 0, [1, 2, 3])]
    c, events = _controller(tmp_path, group,
                            committer=lambda bus: FakeCommitter(10, bus, resume=False))
    _run(c)
    assert c.phase == Phase.DONE
    kinds = [(s.kind, s.src) for _, s in group.sources]
    assert kinds == [("init", None), ("peer", 0), ("peer", 2)]
    got = [(e["generation"], e["source_rank"], e["receiver_rank"], e["expected"], e["got"])
           for e in _events(events, "state_transfer_mismatch")]
    assert got == [(2, 0, r, "1234abcd", "0badf00d") for r in (1, 2, 3)]
    (rec,) = _events(events, "recovered")
    assert rec["source"] == "peer" and rec["lost_steps"] == 0 and rec["generation"] == 3
    assert len(_events(events, "failure_detected")) == 1 and c.job.incidents == 1
    s = c.summary()
    assert s["transfer_mismatches"] == 1 and s["failures"] == 1 and s["recoveries"] == 1


def test_a_lone_survivor_whose_state_fails_its_checksum_falls_back_to_the_checkpoint(tmp_path):
    group = FakeGroup(slots=2)
    group.faults = [[12, [1], "process_exit"]]
    group.form_failures = [[], _mismatch(2, 0, [1])]
    c, events = _controller(tmp_path, group,
                            committer=lambda bus: FakeCommitter(10, bus, resume=False))
    _run(c)
    assert c.phase == Phase.DONE
    _, src = group.sources[2]
    assert src.kind == "checkpoint" and src.path.endswith("step-00000010")
    (rec,) = _events(events, "recovered")
    assert rec["source"] == "checkpoint" and rec["resumed_step"] == 10 and rec["lost_steps"] == 2
    assert [e["receiver_rank"] for e in _events(events, "state_transfer_mismatch")] == [1]


def test_a_checksum_mismatch_while_growing_is_a_failure_recovered_from_a_peer(tmp_path):
    group = FakeGroup(steps_per_poll=2, slots=2)
    c, events = _controller(tmp_path, group,
                            overrides=["train.steps=40", "scaling.grow_check_s=1"])
    c.step(), c.step(), c.step()
    group.slots = 4
    group.form_failures = [_mismatch(4, 0, [1, 2, 3])]  # the grow's formation
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["world_sizes"] == [2, 4]
    _, src = group.sources[2]
    assert src.kind == "peer" and src.src == 1, "rank 1 (a member before the grow) sends"
    assert c.job.incidents == 1 and c.summary()["transfer_mismatches"] == 1


def test_a_node_failing_repeatedly_is_isolated(tmp_path):
    group = FakeGroup()
    group.faults = [[3, [1], "process_exit"], [8, [1], "process_exit"], [14, [1], "process_exit"]]
    group.spawn_nodes = ["node1", "node2"]
    c, events = _controller(tmp_path, group,
                            overrides=["failure.node_failure_limit=2", "failure.backoff_s=0"])
    _run(c)
    (iso,) = _events(events, "node_isolated")
    assert iso["node_id"] == "node1" and iso["failures"] == 2
    assert c.summary()["isolated_nodes"] == ["node1"]
    # after isolation, replacements go elsewhere
    assert group.members[1]["node"] != "node1"


def test_chaos_events_fire_once_at_their_step(tmp_path):
    group = FakeGroup()
    c, events = _controller(tmp_path, group, overrides=[
        "chaos.events=[{at_step: 6, action: kill_worker, target: 2}]"])
    _run(c)
    (ch,) = _events(events, "chaos")
    assert ch["action"] == "kill_worker" and ch["rank"] == 2 and ch["pid"] == 1002
    (f,) = _events(events, "failure_detected")
    assert f["ranks"] == [2] and c.phase == Phase.DONE


def test_scaling_policy():
    p = ScalingPolicy(2, 4)
    assert p.initial(8).world_size == 4
    assert p.initial(3).world_size == 3
    assert p.initial(1).world_size is None


def test_auto_interval_measures_first_then_follows_young_daly(tmp_path):
    """checkpoint.interval_steps=auto: a first checkpoint after the warm-up measures the stall;
    then every sqrt(2 * stall * job MTBF) seconds of steps, with the configured per-worker MTBF
    until a failure is seen, the observed rate after it. Each choice is an event with its
    inputs."""
    import math

    group = FakeGroup(steps_per_poll=5)
    group.faults = [[80, [2], "process_exit"]]
    c, events = _controller(tmp_path, group, overrides=[
        "train.steps=200", "checkpoint.interval_steps=auto", "failure.expected_mtbf_s=400"],
        committer=lambda bus: FakeCommitter(0, bus, resume=False))
    c.committer.committed = []
    _run(c)
    assert c.phase == Phase.DONE
    first, second, *later = _events(events, "checkpoint_interval")
    assert first["interval_steps"] == 20 and "warm-up" in first["reason"]  # min(200 // 10, 50)
    # the fake's steps take 1 s; stall 0.05 s; 4 workers of 400 s MTBF -> job MTBF 100 s:
    # sqrt(2 * 0.05 * 100) = 3.16 s -> 4 steps
    assert second["mtbf_source"] == "configured" and second["job_mtbf_s"] == 100.0
    assert second["stall_s"] == 0.05 and second["step_s"] == 1.0
    assert second["interval_steps"] == 4 and "Young/Daly" in second["reason"]
    asked = [step for _, step in group.save_requests]
    assert asked[0] == 20 and len(asked) > 10 and all(b - a >= 4 for a, b in zip(asked, asked[1:]))
    # after the failure the observed rate (1 failure in the worker-seconds run so far) is used
    obs = next(e for e in later if e["mtbf_source"] == "observed")
    assert obs["failures"] == 1
    assert obs["job_mtbf_s"] == pytest.approx(obs["exposure_worker_s"] / 1 / 4, rel=0.01)
    tau = math.sqrt(2 * 0.05 * obs["job_mtbf_s"])
    assert obs["interval_steps"] == min(200, math.ceil(tau / 1.0))
    assert c.summary()["checkpoint_interval"]["mtbf_source"] == "observed"


def test_step_never_blocks_a_preemption_during_a_slow_formation_stops_at_once(tmp_path):
    """A generation that takes long to form (a slow model build, a checkpoint restore) is
    polled, not waited for: a preemption notice arriving meanwhile is acted on at the next
    step, and the members still joining are released through the store."""
    import time as real_time

    group = FakeGroup()
    group.form_polls = 10_000  # the formation would take far longer than the test
    c, events = _controller(tmp_path, group)
    c.step()
    assert c.phase == Phase.FORMING
    for _ in range(5):
        t0 = real_time.monotonic()
        assert "forming generation 1" in c.step().note
        assert real_time.monotonic() - t0 < 0.5
    c.request_preempt("SIGUSR1")
    t = c.step()
    assert t.after == Phase.INTERRUPTED and "SIGUSR1" in c.error
    assert group.aborted == [1]
    assert c.summary()["status"] == "interrupted"


def test_workers_that_never_start_fail_within_the_wait(tmp_path):
    class NeverReady(FakeGroup):
        def collect_ready(self):
            return 0

    c, _ = _controller(tmp_path, NeverReady(), overrides=["failure.wait_for_workers_s=3"])
    notes = [c.step().note for _ in range(4)]
    assert all(n.startswith("starting 4 workers") for n in notes[:3]), notes
    assert c.phase == Phase.FAILED
    assert "only 0 of 4 workers started within failure.wait_for_workers_s=3" in c.error


def test_the_controller_imports_neither_ray_nor_torch():
    import subprocess
    import sys

    import os

    # the controller, its parts, the shared fakes and this very test module
    code = ("import sys; sys.path.insert(0, 'tests'); import coordinator.control.controller, "
            "coordinator.control.observers, coordinator.chaos, coordinator.protocol, "
            "coordinator.checkpoint.committer, fakes, test_controller; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_a_worker_lost_during_the_final_digest_is_replaced_and_the_digest_retaken(tmp_path):
    group = FakeGroup()
    group.digest_failures = [[WorkerFailure(1, "process_exit", 1001, "killed")]]
    c, events = _controller(tmp_path, group)
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["weights_digest"] == "abc123"
    (f,) = _events(events, "failure_detected")
    assert f["ranks"] == [1] and f["step"] == 20
    (rec,) = _events(events, "recovered")
    assert rec["resumed_step"] == 20 and rec["lost_steps"] == 0 and rec["source"] == "peer"
    assert c.summary()["world_sizes"] == [4, 4] and c.summary()["steps"] == 20


def test_every_worker_silent_with_no_step_for_the_timeout_is_hung(tmp_path):
    """No peer to compare with: when nobody answers AND no step completes for
    failure.hang_timeout_s, every worker is frozen; they are killed and replaced."""
    group = FakeGroup()
    c, events = _controller(tmp_path, group, overrides=["failure.hang_timeout_s=5"])
    c.step(), c.step(), c.step()
    assert c.steps.last_step == 5
    group.steps_per_poll = 0  # frozen: no step completes, and no heartbeat is answered
    group.silent = {r: 60.0 for r in range(4)}
    notes = []
    for _ in range(10):
        notes.append(c.step().note)
        if c.phase != Phase.RUNNING:
            break
    assert c.phase == Phase.RECOVERING, notes
    assert len(notes) > 2  # not at the first silent poll: the steps stopped only now
    assert sorted(group.killed) == [0, 1, 2, 3]
    (f,) = _events(events, "failure_detected")
    assert f["kind"] == "hang" and f["ranks"] == [0, 1, 2, 3]
    group.steps_per_poll, group.silent = 5, {}
    _run(c)
    assert c.phase == Phase.DONE and c.summary()["world_sizes"] == [4, 4]
    (rec,) = _events(events, "recovered")
    assert rec["source"] == "init"  # no survivor and no checkpoint: from the start, said so


# ---- non-finite steps (failure.nonfinite) ------------------------------------------------------

def _run_to_end(c, limit=200):
    for _ in range(limit):
        if c.done:
            break
        c.step()
    assert c.done


def _nonfinite_events(events):
    return [(e["step"], e["streak"], e["action"]) for e in read_events(events.path)
            if e["event"] == "nonfinite_step"]


def test_skip_mode_trains_on_and_every_later_launch_skips_them(tmp_path):
    group = FakeGroup(steps_per_poll=5)
    group.poisoned = {7, 8, 9, 10, 12}
    group.faults.append([15, [1], "process_exit"])  # a later loss: the next launch replays none
    c, events = _controller(tmp_path, group, overrides=["failure.nonfinite=skip"])
    _run_to_end(c)
    s = c.summary()
    assert s["status"] == "finished" and s["nonfinite_steps"] == [7, 8, 9, 10, 12]
    assert s["rollbacks"] == 0 and s["recoveries"] == 1
    assert _nonfinite_events(events) == [(7, 1, "skip"), (8, 2, "skip"), (9, 3, "skip"),
                                         (10, 4, "skip"), (12, 1, "skip")]
    assert group.launched_skips[0] == [] and group.launched_skips[-1] == [7, 8, 9, 10, 12]
    assert c.steps.last_loss == pytest.approx(10.0 - 20 / 10)  # the last step's own loss


def test_rollback_restores_the_checkpoint_and_skips_the_run_when_replaying(tmp_path):
    group = FakeGroup(steps_per_poll=5)
    group.poisoned, group.nonfinite_stop_at = {7, 8, 9}, 3
    c, events = _controller(tmp_path, group, committer=lambda bus: FakeCommitter(5, bus, False),
                            overrides=["failure.nonfinite_limit=3"])
    _run_to_end(c)
    s = c.summary()
    assert s["status"] == "finished" and s["steps"] == 20
    assert s["nonfinite_steps"] == [7, 8, 9] and s["rollbacks"] == 1
    assert _nonfinite_events(events) == [(7, 1, "skip"), (8, 2, "skip"), (9, 3, "rollback")]
    # the same members re-form from checkpoint 5 and replay with the three steps skipped
    gen, source = group.sources[-1]
    assert gen == 2 and source.kind == "checkpoint" and source.path.endswith("00000005")
    assert group.killed == [] and group.launched_skips[-1] == [7, 8, 9]
    evs = list(read_events(events.path))
    forming = [e for e in evs if e["event"] == "group_forming"]
    assert forming[-1]["cause"] == "rollback"
    detected = [e for e in evs if e["event"] == "failure_detected"]
    assert [d["kind"] for d in detected] == ["nonfinite"] and detected[0]["ranks"] == [0, 1, 2, 3]
    rec = [e for e in evs if e["event"] == "recovered"]
    assert len(rec) == 1 and rec[0]["source"] == "checkpoint" and rec[0]["lost_steps"] == 4


def test_rollback_without_a_checkpoint_starts_over_and_counts_against_the_budget(tmp_path):
    group = FakeGroup(steps_per_poll=5)
    group.poisoned, group.nonfinite_stop_at = {3}, 1
    c, _ = _controller(tmp_path, group, overrides=["failure.nonfinite_limit=1",
                                                   "failure.max_failures=0"])
    _run_to_end(c)
    assert c.phase == Phase.FAILED and "failure.max_failures=0" in c.error
    assert "step 3 non-finite" in c.error

    group = FakeGroup(steps_per_poll=5)
    group.poisoned, group.nonfinite_stop_at = {3}, 1
    c, _ = _controller(tmp_path / "again", group, overrides=["failure.nonfinite_limit=1"])
    _run_to_end(c)
    assert c.phase == Phase.DONE and group.sources[-1][1].kind == "init"
    assert c.summary()["rollbacks"] == 1 and group.launched_skips[-1] == [3]


def test_stop_mode_ends_the_job_with_the_reason(tmp_path):
    group = FakeGroup(steps_per_poll=5)
    group.poisoned, group.nonfinite_stop_at = {6}, 1
    c, events = _controller(tmp_path, group, committer=lambda bus: FakeCommitter(5, bus, False),
                            overrides=["failure.nonfinite=stop"])
    _run_to_end(c)
    assert c.phase == Phase.FAILED
    assert c.error == ("step 6: non-finite loss or gradient norm (failure.nonfinite=stop): the "
                       "step was not applied and the last committed checkpoint is step 5; set "
                       "failure.nonfinite=skip or rollback to train past it")
    assert _nonfinite_events(events) == [(6, 1, "stop")]
    assert c.summary()["nonfinite_steps"] == [6]


def test_hsdp_shrink_keeps_a_whole_shard_group_and_the_leftover_survivor_idle(tmp_path):
    """HSDP, 2 shard groups of 2, rank 1 lost, no room for a replacement: 3 survivors cannot
    form whole groups, so group 1 (ranks 2, 3) trains on as ranks 0, 1 with both shards from
    its own snapshots, and rank 0 stays as an idle spare: its process is kept, not killed."""
    group = FakeGroup(slots=3)
    group.faults = [[7, [1], "process_exit"]]
    c, events = _controller(tmp_path, group, overrides=[
        "train.parallelism=hsdp", "train.shard_group_size=2", "failure.replace=false",
        "scaling.spare_workers=0", "scaling.grow=false"], capacity=lambda: 4)
    while c.phase != Phase.RECOVERING:
        c.step()
    spare = group.members[0]
    group.memory = {r: (1, {r: [6, 7]}, 4) for r in (0, 2, 3)}
    _run(c)
    assert c.phase == Phase.DONE
    gen, source = group.sources[1]
    assert source.kind == "memory" and source.step == 7 and source.holders == {2: 0, 3: 1}
    assert c.summary()["world_sizes"] == [4, 2]
    assert [m for m, _ in group.pending_new] == [spare], "the leftover survivor idles, alive"
    (rec,) = _events(events, "recovered")
    assert rec["source"] == "memory" and rec["world_size"] == 2
