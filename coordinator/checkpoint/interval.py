"""`checkpoint.interval_steps: auto`: how often to checkpoint, from what the run measures.

Young/Daly: with a checkpoint costing C seconds of training (the stall; the persist runs in the
background) and the job failing every M seconds on average, checkpointing every sqrt(2 C M) seconds
of work minimises the expected time lost to checkpoints plus rollbacks. Here:

- C is the median stall of the last few committed checkpoints (the first checkpoint is taken after
  a short warm-up, so that C is measured, not guessed);
- M is the job's MTBF: the per-worker failure rate times the world size. Before the run has seen a
  failure the rate is the configured prior (`failure.expected_mtbf_s`, per worker); once it has, the
  observed rate (failures over worker-seconds of exposure) is used.
- The interval is never shorter than the time the last persist took (a save would otherwise wait
  for the previous one) and never shorter than one step.

Policy apart from mechanism: `AutoInterval` takes facts and returns a `Choice`; the controller asks
the workers for a checkpoint when the choice says one is due, and logs each new choice with its
inputs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import List, Optional

from coordinator.goodput.availability import young_daly_interval_s

RECENT_STALLS = 5  # the median of this many recent stalls is C
NOTABLE_CHANGE = 0.2  # a new choice is logged when the interval moves by more than this fraction


@dataclass
class Choice:
    interval_steps: int
    interval_s: float  # seconds of training between checkpoints
    stall_s: Optional[float]  # C: median stall of recent checkpoints (None: none measured yet)
    persist_s: Optional[float]  # the last background persist
    job_mtbf_s: float  # M
    mtbf_source: str  # "configured" (failure.expected_mtbf_s) or "observed"
    failures: int
    exposure_worker_s: float
    step_s: Optional[float]  # wall seconds per step
    reason: str

    def fields(self) -> dict:
        """The event's fields (rounded for reading)."""
        r = lambda x, n=4: None if x is None else round(x, n)  # noqa: E731
        return {"interval_steps": self.interval_steps, "interval_s": r(self.interval_s, 2),
                "stall_s": r(self.stall_s), "persist_s": r(self.persist_s),
                "job_mtbf_s": r(self.job_mtbf_s, 1), "mtbf_source": self.mtbf_source,
                "failures": self.failures, "exposure_worker_s": r(self.exposure_worker_s, 1),
                "step_s": r(self.step_s, 5), "reason": self.reason}


@dataclass
class AutoInterval:
    worker_mtbf_prior_s: float  # failure.expected_mtbf_s: per worker
    total_steps: int
    warmup_steps: int  # the first checkpoint, taken to measure the stall
    stalls: List[float] = field(default_factory=list)
    persist_s: Optional[float] = None

    def observe_checkpoint(self, stall_s: float, persist_s: float) -> None:
        self.stalls.append(stall_s)
        del self.stalls[:-RECENT_STALLS]
        self.persist_s = persist_s

    def choose(self, world_size: int, failures: int, exposure_worker_s: float,
               step_s: Optional[float]) -> Choice:
        """The interval for the current measurements. `failures`: failures seen by this run
        (preemptions excluded); `exposure_worker_s`: worker-seconds the job has run; `step_s`:
        seconds per step lately (None before the rate is known)."""
        n = max(1, world_size)
        if failures > 0 and exposure_worker_s > 0:
            worker_mtbf, source = exposure_worker_s / failures, "observed"
        else:
            worker_mtbf, source = self.worker_mtbf_prior_s, "configured"
        job_mtbf = worker_mtbf / n
        if not self.stalls or not step_s:
            steps = max(1, min(self.warmup_steps, self.total_steps))
            return Choice(steps, steps * (step_s or 0.0), None, self.persist_s, job_mtbf, source,
                          failures, exposure_worker_s, step_s,
                          f"first checkpoint after {steps} warm-up steps, to measure its stall")
        stall = statistics.median(self.stalls)
        tau = young_daly_interval_s(stall, job_mtbf)
        why = (f"Young/Daly sqrt(2 * stall {stall:.3f}s * job MTBF {job_mtbf:.0f}s) = "
               f"{tau:.1f}s")
        if self.persist_s is not None and tau < self.persist_s:
            tau = self.persist_s
            why += f", raised to the last persist time {self.persist_s:.2f}s"
        steps = max(1, min(self.total_steps, int(math.ceil(tau / step_s))))
        why += f" = {steps} steps of {step_s * 1000:.1f} ms"
        return Choice(steps, tau, stall, self.persist_s, job_mtbf, source, failures,
                      exposure_worker_s, step_s, why)


class AutoSchedule:
    """The bookkeeping around `AutoInterval` for the controller: re-choose when an input changes
    (a checkpoint measured, a failure, the step rate first known), say when a checkpoint is due,
    and keep one numbered request in flight at a time."""

    def __init__(self, policy: AutoInterval):
        self.policy = policy
        self.choice: Optional[Choice] = None  # the choice in force
        self.logged: Optional[Choice] = None  # the last choice logged
        self._inputs: Optional[tuple] = None  # what the current choice was made from
        self.number = 0  # checkpoint requests sent (the workers' vote carries the newest)
        self.asked_at: Optional[int] = None  # the step of the request in flight
        self.last_save_step = 0  # the newest checkpoint taken (or restored) by this run
        self.commits = 0

    def committed(self, step: int, stall_s: float, persist_s: float) -> None:
        self.policy.observe_checkpoint(stall_s, persist_s)
        self.commits += 1
        self.last_save_step = max(self.last_save_step, step)

    def settled(self, steps: List[int]) -> None:
        """Saves that committed or failed: the request in flight is answered by one at or after
        its step."""
        if self.asked_at is not None and any(s >= self.asked_at for s in steps):
            self.asked_at = None

    def _notable(self, choice: Choice) -> bool:
        """Worth a log line and an event: the first choice, a new basis (stall measured, prior
        to observed), or an interval that moved by more than NOTABLE_CHANGE since the last one
        logged (step times jitter; the choice in force is always `self.choice`)."""
        last = self.logged
        if last is None or (last.stall_s is None) != (choice.stall_s is None) \
                or last.mtbf_source != choice.mtbf_source:
            return True
        return abs(choice.interval_steps - last.interval_steps) \
            > NOTABLE_CHANGE * last.interval_steps

    def new_generation(self, restored_step: Optional[int]) -> None:
        self.asked_at = None  # a request to the old generation died with it
        if restored_step is not None:
            self.last_save_step = restored_step

    def tick(self, step: int, world_size: int, failures: int, exposure_worker_s: float,
             step_s: Optional[float]) -> tuple:
        """(a new choice to log, or None; whether to send checkpoint request `number`)."""
        fresh = None
        inputs = (self.commits, failures, step_s is not None)
        if inputs != self._inputs:
            self._inputs = inputs
            choice = self.policy.choose(world_size, failures, exposure_worker_s, step_s)
            if self._notable(choice):
                fresh = self.logged = choice
            self.choice = choice
        due = step - self.last_save_step >= self.choice.interval_steps
        if due and self.asked_at is None and step < self.policy.total_steps:
            self.number += 1
            self.asked_at = step
            return fresh, True
        return fresh, False
