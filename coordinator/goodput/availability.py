"""The availability model: how much of a job's wall time is training, given how often its workers
fail and what a failure and a checkpoint cost. Pure functions of numbers; every time is in seconds.

The job has N workers that fail independently with exponential lifetimes of mean `worker_mtbf_s`,
so the job as a whole fails at rate lambda = N / worker_mtbf_s. It trains `interval_s` (tau) of work
between checkpoints and stalls `checkpoint_stall_s` (C) for each one. A failure stops training for
`recovery_s` (R: detection, re-forming the group, restoring state) and loses some work: a restart
from the last committed checkpoint loses everything since that checkpoint; a recovery from a
surviving peer's memory loses only the step in flight. `docs/availability.md` walks through it;
`coordinator/goodput/simulate.py` simulates the same model event by event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")


def job_mtbf_s(worker_mtbf_s: float, n_workers: int) -> float:
    """Mean time between failures of the whole job, in seconds: M = worker_mtbf_s / N.

    The minimum of N independent exponential lifetimes of rate 1/worker_mtbf_s is exponential with
    rate N/worker_mtbf_s: any one worker failing interrupts the job.
    """
    _positive("worker_mtbf_s", worker_mtbf_s)
    _positive("n_workers", n_workers)
    return worker_mtbf_s / n_workers


def p_failure_in_interval(interval_s: float, worker_mtbf_s: float, n_workers: int) -> float:
    """Probability that at least one of N workers fails within `interval_s` seconds:
    1 - (1 - p)^N with p = 1 - exp(-interval_s / worker_mtbf_s) for one worker.

    For exponential lifetimes this equals 1 - exp(-N * interval_s / worker_mtbf_s).
    """
    _non_negative("interval_s", interval_s)
    _positive("worker_mtbf_s", worker_mtbf_s)
    _positive("n_workers", n_workers)
    # log1p/expm1: for a 50,000-hour MTBF p is ~1e-7 and (1 - p)^N would round badly.
    log_survive_one = -interval_s / worker_mtbf_s  # log(1 - p)
    return -math.expm1(n_workers * log_survive_one)


def young_daly_interval_s(checkpoint_cost_s: float, mtbf_s: float) -> float:
    """First-order optimal work between checkpoints (Young 1974, Daly 2006): sqrt(2 * C * M), in
    seconds, with C the checkpoint cost (what training stalls for) and M the JOB's MTBF (use
    `job_mtbf_s`, not one worker's). It balances the checkpoint overhead C / tau against the
    rollback loss lambda * tau / 2; it is accurate while C << M.
    """
    if not checkpoint_cost_s >= 0:
        raise ValueError(f"checkpoint_cost_s must be >= 0, got {checkpoint_cost_s!r}")
    if not mtbf_s > 0:
        raise ValueError(f"mtbf_s must be > 0, got {mtbf_s!r}")
    return math.sqrt(2.0 * checkpoint_cost_s * mtbf_s)


def expected_lost_work_s(interval_s: float, peer_restore_fraction: float = 0.0,
                         step_s: float = 0.0) -> float:
    """Work lost per failure on average, in seconds (first order: at most one failure per interval):
    f * step_s / 2 + (1 - f) * interval_s / 2, with f = `peer_restore_fraction`.

    A failure strikes at a uniformly random point of what it interrupts. Rolled back to the last
    committed checkpoint, it loses half an interval on average; recovered from a surviving peer's
    replica, it loses only the step in flight, half a step on average. f is the fraction of failures
    that find a full replica alive.
    """
    _non_negative("interval_s", interval_s)
    _fraction("peer_restore_fraction", peer_restore_fraction)
    _non_negative("step_s", step_s)
    f = peer_restore_fraction
    return f * step_s / 2.0 + (1.0 - f) * interval_s / 2.0


def _uninterrupted_s(rate: float, length_s: float) -> float:
    """Expected wall time to get `length_s` seconds without a failure when each failure (Poisson,
    `rate` per second) starts it over: (exp(rate * length) - 1) / rate; `length_s` at rate 0."""
    if rate == 0:
        return length_s
    try:
        return math.expm1(rate * length_s) / rate
    except OverflowError:  # rate * length_s > ~709: never done, and goodput is 0
        return math.inf


def check_inputs(interval_s: float, checkpoint_stall_s: float, job_mtbf_s: float,
                 recovery_s: float, peer_restore_fraction: float,
                 peer_lost_work_s: float) -> None:
    """The model's inputs, as `expected_goodput` and the Monte Carlo take them: ValueError naming
    the first one out of range."""
    _positive("interval_s", interval_s)
    _non_negative("checkpoint_stall_s", checkpoint_stall_s)
    _positive("job_mtbf_s", job_mtbf_s)
    _non_negative("recovery_s", recovery_s)
    _fraction("peer_restore_fraction", peer_restore_fraction)
    _non_negative("peer_lost_work_s", peer_lost_work_s)


def expected_goodput(interval_s: float, checkpoint_stall_s: float, job_mtbf_s: float,
                     recovery_s: float, peer_restore_fraction: float = 0.0,
                     peer_lost_work_s: float = 0.0) -> float:
    """Expected fraction of wall time that trains: exact for exponential failures (a renewal-reward
    argument over checkpoint segments), under these assumptions:

    - failures form a Poisson process of rate lambda = 1 / job_mtbf_s at every moment: training,
      checkpoint stalls and recoveries alike;
    - a segment is tau = interval_s of training then C = checkpoint_stall_s of stall; the checkpoint
      is committed at the end of the stall, and a failure before that loses the whole segment;
    - each failure is recovered from a peer with probability f = peer_restore_fraction,
      independently of the others; otherwise the job rolls back to the last committed checkpoint;
    - a rollback costs a downtime R = recovery_s that any further failure starts over;
    - a peer recovery costs R plus the redo of the step in flight, L = peer_lost_work_s (use
      step_s / 2), as one block of D = R + L that a further failure starts over, or turns into a
      rollback (with probability 1 - f) that loses the segment.

    Restart from the last checkpoint (f = 0) is Daly's (2006) formula for one segment:
        E[T] = exp(lambda * R) * (exp(lambda * (tau + C)) - 1) / lambda,   goodput = tau / E[T].

    In-place recovery from peers (f = 1, no rollback): training alternates with recovery blocks;
    a stretch between failures lasts 1/lambda on average and each block lasts
    (exp(lambda * D) - 1) / lambda (an uninterrupted D, restarted by every failure), so the share of
    time outside recovery is exp(-lambda * D), and tau / (tau + C) of that trains:
        goodput = tau / (tau + C) * exp(-lambda * (R + L))
                = (tau / (tau + C)) / (1 + lambda * (exp(lambda * D) - 1) / lambda).

    Any f: a peer recovery ends in a rollback with probability 1 - q, q = sigma / pi, where
    sigma = exp(-lambda * D) and pi = 1 - f * (1 - sigma). Counted in time outside recovery
    blocks, failures that end in a rollback come at rate kappa = lambda * (1 - f) / pi, and each
    unit of that time brings 1 / pi - 1 of peer recovery with it (including the part of recoveries
    that end in a rollback). A segment needs s = tau + C of it without such a failure, which takes
    (exp(kappa * s) - 1) / kappa on average and meets exp(kappa * s) - 1 rollbacks, each a block of
    (exp(lambda * R) - 1) / lambda:
        E[T] = (exp(kappa * s) - 1) * (1 / (kappa * pi) + (exp(lambda * R) - 1) / lambda),
        goodput = tau / E[T],
    which gives Daly's formula at f = 0 and the in-place one at f = 1.
    """
    check_inputs(interval_s, checkpoint_stall_s, job_mtbf_s, recovery_s, peer_restore_fraction,
                 peer_lost_work_s)
    lam = 1.0 / job_mtbf_s
    f = peer_restore_fraction
    segment_s = interval_s + checkpoint_stall_s
    pi = 1.0 + f * math.expm1(-lam * (recovery_s + peer_lost_work_s))  # 1 - f * (1 - sigma)
    if pi == 0.0:  # f = 1 and exp(-lambda * D) underflowed: a recovery (almost) never completes
        return 0.0
    kappa = lam * (1.0 - f) / pi
    # Written as kappa * (exp(kappa s) - 1) / kappa so that f = 1 (kappa = 0) needs no case of
    # its own: the time per segment is then s / pi and there are no rollbacks.
    rollback_s = kappa * _uninterrupted_s(lam, recovery_s) if kappa > 0 else 0.0
    expected_s = _uninterrupted_s(kappa, segment_s) * (1.0 / pi + rollback_s)
    return interval_s / expected_s


def first_order_goodput(interval_s: float, checkpoint_stall_s: float, job_mtbf_s: float,
                        recovery_s: float, lost_work_s: float) -> float:
    """tau / (tau + C) * (1 - (R + L) / M): every failure costs its full downtime R and lost work L,
    and none strikes while another is being recovered from. Exact for failures that come only
    while the job trains, spaced wider than a recovery (the chaos soak's, which fire at steps);
    for a Poisson process in wall time it is the first-order term of `expected_goodput`."""
    _positive("interval_s", interval_s)
    _non_negative("checkpoint_stall_s", checkpoint_stall_s)
    _positive("job_mtbf_s", job_mtbf_s)
    return max(0.0, interval_s / (interval_s + checkpoint_stall_s)
               * (1.0 - (recovery_s + lost_work_s) / job_mtbf_s))


@dataclass(frozen=True)
class Strategy:
    """How a job comes back from a failure, with its measured cost."""

    name: str
    recovery_s: float  # downtime per failure: detection, re-forming, restoring state (seconds)
    peer_restore_fraction: float  # share of failures recovered from a surviving replica, 0..1

    def __post_init__(self):
        _non_negative("recovery_s", self.recovery_s)
        _fraction("peer_restore_fraction", self.peer_restore_fraction)


def in_place(recovery_s: float, peer_restore_fraction: float = 1.0) -> Strategy:
    """Ours: the survivors re-form in place and take the state from a surviving replica; only the
    failures that find no full replica alive (`1 - peer_restore_fraction`) roll back."""
    return Strategy("in_place", recovery_s, peer_restore_fraction)


def restart_all(recovery_s: float) -> Strategy:
    """Ray Train style: every worker is restarted and the state comes from the last committed
    checkpoint, so every failure rolls back."""
    return Strategy("restart_all", recovery_s, 0.0)


def goodput(strategy: Strategy, n_workers: int, worker_mtbf_s: float, checkpoint_stall_s: float,
            step_s: float, interval_s: Optional[float] = None) -> Dict[str, float]:
    """The model for one job size: `interval_s` defaults to Young/Daly's sqrt(2 * C * M) from the
    job's MTBF M and the stall C. Returns interval_s, job_mtbf_s, p_failure_in_interval (of one
    segment, stall included), lost_work_per_failure_s (first order) and goodput (exact)."""
    _non_negative("step_s", step_s)
    mtbf = job_mtbf_s(worker_mtbf_s, n_workers)
    if interval_s is None:
        interval_s = young_daly_interval_s(checkpoint_stall_s, mtbf)
        if interval_s == 0:
            # A free checkpoint would be taken continuously; one per step is the finest there is.
            interval_s = step_s
    _positive("interval_s", interval_s)
    return {
        "interval_s": interval_s,
        "job_mtbf_s": mtbf,
        "p_failure_in_interval": p_failure_in_interval(
            interval_s + checkpoint_stall_s, worker_mtbf_s, n_workers),
        "lost_work_per_failure_s": expected_lost_work_s(
            interval_s, strategy.peer_restore_fraction, step_s),
        "goodput": expected_goodput(interval_s, checkpoint_stall_s, mtbf, strategy.recovery_s,
                                    strategy.peer_restore_fraction, step_s / 2.0),
    }
