"""Goodput accounting: where a run's wall-clock time went, from its `events.jsonl` alone.

Each attempt (one `run` command, from `job_start` to `job_end`, or to its last event if the driver
died) is cut into consecutive spans, each in one phase:

    startup               job_start -> the first group formed (Ray, worker processes, rendezvous)
    waiting_for_capacity  a `capacity_wait` -> the next group forming (fewer than min_workers fit)
    detection             the last completed step before a failure -> `failure_detected`
    reformation           `failure_detected` (or a growth `pausing`) -> the new group formed,
                          minus the restore: tear-down, replacements, rendezvous
    restore               the part of forming spent taking state (checkpoint load or peer send),
                          as the slowest worker measured it (`group_formed.restore_s`)
    running               a group formed -> its last completed step
    shutdown              the last completed step -> `job_end` (final checkpoint, digest, exit;
                          after a preemption notice, the emergency checkpoint)

Running time is split further: `checkpoint_stall` (the stalls of the checkpoints it took),
`recomputed` (steps trained again because a failure or a crash rolled the job back to a
checkpoint: lost steps x the attempt's seconds per step), and `productive`, the rest. The
categories add up to the attempts' wall time exactly; `goodput` = productive / wall. The same
breakdown in worker-seconds (GPU time, with a GPU per worker) weights each span by the workers the
job held then (a running span: its generation; re-forming: the group being formed, or the last one
before it) and gives `worker_goodput`. Time between attempts (a crashed driver until its rerun, a SLURM requeue) is reported apart as
`between_runs_s`: the job held no workers then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from coordinator.events import Event, get_field, read_events


CATEGORIES = ("productive", "checkpoint_stall", "recomputed", "detection", "reformation",
              "restore", "waiting_for_capacity", "startup", "shutdown")
PHASES = ("startup", "waiting_for_capacity", "detection", "reformation", "restore", "running",
          "shutdown")


@dataclass
class Span:
    t0: float
    t1: float
    phase: str  # one of PHASES
    # workers the job held: a running span's generation; otherwise the size of the group being
    # formed or last formed (survivors and their replacements)
    world_size: int = 0

    @property
    def seconds(self) -> float:
        return max(0.0, self.t1 - self.t0)


@dataclass
class Attempt:
    start: float
    end: float = 0.0
    status: str = "crashed"  # job_end's status, or "crashed" when the log stops without one
    spans: List[Span] = field(default_factory=list)
    stall_s: float = 0.0
    recomputed_s: float = 0.0
    steps_trained: int = 0  # steps completed in running spans (recomputed ones included)
    first_step: Optional[int] = None  # the step the first group formed at
    last_step: int = 0  # the highest step known reached
    lost_steps: int = 0
    failures: int = 0  # failure_detected incidents (preemptions excluded)

    def running_s(self) -> float:
        return sum(s.seconds for s in self.spans if s.phase == "running")

    def seconds_per_step(self) -> float:
        busy = max(0.0, self.running_s() - self.stall_s)
        return busy / self.steps_trained if self.steps_trained else 0.0


class _Cutter:
    """Walks one attempt's events and cuts its time into spans."""

    def __init__(self, start: float):
        self.a = Attempt(start)
        self.phase, self.t = "startup", start
        self.forming: Optional[Dict[str, Any]] = None  # the group_forming being waited on
        self.run_step = 0  # the step the running span started at
        self.run_world = 0
        self.held = 0  # workers held: the newest group formed or being formed
        self.stalls: List[tuple] = []  # (step, stall_s) of the checkpoints taken
        self.detection: Optional[tuple] = None  # (running span, detection span) of a failure

    def cut(self, t: float, next_phase: str) -> None:
        t = max(t, self.t)
        if t > self.t:
            self.a.spans.append(Span(self.t, t, self.phase,
                                     self.run_world if self.phase == "running" else self.held))
        self.phase, self.t = next_phase, t

    def end_running(self, t: float, step: int, last_step_t: Optional[float], next_phase: str,
                    gap_phase: str) -> None:
        """A running span ends at its last completed step; the gap after it (until `t`) is
        `gap_phase`, and `next_phase` follows `t`."""
        self.a.steps_trained += max(0, step - self.run_step)
        self.a.last_step = max(self.a.last_step, step)
        if last_step_t is not None and self.t <= last_step_t <= t:
            self.cut(last_step_t, gap_phase)
        # (without a step time, running lasts until `t`)
        self.cut(t, next_phase)

    def stall(self, step: Optional[int], stall_s: Optional[float]) -> None:
        self.stalls.append((int(step or 0), float(stall_s or 0.0)))

    def event(self, e: Dict[str, Any]) -> None:
        kind, t = e["event"], float(e["t"])
        a = self.a
        if kind == Event.CAPACITY_WAIT:
            if self.phase == "running":
                self.end_running(t, a.last_step, None, "waiting_for_capacity", "running")
            else:
                self.cut(t, "waiting_for_capacity")
        elif kind == Event.GROUP_FORMING:
            size = int(get_field(e, Event.GROUP_FORMING, "world_size") or 0)
            if self.phase == "startup" and self.held == 0:
                self.held = size  # start-up was starting the first group's workers
            if self.phase not in ("running",):
                cause = get_field(e, Event.GROUP_FORMING, "cause", "start")
                self.cut(t, "startup" if cause == "start" else "reformation")
            self.held = size  # from here on the group being formed is held
            self.forming = e
        elif kind == Event.GROUP_FORMED:
            restore = float(get_field(e, Event.GROUP_FORMED, "restore_s") or 0.0)
            start = self.t
            if restore > 0 and t - restore > start:
                self.cut(t - restore, "restore")
            elif restore > 0:
                self.phase = "restore"
            self.cut(t, "running")
            self.forming = None
            self.run_step = int(get_field(e, Event.GROUP_FORMED, "step") or 0)
            self.run_world = self.held = int(get_field(e, Event.GROUP_FORMED, "world_size") or 0)
            if a.first_step is None:
                a.first_step = self.run_step
            a.last_step = max(a.last_step, self.run_step)
        elif kind == Event.FAILURE_DETECTED:
            step = int(get_field(e, Event.FAILURE_DETECTED, "step") or 0)
            preempt = get_field(e, Event.FAILURE_DETECTED, "kind") == "preempt"
            if not preempt and self.phase != "reformation":
                a.failures += 1
            if self.phase == "running":
                if preempt:  # training goes on to the emergency checkpoint: all of it is shutdown
                    self.end_running(t, step, None, "shutdown", "running")
                else:
                    self.end_running(t, step, get_field(e, Event.FAILURE_DETECTED, "last_step_t"),
                                     "reformation", "detection")
                    spans = self.a.spans
                    if len(spans) >= 2 and spans[-1].phase == "detection":
                        self.detection = (spans[-2], spans[-1])
            elif not preempt:
                self.cut(t, "reformation")
        elif kind == Event.PAUSING:
            if self.phase == "running":
                step = int(get_field(e, Event.PAUSING, "step") or 0)
                self.end_running(t, step, None, "reformation", "running")
        elif kind == Event.RECOVERED:
            a.lost_steps += int(get_field(e, Event.RECOVERED, "lost_steps") or 0)
            # Survivors report steps the lost worker did not live to report: training went on
            # until then, and detection starts there.
            later = get_field(e, Event.RECOVERED, "last_step_t")
            if self.detection is not None and later is not None:
                run, det = self.detection
                if run.t1 < later < det.t1:
                    run.t1 = det.t0 = later
            self.detection = None
        elif kind == Event.CHECKPOINT_COMMITTED:
            self.stall(get_field(e, Event.CHECKPOINT_COMMITTED, "step"),
                       get_field(e, Event.CHECKPOINT_COMMITTED, "stall_s"))
        elif kind == Event.CHECKPOINT_FAILED:  # a failed save stalled training all the same
            self.stall(get_field(e, Event.CHECKPOINT_FAILED, "step"),
                       get_field(e, Event.CHECKPOINT_FAILED, "stall_s"))
        elif kind == Event.PROGRESS:
            a.last_step = max(a.last_step, int(get_field(e, Event.PROGRESS, "step") or 0))
        elif kind == Event.JOB_END:
            step = int(get_field(e, Event.JOB_END, "step") or 0)
            if self.phase == "running":
                self.end_running(t, step, get_field(e, Event.JOB_END, "last_step_t"), "shutdown",
                                 "shutdown")
            else:
                a.last_step = max(a.last_step, step)
                self.cut(t, "shutdown")
            a.status = get_field(e, Event.JOB_END, "status", "finished")

    def close(self, t_last: float) -> Attempt:
        if self.a.status == "crashed" and self.phase == "running":
            self.end_running(t_last, self.a.last_step, None, "running", "running")
        self.cut(t_last, self.phase)
        # The final (or emergency) checkpoint is taken after the last step: its stall lies in
        # the shutdown span already.
        final = self.a.last_step if self.a.status != "crashed" else None
        self.a.stall_s = sum(st for step, st in self.stalls if step != final)
        # Lost steps were trained once for nothing: valued at the attempt's seconds per step.
        self.a.recomputed_s = self.a.lost_steps * self.a.seconds_per_step()
        self.a.end = max(self.t, self.a.start)
        return self.a


def attempts(events: List[Dict[str, Any]]) -> List[Attempt]:
    """Cut an event log (all attempts, in order) into attempts and spans."""
    out: List[Attempt] = []
    cutter: Optional[_Cutter] = None
    last_t = None
    for e in events:
        t = float(e["t"])
        if e["event"] == Event.JOB_START:
            if cutter is not None:
                out.append(cutter.close(last_t))
            cutter = _Cutter(t)
        elif cutter is not None:
            cutter.event(e)
            if e["event"] == Event.JOB_END:
                out.append(cutter.close(t))
                cutter = None
        last_t = t
    if cutter is not None:
        out.append(cutter.close(last_t))
    # A rerun that resumed behind where its predecessor had got: those steps are trained again.
    for prev, nxt in zip(out, out[1:]):
        if nxt.first_step is not None and prev.last_step > nxt.first_step:
            lost = prev.last_step - nxt.first_step
            prev.lost_steps += lost
            prev.recomputed_s += lost * prev.seconds_per_step()
    return out


def breakdown(events: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The goodput breakdown of a run directory's events (what `summary.json` holds under
    `goodput` and `report` prints): seconds per category, their fractions of the wall time, and
    one line per attempt."""
    runs = attempts(events)
    total = {c: 0.0 for c in CATEGORIES}
    total_w = {c: 0.0 for c in CATEGORIES}
    per_attempt = []
    for a in runs:
        cats = {c: 0.0 for c in CATEGORIES}
        cats_w = {c: 0.0 for c in CATEGORIES}  # worker-seconds
        for s in a.spans:
            if s.phase != "running":
                cats[s.phase] += s.seconds
                cats_w[s.phase] += s.seconds * s.world_size
        running = a.running_s()
        running_w = sum(s.seconds * s.world_size for s in a.spans if s.phase == "running")
        cats["checkpoint_stall"] = min(a.stall_s, running)
        cats["recomputed"] = min(a.recomputed_s, running - cats["checkpoint_stall"])
        cats["productive"] = running - cats["checkpoint_stall"] - cats["recomputed"]
        # stalls and recomputed steps at the running spans' mean size
        held = running_w / running if running > 0 else 0.0
        for c in ("checkpoint_stall", "recomputed"):
            cats_w[c] = cats[c] * held
        cats_w["productive"] = running_w - cats_w["checkpoint_stall"] - cats_w["recomputed"]
        for c in CATEGORIES:
            total[c] += cats[c]
            total_w[c] += cats_w[c]
        per_attempt.append({"start": round(a.start, 3), "wall_s": round(a.end - a.start, 3),
                            "status": a.status, "failures": a.failures,
                            "lost_steps": a.lost_steps, "steps": a.last_step,
                            "seconds_per_step": round(a.seconds_per_step(), 6),
                            **{c: round(v, 3) for c, v in cats.items()}})
    wall = sum(a.end - a.start for a in runs)
    worker_s = sum(total_w.values())
    between = sum(max(0.0, nxt.start - prev.end) for prev, nxt in zip(runs, runs[1:]))
    return {
        "wall_s": round(wall, 3),
        "goodput": round(total["productive"] / wall, 4) if wall > 0 else None,
        # the same in worker-seconds (GPU time when a worker is a GPU): each span weighted by
        # the workers the job held then
        "worker_s": round(worker_s, 3),
        "worker_goodput": round(total_w["productive"] / worker_s, 4) if worker_s > 0 else None,
        "worker_seconds": {c: round(v, 3) for c, v in total_w.items()},
        "seconds": {c: round(v, 3) for c, v in total.items()},
        "fractions": {c: round(v / wall, 4) if wall > 0 else None for c, v in total.items()},
        "between_runs_s": round(between, 3),
        "failures": sum(a.failures for a in runs),
        "lost_steps": sum(a.lost_steps for a in runs),
        "attempts": per_attempt,
    }


def run_events(run_dir: str) -> List[Dict[str, Any]]:
    """The run directory's events, read as `events.read_events` reads them (a line torn by a
    driver killed while writing it is skipped: the accounting goes on without that one event)."""
    path = os.path.join(run_dir, "events.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} has no events.jsonl: not a run directory "
                                "(give run.dir of a job)")
    return read_events(path)
