"""Step accounting: per-step loss aggregation over ranks, step rates, worker exposure and the
moment a recovered generation completes its first step.

A step counts as completed once every rank of the generation reported it; its loss is the sum of
the ranks' weighted losses (each rank's mean times its share of the global batch), which equals
the global-batch mean whatever the world size.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Deque, Dict, Optional, Tuple

from coordinator.control import recovery_profile
from coordinator.protocol import StepReport


@dataclass
class StepTally:
    """The reports of one step received so far."""
    loss: float = 0.0  # sum of the ranks' weighted losses
    ranks: int = 0  # ranks that reported it
    t: float = 0.0  # unix time the last rank completed it
    duration_s: float = 0.0  # the slowest rank's step time
    skipped: bool = False  # not applied (all ranks skip together)
    nonfinite: bool = False  # found non-finite in this run of it
    grad_norm: Optional[float] = None  # the step's global gradient norm (every rank's)
    lr: Optional[float] = None  # the learning rate it used
    eval_loss: Optional[float] = None  # the held-out loss after it (the same on every rank)
    eval_s: float = 0.0  # the slowest rank's evaluation


@dataclass
class Progress:
    step: int
    total: int
    loss: Optional[float]
    world_size: int
    steps_per_s: Optional[float]
    grad_norm: Optional[float] = None
    eval_loss: Optional[float] = None  # the newest evaluation's

    @property
    def eta_s(self) -> Optional[float]:
        if not self.steps_per_s:
            return None
        return (self.total - self.step) / self.steps_per_s


@dataclass(frozen=True)
class Snapshot:
    """The job as one RUNNING poll leaves it."""
    now: float
    step: int
    step_t: Optional[float]  # unix time the newest step completed
    loss: Optional[float]
    world_size: int
    steps_per_s: Optional[float]  # recent rate
    grad_norm: Optional[float]  # the newest applied step's global gradient norm
    lr: Optional[float]  # the learning rate the newest step used
    eval_loss: Optional[float]  # the newest evaluation's held-out loss
    step_s: Optional[float]  # mean recent step time
    step_time_s: float  # time in steps so far (the slowest rank's, summed)
    wall_s: float  # since the controller started
    incidents: int  # failures counted so far
    exposure_worker_s: float


@dataclass
class Completed:
    """What one newly completed step tells the controller."""
    step: int
    recovered: Optional[Dict[str, Any]] = None  # the `recovered` event's fields, if it ends one
    nonfinite: bool = False  # the step was found non-finite and skipped
    eval: Optional[Dict[str, Any]] = None  # {loss, eval_s} when the step was evaluated


class StepAccounting:
    def __init__(self, total_steps: int, window: int = 50):
        self.total_steps = total_steps
        # the steady-state rate and the auto interval skip the first 10% of steps (at most 50)
        self.warmup_steps = max(1, min(total_steps // 10, 50))
        self.pending: Dict[int, StepTally] = {}
        self.last_step = 0
        self.last_loss: Optional[float] = None
        self.last_grad_norm: Optional[float] = None
        self.last_lr: Optional[float] = None
        self.last_eval_loss: Optional[float] = None
        self.max_step_seen = 0  # the highest step any rank reported completing
        self.step_time_s = 0.0  # sum over steps of the slowest rank's step time
        self.recent: Deque[Tuple[int, float]] = collections.deque(maxlen=window)  # (step, t)
        self.durations: Deque[float] = collections.deque(maxlen=window)
        self._warm: Optional[Tuple[int, float]] = None  # where the steady-state window starts
        # worker-seconds of the job since its first step, recoveries included (workers can fail
        # then too): the exposure behind the observed failure rate of the auto interval
        self.exposure_worker_s = 0.0
        self._awaiting: Optional[Dict[str, Any]] = None
        self.first_step_t: Optional[float] = None  # when this run's first step completed

    def new_generation(self, resumed_step: int) -> None:
        """A generation formed with state at `resumed_step`: partial tallies of the old one go."""
        self.pending.clear()
        self.last_step = resumed_step

    def resume_at(self, step: int) -> None:
        self.last_step = self.max_step_seen = step

    @property
    def awaiting_recovery(self) -> bool:
        """A recovered generation has not completed its first step yet."""
        return self._awaiting is not None

    def expect_recovery(self, fields: Dict[str, Any], t0: float, formed_t: float) -> None:
        """The next completed step ends a recovery detected at `t0` whose generation formed at
        `formed_t`: it yields `fields` with `recovery_s` (and the first step's phase) added."""
        self._awaiting = dict(fields, t0=t0, formed_t=formed_t)

    def saw(self, step: int) -> None:
        self.max_step_seen = max(self.max_step_seen, step)

    def add(self, rep: StepReport, world_size: int) -> Optional[Completed]:
        tally = self.pending.setdefault(rep.step, StepTally())
        tally.loss += rep.weighted_loss
        tally.ranks += 1
        tally.t = max(tally.t, rep.t)
        tally.duration_s = max(tally.duration_s, rep.duration_s)
        tally.skipped |= rep.skipped
        tally.nonfinite |= rep.nonfinite
        if rep.grad_norm is not None:
            tally.grad_norm = rep.grad_norm
        if rep.lr is not None:
            tally.lr = rep.lr
        if rep.eval_loss is not None:
            tally.eval_loss = rep.eval_loss
            tally.eval_s = max(tally.eval_s, rep.eval_s or 0.0)
        if tally.ranks < world_size:
            return None
        del self.pending[rep.step]
        if rep.step <= self.last_step:
            return None
        self.last_step = rep.step
        self.last_lr = tally.lr
        if not tally.skipped:  # a skipped step's loss is NaN: the curve keeps the last real one
            self.last_loss = tally.loss
            self.last_grad_norm = tally.grad_norm
        self.saw(rep.step)
        self.step_time_s += tally.duration_s
        self.durations.append(tally.duration_s)
        if self.recent and self.recent[-1][1] < tally.t and rep.step == self.recent[-1][0] + 1:
            self.exposure_worker_s += world_size * (tally.t - self.recent[-1][1])
        self.recent.append((rep.step, tally.t))
        if self.first_step_t is None:
            self.first_step_t = tally.t
        if self._warm is None and rep.step >= self.warmup_steps:
            self._warm = (rep.step, tally.t)
        done = Completed(rep.step, nonfinite=tally.nonfinite)
        if tally.eval_loss is not None:
            self.last_eval_loss = tally.eval_loss
            done.eval = {"loss": tally.eval_loss, "eval_s": round(tally.eval_s, 4)}
        if self._awaiting is not None:
            rec, self._awaiting = self._awaiting, None
            rec["recovery_s"] = round(max(0.0, tally.t - rec.pop("t0")), 3)
            formed_t = rec.pop("formed_t")
            if "phases" in rec:
                rec["phases"] = recovery_profile.first_step(rec["phases"], formed_t, tally.t)
            done.recovered = rec
        return done

    @property
    def last_step_t(self) -> Optional[float]:
        """Unix time the newest completed step ended (None before the first)."""
        return self.recent[-1][1] if self.recent else None

    def newest_report_t(self) -> Optional[float]:
        """The last moment any rank completed a step, partial steps included."""
        return max([self.last_step_t or 0.0] + [t.t for t in self.pending.values()]) or None

    def mean_step_s(self) -> Optional[float]:
        """Seconds of training per step, from recent step times (recoveries and polls left out)."""
        return sum(self.durations) / len(self.durations) if self.durations else None

    def _rate(self, since: Optional[Tuple[int, float]]) -> Optional[float]:
        if since is None or not self.recent:
            return None
        (s0, t0), (s1, t1) = since, self.recent[-1]
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else None

    def steps_per_s(self) -> Optional[float]:
        """The recent rate (the last `window` completed steps)."""
        return self._rate(self.recent[0] if self.recent else None)

    def steady_steps_per_s(self) -> Optional[float]:
        """Steps/s after the warm-up, start-up excluded."""
        return self._rate(self._warm)

    def snapshot(self, now: float, world_size: int, incidents: int, wall_s: float) -> Snapshot:
        return Snapshot(now=now, step=self.last_step, step_t=self.last_step_t,
                        loss=self.last_loss, world_size=world_size, grad_norm=self.last_grad_norm,
                        lr=self.last_lr, eval_loss=self.last_eval_loss,
                        steps_per_s=self.steps_per_s(), step_s=self.mean_step_s(),
                        step_time_s=self.step_time_s, wall_s=wall_s, incidents=incidents,
                        exposure_worker_s=self.exposure_worker_s)

    def progress(self, world_size: int) -> Progress:
        return Progress(self.last_step, self.total_steps, self.last_loss, world_size,
                        self.steps_per_s(), self.last_grad_norm, self.last_eval_loss)
