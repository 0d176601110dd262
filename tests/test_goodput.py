"""Goodput accounting on synthetic event logs with known answers, and the report verb."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from coordinator.goodput import accounting
from coordinator.events import EventLog

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0


def ev(t, event, **fields):
    return {"t": T0 + t, "event": event, **fields}


def start(t=0.0, formed=6.0, world=4, source="init", step=0, restore_s=0.0):
    return [ev(t, "job_start", job="j", config_hash="h"),
            ev(formed - 1.0, "group_forming", generation=1, world_size=world, source=source,
               cause="start"),
            ev(formed, "group_formed", generation=1, world_size=world, ranks=list(range(world)),
               source=source, step=step, restore_s=restore_s)]


def secs(b):
    return b["seconds"]


def test_a_clean_run_is_startup_running_and_shutdown():
    events = start() + [
        ev(20.0, "progress", step=50, step_t=T0 + 19.9, world_size=4),
        ev(21.0, "checkpoint_committed", step=50, stall_s=0.5, persist_s=1.0, bytes=1),
        ev(40.0, "checkpoint_committed", step=100, stall_s=0.25, persist_s=1.0, bytes=1),
        ev(40.0, "job_end", status="finished", step=100, last_step_t=T0 + 38.0),
    ]
    b = accounting.breakdown(events)
    s = secs(b)
    assert b["wall_s"] == 40.0
    assert s["startup"] == 6.0 and s["shutdown"] == 2.0
    # running 6 -> 38; the step-50 stall is inside it; the final save's is in the shutdown
    assert s["checkpoint_stall"] == 0.5 and s["productive"] == 31.5
    assert b["goodput"] == pytest.approx(31.5 / 40, abs=1e-4)
    assert sum(s.values()) == pytest.approx(b["wall_s"])
    assert b["attempts"][0]["status"] == "finished" and b["failures"] == 0


def test_a_peer_recovery_splits_into_detection_reformation_and_restore():
    events = start() + [
        ev(20.0, "failure_detected", kind="process_exit", ranks=[1], step=40,
           last_step_t=T0 + 19.8),
        ev(20.1, "failure_detected", kind="collective_error", ranks=[0], step=40,
           last_step_t=T0 + 19.8),  # the same incident: not a second failure
        ev(23.0, "group_forming", generation=2, world_size=4, source="peer", cause="recovery"),
        ev(24.0, "group_formed", generation=2, world_size=4, source="peer", step=40,
           restore_s=0.4),
        ev(24.5, "recovered", generation=2, world_size=4, source="peer", resumed_step=40,
           lost_steps=0, recovery_s=4.5),
        ev(50.0, "job_end", status="finished", step=100, last_step_t=T0 + 49.0),
    ]
    b = accounting.breakdown(events)
    s = secs(b)
    assert s["detection"] == pytest.approx(0.2)
    assert s["reformation"] == pytest.approx(3.6)  # 20 -> 23.6, then 0.4 s of restore
    assert s["restore"] == pytest.approx(0.4)
    assert s["productive"] == pytest.approx(13.8 + 25.0)
    assert s["recomputed"] == 0.0 and b["failures"] == 1 and b["lost_steps"] == 0
    assert sum(s.values()) == pytest.approx(50.0)


def test_survivors_steps_after_the_lost_workers_last_report_count_as_running():
    """failure_detected knows the last step every rank reported (the lost worker's last reports
    die with it); `recovered` carries the last step any survivor completed, which moves the start
    of detection later."""
    events = start() + [
        ev(20.0, "failure_detected", kind="process_exit", ranks=[1], step=40,
           last_step_t=T0 + 19.5),
        ev(22.0, "group_forming", generation=2, world_size=4, source="peer", cause="recovery"),
        ev(22.5, "group_formed", generation=2, world_size=4, source="peer", step=42),
        ev(23.0, "recovered", generation=2, world_size=4, source="peer", resumed_step=42,
           lost_steps=0, recovery_s=3.0, last_step_t=T0 + 19.97),
        ev(30.0, "job_end", status="finished", step=60, last_step_t=T0 + 30.0),
    ]
    s = secs(accounting.breakdown(events))
    assert s["detection"] == pytest.approx(0.03)
    assert s["productive"] == pytest.approx(13.97 + 7.5)


def test_the_model_check_compares_the_run_with_the_availability_model():
    """report's model check: the first-order model is exact for failures that never overlap a
    recovery, as these (one every 10 s of wall time, each down 2 s, no checkpoints)."""
    from coordinator.goodput.report import model_check

    events = start(formed=0.0)[:1] + [
        ev(0.0, "group_forming", generation=1, world_size=2, source="init", cause="start"),
        ev(0.0, "group_formed", generation=1, world_size=2, source="init", step=0)]
    step = 0
    for k in range(3):  # 8 s training (80 steps), then 2 s down: 10 s per failure
        t = 10.0 * k
        step += 80
        events += [
            ev(t + 8.0, "failure_detected", kind="process_exit", ranks=[1], step=step,
               last_step_t=T0 + t + 8.0),
            ev(t + 9.5, "group_forming", generation=k + 2, world_size=2, source="peer",
               cause="recovery"),
            ev(t + 10.0, "group_formed", generation=k + 2, world_size=2, source="peer",
               step=step),
            ev(t + 10.1, "recovered", generation=k + 2, world_size=2, source="peer",
               resumed_step=step, lost_steps=0, recovery_s=2.0)]
    events.append(ev(30.0, "job_end", status="finished", step=step, last_step_t=T0 + 30.0))
    b = accounting.breakdown(events)
    check = model_check(b, events)
    assert check["measured"] == pytest.approx(0.8)
    assert check["inputs"]["job_mtbf_s"] == pytest.approx(10.0)
    assert check["inputs"]["recovery_s"] == pytest.approx(2.0)
    # 1 - (R + step/2) / M with the step of 0.1 s
    assert check["modelled_first_order"] == pytest.approx(1 - 2.05 / 10.0, abs=1e-3)
    # Poisson failures may land on a recovery, which costs less per failure: a higher figure
    assert check["modelled_poisson"] == pytest.approx(0.8146, abs=1e-3)
    assert model_check(accounting.breakdown(start()), start()) == {}  # no failure, no check


def test_a_rollback_to_a_checkpoint_counts_the_lost_steps_as_recomputed():
    # 100 steps in 20 s of running before the failure, 0.2 s per step; 30 steps lost
    events = start() + [
        ev(26.5, "failure_detected", kind="node_lost", ranks=[2, 3], step=100,
           last_step_t=T0 + 26.0),
        ev(28.0, "group_forming", generation=2, world_size=2, source="checkpoint",
           cause="recovery"),
        ev(30.0, "group_formed", generation=2, world_size=2, source="checkpoint", step=70,
           restore_s=1.5),
        ev(30.3, "recovered", generation=2, world_size=2, source="checkpoint", resumed_step=70,
           lost_steps=30, recovery_s=3.8),
        ev(56.0, "job_end", status="finished", step=200, last_step_t=T0 + 56.0),
    ]
    b = accounting.breakdown(events)
    s = secs(b)
    running = 20.0 + 26.0
    per_step = running / (100 + 130)
    assert s["recomputed"] == pytest.approx(30 * per_step)
    assert s["productive"] == pytest.approx(running - 30 * per_step)
    assert s["restore"] == pytest.approx(1.5) and s["reformation"] == pytest.approx(2.0)
    assert s["detection"] == pytest.approx(0.5) and b["lost_steps"] == 30


def test_a_crashed_driver_and_its_rerun():
    # attempt 1 dies (no job_end) after step 60; the rerun resumes from the step-50 checkpoint
    first = start() + [
        ev(16.0, "checkpoint_committed", step=50, stall_s=0.1, persist_s=0.5, bytes=1),
        ev(18.0, "progress", step=60, step_t=T0 + 18.0, world_size=4),
    ]
    second = start(t=100.0, formed=110.0, source="checkpoint", step=50, restore_s=0.75) + [
        ev(130.0, "job_end", status="finished", step=100, last_step_t=T0 + 129.0),
    ]
    b = accounting.breakdown(first + second)
    a1, a2 = b["attempts"]
    assert a1["status"] == "crashed" and a1["wall_s"] == 18.0 and a1["lost_steps"] == 10
    per_step = (12.0 - 0.1) / 60  # running 6 -> 18 less the stall, over 60 steps
    assert a1["recomputed"] == pytest.approx(10 * per_step, abs=1e-3)
    assert a2["status"] == "finished" and a2["restore"] == 0.75 and a2["startup"] == 9.25
    assert b["between_runs_s"] == 82.0 and b["wall_s"] == 18.0 + 30.0
    assert sum(secs(b).values()) == pytest.approx(b["wall_s"])


def test_waiting_for_capacity_and_a_growth_pause():
    events = [ev(0.0, "job_start", job="j"),
              ev(1.0, "capacity_wait", reason="capacity for 1 workers, min 2", step=0),
              ev(9.0, "group_forming", generation=1, world_size=2, source="init", cause="start"),
              ev(10.0, "group_formed", generation=1, world_size=2, source="init", step=0),
              ev(30.0, "pausing", reason="grow", step=80),
              ev(31.0, "group_forming", generation=2, world_size=4, source="peer", cause="grow"),
              ev(32.0, "group_formed", generation=2, world_size=4, source="peer", step=81,
                 restore_s=0.5),
              ev(40.0, "job_end", status="finished", step=120, last_step_t=T0 + 40.0)]
    b = accounting.breakdown(events)
    s = secs(b)
    assert s["startup"] == pytest.approx(1.0 + 1.0)  # before the wait, and forming generation 1
    assert s["waiting_for_capacity"] == pytest.approx(8.0)
    assert s["reformation"] == pytest.approx(1.5) and s["restore"] == pytest.approx(0.5)
    assert s["productive"] == pytest.approx(20.0 + 8.0)
    # in worker-seconds: nobody is held while waiting for capacity; 2 workers train for 20 s,
    # then 4 for 8 s; the growth pause holds 2 until the group of 4 forms
    w = b["worker_seconds"]
    assert w["waiting_for_capacity"] == 0.0 and w["startup"] == pytest.approx(2.0)
    assert w["productive"] == pytest.approx(2 * 20.0 + 4 * 8.0)
    assert w["reformation"] == pytest.approx(2 * 1.0 + 4 * 0.5) and w["restore"] == 2.0
    assert b["worker_goodput"] == pytest.approx(72.0 / 80.0)


def test_a_preemption_is_shutdown_not_a_failure():
    events = start() + [
        ev(30.0, "failure_detected", kind="preempt", ranks=[], step=90, last_step_t=T0 + 29.9),
        ev(31.0, "checkpoint_committed", step=91, stall_s=0.3, persist_s=0.5, bytes=1),
        ev(32.0, "job_end", status="interrupted", step=91, last_step_t=T0 + 30.1),
    ]
    b = accounting.breakdown(events)
    s = secs(b)
    assert b["failures"] == 0 and b["attempts"][0]["status"] == "interrupted"
    assert s["productive"] == pytest.approx(24.0) and s["shutdown"] == pytest.approx(2.0)
    assert s["checkpoint_stall"] == 0.0  # the emergency checkpoint is part of the shutdown


def _write_run(tmp_path, events):
    run = tmp_path / "run dir 'quoted'"
    run.mkdir()
    with open(run / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    return run


def test_report_prints_the_breakdown_and_writes_a_png(tmp_path):
    events = start() + [
        ev(12.0, "chaos", action="kill_worker", rank=1, pid=7, step=30, at_step=30),
        ev(12.1, "failure_detected", kind="process_exit", ranks=[1], step=30,
           last_step_t=T0 + 12.0),
        ev(14.0, "group_forming", generation=2, world_size=4, source="peer", cause="recovery"),
        ev(14.5, "group_formed", generation=2, world_size=4, source="peer", step=30,
           restore_s=0.2),
        ev(14.7, "recovered", generation=2, world_size=4, source="peer", resumed_step=30,
           lost_steps=0, recovery_s=2.6),
        ev(20.0, "progress", step=60, step_t=T0 + 19.9, world_size=4),
        ev(21.0, "checkpoint_committed", step=60, stall_s=0.02, persist_s=0.1, bytes=1),
        ev(30.0, "job_end", status="finished", step=100, last_step_t=T0 + 29.5),
    ]
    run = _write_run(tmp_path, events)
    proc = subprocess.run([sys.executable, "-m", "coordinator", "report", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for label in ("productive training", "failure detection", "re-formation", "state restore",
                  "start-up", "shutdown", "goodput"):
        assert label in out
    assert "process_exit 1" in out and "recoveries 1" in out
    png = run / "timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_a_torn_line_from_a_killed_driver_is_skipped(tmp_path):
    first = start() + [ev(18.0, "progress", step=60, step_t=T0 + 18.0, world_size=4)]
    second = start(t=100.0, formed=110.0) + [
        ev(130.0, "job_end", status="finished", step=100, last_step_t=T0 + 129.0)]
    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.jsonl"
    with open(path, "w") as f:
        for e in first:
            f.write(json.dumps(e) + "\n")
        f.write('{"t": 1800000019.0, "event": "checkpoint_comm')  # the driver died here
    EventLog(str(path)).close()  # the rerun opens the log: the torn line gets its end
    with open(path, "a") as f:
        for e in second:
            f.write(json.dumps(e) + "\n")
    events = accounting.run_events(str(run))
    assert events == first + second
    b = accounting.breakdown(events)
    assert [a["status"] for a in b["attempts"]] == ["crashed", "finished"]


def test_report_refuses_what_is_not_a_run_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "coordinator", "report", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no events.jsonl" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "events.jsonl").write_text("")
    proc = subprocess.run([sys.executable, "-m", "coordinator", "report", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no job_start" in proc.stderr
    assert not os.path.exists(tmp_path / "timeline.png")


def test_the_analysis_loads_neither_ray_nor_torch():
    """coordinator.goodput reads events.jsonl anywhere, a laptop without Ray included."""
    code = ("import sys\n"
            "import coordinator.goodput.accounting, coordinator.goodput.report\n"
            "import coordinator.goodput.availability, coordinator.goodput.simulate\n"
            "print(coordinator.__file__)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, loaded = proc.stdout.strip().splitlines()
    assert where.startswith(ROOT)  # this checkout's code, not an installed copy
    assert loaded == "[]"


def test_the_timeline_shortens_a_long_gap_between_attempts_and_draws_nothing_across(tmp_path):
    """A rerun an hour after a crash: the hour is drawn a few seconds wide with its length on it,
    and neither the workers line nor the step curve crosses it."""
    import math

    from coordinator.goodput import report

    first = start() + [ev(18.0, "progress", step=60, step_t=T0 + 18.0, world_size=4)]
    second = start(t=3618.0, formed=3624.0, step=50, source="checkpoint") + [
        ev(3650.0, "job_end", status="finished", step=100, last_step_t=T0 + 3649.0)]
    events = first + second
    runs = accounting.attempts(events)
    axis = report.GapAxis(runs, T0)
    assert axis.limit == 2.5  # 5% of the 18 s + 32 s the attempts ran
    assert axis.gaps == [(T0 + 18.0, T0 + 3618.0)]
    assert axis(T0 + 18.0) == 18.0 and axis(T0 + 3618.0) == pytest.approx(20.5)
    assert axis(T0 + 3650.0) == pytest.approx(52.5) and axis(T0 + 1818.0) == pytest.approx(19.25)
    xs, ys = report.world_line(runs, axis)
    breaks = [i for i, y in enumerate(ys) if math.isnan(y)]
    assert len(breaks) == 1 and max(ys[:breaks[0]]) == 4 and xs[breaks[0]] <= 18.0
    curve = report.step_curve(events, runs, axis)
    cut = [i for i, (_, s) in enumerate(curve) if math.isnan(s)]
    assert len(cut) == 1 and curve[cut[0] - 1][1] == 60 and curve[cut[0] + 1][1] == 50
    # a short gap is drawn as it was
    near = start() + [ev(18.0, "progress", step=60, step_t=T0 + 18.0, world_size=4)] + \
        start(t=19.0, formed=25.0)
    assert report.GapAxis(accounting.attempts(near), T0).gaps == []
    run = _write_run(tmp_path, events)
    proc = subprocess.run([sys.executable, "-m", "coordinator", "report", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (run / "timeline.png").read_bytes()[:4] == b"\x89PNG"
