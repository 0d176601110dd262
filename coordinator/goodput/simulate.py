"""Monte Carlo of the availability model: the same job as `coordinator/goodput/availability.py`,
played out failure by failure, so the closed forms there can be checked against a timeline
rather than against more algebra.

One trial follows one job for `horizon_s` of wall time. Failures are a Poisson process of rate
1 / job_mtbf_s that strikes in every state. The job is in one of three states:

  TRAIN     training tau of work, then stalling C for the checkpoint, over and over; the checkpoint
            is committed when its stall ends.
  PEER      recovering in place: a block of R downtime plus L of redone work (the step in flight).
            A failure in it recovers from peers again (block starts over) or, with probability
            1 - f, turns into a rollback.
  ROLLBACK  restarting from the last committed checkpoint: a block of R; a failure starts it over.
            The work since that checkpoint is gone.

A failure in TRAIN goes to PEER with probability f (the peer-restore fraction), else to ROLLBACK.
The goodput of a trial is the work it kept (committed segments plus the training part of the
segment in progress, which nothing has taken away yet) over the horizon. Starting every run at a
segment boundary and cutting it at the horizon shifts that by about one segment's work over the
horizon, tau / horizon_s, which callers should keep well below their statistical error.

Trials run side by side as numpy arrays; the loop takes one event (a failure or the end of a
block) per active trial per pass, drawing a fresh exponential gap each time (memorylessness lets
the remainder of an interrupted gap be thrown away).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from coordinator.goodput.availability import _positive, check_inputs

TRAIN, PEER, ROLLBACK = 0, 1, 2


@dataclass(frozen=True)
class Summary:
    mean: float
    ci95: Tuple[float, float]  # mean +- 1.96 standard errors over trials
    stderr: float
    trials: int


def summarize(samples: np.ndarray) -> Summary:
    """Mean and its normal 95% interval; needs at least two trials for a standard error."""
    if len(samples) < 2:
        raise ValueError(f"trials must be >= 2 for an error estimate, got {len(samples)}")
    mean = float(np.mean(samples))
    se = float(np.std(samples, ddof=1) / np.sqrt(len(samples)))
    return Summary(mean, (mean - 1.96 * se, mean + 1.96 * se), se, len(samples))


def simulate_goodput(interval_s: float, checkpoint_stall_s: float, job_mtbf_s: float,
                     recovery_s: float, peer_restore_fraction: float, peer_lost_work_s: float,
                     horizon_s: float, trials: int, rng: np.random.Generator) -> np.ndarray:
    """Goodput of each of `trials` independent runs of `horizon_s` seconds (see the module doc).
    Arguments mean what they mean in `availability.expected_goodput`; returns an array of trials."""
    check_inputs(interval_s, checkpoint_stall_s, job_mtbf_s, recovery_s, peer_restore_fraction,
                 peer_lost_work_s)
    _positive("horizon_s", horizon_s)
    _positive("trials", trials)
    tau, segment = interval_s, interval_s + checkpoint_stall_s
    block = {PEER: recovery_s + peer_lost_work_s, ROLLBACK: recovery_s}

    t = np.zeros(trials)  # wall clock
    state = np.full(trials, TRAIN)
    progress = np.zeros(trials)  # time into the current segment (training, then stall)
    kept = np.zeros(trials)  # work in committed segments
    live = np.arange(trials)  # trials still short of the horizon

    while live.size:
        gap = rng.exponential(job_mtbf_s, live.size)  # time to the next failure from now
        to_peer = rng.random(live.size) < peer_restore_fraction
        left = horizon_s - t[live]
        st = state[live]
        pr = progress[live]

        # TRAIN: run until the failure or the horizon; every whole segment passed is committed.
        training = st == TRAIN
        run = np.where(training, np.minimum(gap, left), 0.0)
        done_segments = np.floor((pr + run) / segment)
        kept[live] += np.where(training, done_segments * tau, 0.0)
        pr = np.where(training, pr + run - done_segments * segment, pr)

        # PEER / ROLLBACK: the block ends, or a failure starts it over, or the horizon comes.
        length = np.where(st == PEER, block[PEER], block[ROLLBACK])
        blocked = ~training
        block_done = blocked & (length <= gap) & (length < left)
        struck = np.where(training, gap < left, (gap < length) & (gap < left))
        elapsed = np.where(training, run,
                           np.where(block_done, length, np.minimum(gap, left)))
        t[live] += elapsed

        new_state = st.copy()
        new_state[block_done] = TRAIN
        # A failure in ROLLBACK only restarts the block; in TRAIN or PEER f decides where it goes.
        fork = struck & (st != ROLLBACK)
        new_state[fork & to_peer] = PEER
        rolled = fork & ~to_peer
        new_state[rolled] = ROLLBACK
        pr = np.where(rolled, 0.0, pr)
        state[live] = new_state
        progress[live] = pr

        finished = ~(struck | block_done)  # reached the horizon without another event
        kept[live[finished]] += np.minimum(pr[finished], tau)
        live = live[~finished]
    return kept / horizon_s
