"""The job controller: a state machine you can step.

    STARTING -> FORMING -> RUNNING -> FINALIZING -> DONE
        \\           \\          \\            \\
         +-----------+----------+------------+--> FAILED

Each `step()` performs one transition (or, in RUNNING, one poll of the workers) and returns a
`Transition` saying what happened. The controller carries out decisions; *what* to decide comes from
the policies (`scaling_policy`). It never sleeps: the caller paces RUNNING polls, so tests can drive
it one iteration at a time with a fake `WorkerGroup`.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from coordinator.checkpoint.committer import Committer
from coordinator.checkpoint.manifest import CheckpointInfo
from coordinator.config import Config
from coordinator.events import EventLog
from coordinator.scaling_policy import ScalingPolicy
from coordinator.worker_group import CapacityError, WorkerFailure, WorkerGroup

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    STARTING = "starting"
    FORMING = "forming"
    RUNNING = "running"
    FINALIZING = "finalizing"
    DONE = "done"
    FAILED = "failed"


TERMINAL = (Phase.DONE, Phase.FAILED)


@dataclass
class Progress:
    step: int
    total: int
    loss: Optional[float]
    world_size: int
    steps_per_s: Optional[float]

    @property
    def eta_s(self) -> Optional[float]:
        if not self.steps_per_s:
            return None
        return (self.total - self.step) / self.steps_per_s


@dataclass
class Transition:
    before: Phase
    after: Phase
    note: str = ""
    progress: Optional[Progress] = None


def _describe(kind: str, fs: List[WorkerFailure]) -> str:
    """'worker 2 lost (process exit, pid 4711)' / 'workers [0, 1] failed (task error: ...)'."""
    ranks = fs[0].rank if len(fs) == 1 else [f.rank for f in fs]
    noun = "worker" if len(fs) == 1 else "workers"
    pids = ", ".join(str(f.pid) for f in fs)
    if kind in ("process_exit", "node_lost", "hang"):
        return f"{noun} {ranks} lost ({kind.replace('_', ' ')}, pid {pids})"
    return f"{noun} {ranks} failed ({kind.replace('_', ' ')}: {fs[0].error})"


class Controller:
    def __init__(self, cfg: Config, group: WorkerGroup, events: EventLog,
                 capacity: Callable[[], int], committer: Optional[Committer] = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.group = group
        self.events = events
        self.capacity = capacity
        self.clock = clock
        self.policy = ScalingPolicy(cfg.scaling.min_workers, cfg.scaling.max_workers)
        self.committer = committer
        self.resume: Optional[CheckpointInfo] = None  # the checkpoint this run started from
        self.phase = Phase.STARTING
        self.generation = 0
        self.world_size = 0
        self.world_sizes: List[int] = []
        self.failures: List[WorkerFailure] = []
        self.error: Optional[str] = None
        self.digest: Optional[str] = None
        self.started_at = clock()
        self._waiting_since: Optional[float] = None
        # Per-step loss aggregation: step -> [sum of weighted losses, ranks reported, max t, max dur]
        self._pending: Dict[int, List[float]] = {}
        self.last_step = 0
        self.last_loss: Optional[float] = None
        self.step_time_s = 0.0  # sum over steps of the slowest rank's step time
        self._recent = collections.deque(maxlen=50)  # (step, t) of completed steps, for the rate
        self._warm: Optional[tuple] = None  # (step, t) where the steady-state window starts

    # ---- the state machine ----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def step(self) -> Transition:
        handler = {
            Phase.STARTING: self._start,
            Phase.FORMING: self._form,
            Phase.RUNNING: self._run,
            Phase.FINALIZING: self._finalize,
        }.get(self.phase)
        if handler is None:
            return Transition(self.phase, self.phase, "terminal")
        before = self.phase
        note, progress = handler()
        return Transition(before, self.phase, note, progress)

    def _start(self):
        cap = self.capacity()
        decision = self.policy.initial(cap)
        if decision.world_size is None:
            now = self.clock()
            if self._waiting_since is None:
                self._waiting_since = now
                logger.warning("waiting for capacity: %s (up to failure.wait_for_workers_s=%gs)",
                               decision.reason, self.cfg.failure.wait_for_workers_s)
            if now - self._waiting_since >= self.cfg.failure.wait_for_workers_s:
                return self._fail(
                    f"not enough capacity: {decision.reason}; waited "
                    f"{now - self._waiting_since:.0f}s (failure.wait_for_workers_s="
                    f"{self.cfg.failure.wait_for_workers_s:g}); lower scaling.min_workers or "
                    f"scaling.cpus_per_worker, or add nodes"), None
            return "waiting for capacity", None
        if self.committer is not None:
            # A rerun of the same command resumes: a committed checkpoint beats the initial state.
            self.resume = self.committer.resolve_resume()
            if self.resume is not None:
                self.last_step = self.resume.step
                logger.info("resuming from checkpoint step %d (%s, saved by %s workers)",
                            self.resume.step, self.resume.path, self.resume.world_size)
                if self.resume.step >= self.cfg.train.steps:
                    logger.warning("nothing left to train: the checkpoint is at step %d and "
                                   "train.steps=%d; raise train.steps to continue, or use "
                                   "another run.dir / checkpoint.uri to start afresh",
                                   self.resume.step, self.cfg.train.steps)
        logger.info(decision.reason)
        try:
            infos = self.group.start(decision.world_size)
        except CapacityError as e:
            return self._fail(str(e)), None
        for info in infos:
            self.events.emit("worker_start", rank=info.rank, pid=info.pid, node_id=info.node_id,
                             host=info.host, generation=self.generation + 1)
        self.world_size = len(infos)
        self.phase = Phase.FORMING
        return f"started {len(infos)} workers", None

    def _form(self):
        self.generation += 1
        restore = self.resume.path if self.resume is not None else None
        failures = self.group.form(self.generation, restore)
        if failures:
            return self._on_failures(failures), None
        self.world_sizes.append(self.world_size)
        self.events.emit("group_formed", generation=self.generation, world_size=self.world_size,
                         ranks=list(range(self.world_size)),
                         source="checkpoint" if restore else "init", step=self.last_step)
        logger.info("generation %d formed: %d workers", self.generation, self.world_size)
        self.group.launch(self.cfg.train.steps)
        self.phase = Phase.RUNNING
        return f"generation {self.generation} formed", None

    def _run(self):
        poll = self.group.poll()
        self._absorb(poll.heartbeats)
        hung = self._hung(poll.silent_s)
        if hung and not poll.failures:
            for f in hung:
                logger.warning("worker %d (pid %s) has not answered a heartbeat for %.0fs while "
                               "its peers did (failure.hang_timeout_s=%g): killing it", f.rank,
                               f.pid, poll.silent_s[f.rank], self.cfg.failure.hang_timeout_s)
                self.group.kill(f.rank)
            poll.failures = hung
        if poll.failures:
            return self._on_failures(poll.failures), self.progress()
        if len(poll.finished) == self.world_size:
            # The train calls returned: drain the last reports, which may postdate the heartbeat.
            self._absorb(self.group.poll().heartbeats)
            self.phase = Phase.FINALIZING
            return f"all workers reached step {max(poll.finished.values())}", self.progress()
        return "", self.progress()

    def _finalize(self):
        self.digest = self.group.final_digest()
        self.phase = Phase.DONE
        return "done", self.progress()

    # ---- helpers --------------------------------------------------------------------------
    def _hung(self, silent_s: Dict[int, float]) -> List[WorkerFailure]:
        """Workers silent for longer than failure.hang_timeout_s while some peer still answers.
        A frozen process (SIGSTOP, a GIL-bound loop) cannot answer on its control thread; its
        peers, blocked in a collective with it, still can. If nobody answers, the driver's view is
        in doubt (e.g. the whole node is frozen) and nothing is decided here."""
        limit = self.cfg.failure.hang_timeout_s
        quiet = [r for r, s in silent_s.items() if s > limit]
        if not quiet or len(quiet) == len(silent_s):
            return []
        return [WorkerFailure(r, "hang", self.group.pid(r), f"no heartbeat for {silent_s[r]:.0f}s")
                for r in sorted(quiet)]

    def _absorb(self, heartbeats) -> None:
        for hb in heartbeats.values():
            for rep in hb.reports:
                self._account(rep.step, rep.weighted_loss, rep.t, rep.duration_s)
            for save in hb.saves:
                if self.committer is not None:
                    self.committer.on_save(save, self.world_size, self.generation)

    def _account(self, step: int, weighted_loss: float, t: float, duration: float) -> None:
        entry = self._pending.setdefault(step, [0.0, 0, 0.0, 0.0])
        entry[0] += weighted_loss
        entry[1] += 1
        entry[2] = max(entry[2], t)
        entry[3] = max(entry[3], duration)
        if entry[1] < self.world_size:
            return
        del self._pending[step]
        if step <= self.last_step:
            return
        self.last_step, self.last_loss = step, entry[0]
        self.step_time_s += entry[3]
        self._recent.append((step, entry[2]))
        if self._warm is None and step >= max(1, min(self.cfg.train.steps // 10, 50)):
            self._warm = (step, entry[2])

    def progress(self) -> Progress:
        return Progress(self.last_step, self.cfg.train.steps, self.last_loss, self.world_size,
                        self._rate(self._recent[0] if self._recent else None))

    def _rate(self, since: Optional[tuple]) -> Optional[float]:
        if since is None or not self._recent:
            return None
        (s0, t0), (s1, t1) = since, self._recent[-1]
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else None

    def steady_steps_per_s(self) -> Optional[float]:
        """Steps/s after a warm-up of 10% of the steps (at most 50), start-up excluded."""
        return self._rate(self._warm)

    def _on_failures(self, failures: List[WorkerFailure]) -> str:
        # Survivors of a lost peer see collective errors; the lost workers are the cause.
        primary = [f for f in failures if f.kind in ("process_exit", "node_lost", "hang")]
        shown = primary or failures
        self.failures.extend(shown)
        by_kind: Dict[str, List[WorkerFailure]] = collections.defaultdict(list)
        for f in shown:
            by_kind[f.kind].append(f)
        for kind, fs in by_kind.items():
            self.events.emit("failure_detected", kind=kind, ranks=[f.rank for f in fs],
                             pids=[f.pid for f in fs], generation=self.generation,
                             step=self.last_step, error=fs[0].error)
        desc = "; ".join(_describe(kind, fs) for kind, fs in by_kind.items())
        return self._fail(f"worker failure at step {self.last_step}: {desc}")

    def _fail(self, message: str) -> str:
        self.error = message
        self.phase = Phase.FAILED
        logger.error(message)
        return message

    def summary(self) -> Dict[str, Any]:
        wall = self.clock() - self.started_at
        return {
            "job": self.cfg.job.name,
            "status": "finished" if self.phase == Phase.DONE else "failed",
            "steps": self.last_step,
            "total_steps": self.cfg.train.steps,
            "final_loss": self.last_loss,
            "weights_digest": self.digest,
            "world_sizes": self.world_sizes,
            "generations": self.generation,
            "failures": len(self.failures),
            "recoveries": 0,
            "resumed_from_step": self.resume.step if self.resume else None,
            "checkpoints_committed": len(self.committer.committed) if self.committer else 0,
            "checkpoints_failed": len(self.committer.failed) if self.committer else 0,
            "steps_per_s": self.steady_steps_per_s(),
            "goodput": {"wall_s": round(wall, 3), "step_s": round(self.step_time_s, 3),
                        "ratio": round(self.step_time_s / wall, 4) if wall > 0 else None},
            "error": self.error,
        }
