"""The job controller: a state machine you can step.

    STARTING -> FORMING -> RUNNING -> FINALIZING -> DONE
                  ^  |       |  \
                  |  v       v   PAUSING (grow at a step boundary, or preempt) -> INTERRUPTED
                RECOVERING <-+
    (any phase) -> FAILED

Each `step()` performs one transition (or one poll of the workers) and returns a `Transition`
saying what happened. The controller gathers facts and carries out decisions; *what* to decide
comes from the policies (`failure_policy`, `scaling_policy`). It never sleeps: the caller paces the
polls, so tests can drive it one iteration at a time with a fake `WorkerGroup`.

A failure (a lost process or node, a hang, a collective error) moves RUNNING to RECOVERING: the
survivors' train calls return (their broken group is torn down), replacements are placed where
capacity allows, the failure policy plans the next generation, and FORMING re-forms it in place:
survivors are not restarted. The `recovered` event is written when the new generation completes
its first step.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

from coordinator import failure_policy
from coordinator.chaos import ChaosPlan
from coordinator.checkpoint import storage
from coordinator.checkpoint.committer import Committer
from coordinator.checkpoint.interval import AutoInterval, AutoSchedule
from coordinator.checkpoint.manifest import CheckpointInfo
from coordinator.config import Config, ChaosEvent
from coordinator.events import EventLog
from coordinator.failure_policy import Facts, NodeIsolation, Plan
from coordinator.scaling_policy import ScalingPolicy
from coordinator.protocol import PollResult, Source, WorkerFailure, WorkerGroup
from coordinator.protocol import StopMode
from coordinator.workers.worker_group import CapacityError
STOP_CHECKPOINT, STOP_PAUSE = StopMode.CHECKPOINT, StopMode.PAUSE

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    STARTING = "starting"
    FORMING = "forming"
    RUNNING = "running"
    PAUSING = "pausing"
    RECOVERING = "recovering"
    FINALIZING = "finalizing"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


TERMINAL = (Phase.DONE, Phase.FAILED, Phase.INTERRUPTED)
LOST_KINDS = ("process_exit", "node_lost", "hang")
FSDP_SETTLE_S = 2.0  # how long FSDP2 survivors get to leave a failed group (see _recover)


@dataclass
class Hooks:
    """What the controller may do to the cluster beyond its workers (chaos and signals)."""
    remove_node: Callable[[str], bool] = lambda node_id: False  # a simulated node, by id
    add_node: Callable[[], None] = lambda: None
    preempt: Callable[[], None] = lambda: None  # signal the driver as a scheduler would


@dataclass
class Recovery:
    """One recovery in progress (from detection to the first step of the new generation)."""
    t0: float  # when the failure was detected
    world_size: int
    lost: Set[int] = field(default_factory=set)
    nodes_hit: Set[str] = field(default_factory=set)  # nodes counted toward isolation
    unexplained: List[WorkerFailure] = field(default_factory=list)  # errors without a lost worker
    step_before: int = 0  # the highest step any rank completed before the failure
    settled: bool = False
    survivors: Dict[int, int] = field(default_factory=dict)  # rank -> completed step
    spawned_at: Optional[float] = None
    wait_since: Optional[float] = None
    not_before: float = 0.0  # backoff
    progress_t: Optional[float] = None  # when the last step of any survivor completed


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
                 capacity: Callable[..., int], committer: Optional[Committer] = None,
                 clock: Callable[[], float] = time.time, hooks: Optional[Hooks] = None,
                 metrics: Optional[Any] = None):
        self.cfg = cfg
        self.group = group
        self.events = events
        self.capacity = capacity  # capacity(exclude=[node ids]) -> workers that fit now
        self.clock = clock
        self.hooks = hooks or Hooks()
        self.policy = ScalingPolicy(cfg.scaling.min_workers, cfg.scaling.max_workers)
        self.isolation = NodeIsolation(cfg.failure.node_failure_limit)
        self.chaos = ChaosPlan(cfg.chaos, cfg.train.steps, cfg.scaling.max_workers)
        self.committer = committer
        self.resume: Optional[CheckpointInfo] = None  # the checkpoint this run started from
        self.phase = Phase.STARTING
        self.generation = 0
        self.world_size = 0
        self.world_sizes: List[int] = []
        self.failures: List[WorkerFailure] = []
        self.incidents = 0  # failures counted against failure.max_failures
        self.recoveries: List[Dict[str, Any]] = []
        self._streak = 0  # failures without a completed step in between
        self.error: Optional[str] = None
        self.digest: Optional[str] = None
        self.started_at = clock()
        self.preempt_signal: Optional[str] = None  # set by the runner's signal handler
        self._waiting_since: Optional[float] = None
        self._plan: Optional[Plan] = None  # the generation FORMING will form
        self._rec: Optional[Recovery] = None
        self._rec_checkpoint: Optional[CheckpointInfo] = None  # what a recovery restores
        self._awaiting_recovered: Optional[Dict[str, Any]] = None
        self._pause_reason: Optional[str] = None  # grow | preempt
        self._last_grow_check = -1e18
        self._max_step_seen = 0
        # Per-step loss aggregation: step -> [sum of weighted losses, ranks reported, max t, max dur]
        self._pending: Dict[int, List[float]] = {}
        self.last_step = 0
        self.last_loss: Optional[float] = None
        self.step_time_s = 0.0  # sum over steps of the slowest rank's step time
        self._recent = collections.deque(maxlen=50)  # (step, t) of completed steps, for the rate
        self._durations = collections.deque(maxlen=50)  # the slowest rank's recent step times
        self._warm: Optional[tuple] = None  # (step, t) where the steady-state window starts
        self.warmup_steps = max(1, min(cfg.train.steps // 10, 50))
        # worker-seconds of the job since its first step, recoveries included (workers can fail
        # then too): the exposure behind the observed failure rate of the auto interval
        self.exposure_worker_s = 0.0
        self.metrics = metrics  # coordinator.metrics.JobMetrics, or None outside Ray
        self._progress_event_t = -1e18
        self._progress_event_step = -1
        self.auto = AutoSchedule(AutoInterval(cfg.failure.expected_mtbf_s, cfg.train.steps,
                                              self.warmup_steps)) \
            if cfg.checkpoint.interval_steps == "auto" else None
        self._commits_seen = 0
        self._failed_seen = 0

    # ---- the state machine ----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def step(self) -> Transition:
        handler = {
            Phase.STARTING: self._start,
            Phase.FORMING: self._form,
            Phase.RUNNING: self._run,
            Phase.PAUSING: self._pause,
            Phase.RECOVERING: self._recover,
            Phase.FINALIZING: self._finalize,
        }.get(self.phase)
        if handler is None:
            return Transition(self.phase, self.phase, "terminal")
        before = self.phase
        note, progress = handler()
        return Transition(before, self.phase, note, progress)

    def request_preempt(self, signal_name: str) -> None:
        """A scheduler's notice (SIGTERM, SIGUSR1): checkpoint at the next step, then stop."""
        if self.preempt_signal is None:
            self.preempt_signal = signal_name

    def _start(self):
        if self.preempt_signal is not None:
            return self._interrupt("preempted before the workers started"), None
        cap = self.capacity(exclude=self.isolation.isolated)
        decision = self.policy.initial(cap)
        if decision.world_size is None:
            now = self.clock()
            if self._waiting_since is None:
                self._waiting_since = now
                logger.warning("waiting for capacity: %s (up to failure.wait_for_workers_s=%gs)",
                               decision.reason, self.cfg.failure.wait_for_workers_s)
                self.events.emit("capacity_wait", reason=decision.reason, step=self.last_step)
            if now - self._waiting_since >= self.cfg.failure.wait_for_workers_s:
                return self._fail(
                    f"not enough capacity: {decision.reason}; waited "
                    f"{now - self._waiting_since:.0f}s (failure.wait_for_workers_s="
                    f"{self.cfg.failure.wait_for_workers_s:g}); lower scaling.min_workers or "
                    f"scaling.cpus_per_worker, or add nodes"), None
            return "waiting for capacity", None
        plan = Plan("reform", "initial", world_size=decision.world_size, source="init")
        if self.committer is not None:
            # A rerun of the same command resumes: a committed checkpoint beats the initial state.
            self.resume = self.committer.resolve_resume()
            if self.resume is not None:
                self.last_step = self._max_step_seen = self.resume.step
                plan.source, plan.resumed_step = "checkpoint", self.resume.step
                logger.info("resuming from checkpoint step %d (%s, saved by %s workers)",
                            self.resume.step, self.resume.path, self.resume.world_size)
                if self.resume.step >= self.cfg.train.steps:
                    logger.warning("nothing left to train: the checkpoint is at step %d and "
                                   "train.steps=%d; raise train.steps to continue, or use "
                                   "another run.dir / checkpoint.uri to start afresh",
                                   self.resume.step, self.cfg.train.steps)
        logger.info(decision.reason)
        # Spares start with the others (where capacity is left), so they are ready early.
        spares = min(self.cfg.scaling.spare_workers, cap - decision.world_size)
        try:
            infos = self.group.start(decision.world_size, exclude=self.isolation.isolated,
                                     spares=spares)
        except CapacityError as e:
            return self._fail(str(e)), None
        for info in infos:
            self._worker_started(info)
        self.world_size = len(infos)
        if spares:
            logger.info("starting %d spare worker(s) (scaling.spare_workers=%d)", spares,
                        self.cfg.scaling.spare_workers)
        self._plan = plan
        self.phase = Phase.FORMING
        return f"started {len(infos)} workers", None

    def _worker_started(self, info) -> None:
        self.events.emit("worker_start", rank=info.rank, pid=info.pid, node_id=info.node_id,
                         host=info.host, generation=self.generation + 1)

    def _form(self):
        plan = self._plan
        assert plan is not None
        if self._rec is not None and self.clock() < self._rec.not_before:
            return "backing off", None
        self.generation += 1
        source = Source(plan.source, src=plan.src,
                        gather=plan.source == "peer" and self.cfg.train.parallelism == "fsdp")
        if plan.source == "checkpoint":
            info = self.resume if self._rec is None else self._rec_checkpoint
            source.path = info.path
        cause = "recovery" if self._rec is not None else (
            "start" if self.generation == 1 else "grow")
        self.events.emit("group_forming", generation=self.generation, world_size=plan.world_size,
                         source=plan.source, cause=cause)
        failures = self.group.form(self.generation, source)
        if failures:
            # A new failure: its recovery starts from the members this attempt had, under their
            # new ranks (the recovery in progress, if any, keeps its start time).
            logger.warning("generation %d did not form", self.generation)
            prev, self._rec = self._rec, None
            self.world_size = plan.world_size
            note = self._failure(failures, during="forming")
            if prev is not None and self._rec is not None:
                self._rec.t0 = prev.t0
                self._rec.step_before = max(self._rec.step_before, prev.step_before)
            return note, None
        if self.committer is not None:
            self.committer.end_generation(self.generation - 1)
        self.world_size = plan.world_size
        self._pending.clear()
        self.last_step = plan.resumed_step
        self.world_sizes.append(self.world_size)
        self.events.emit("group_formed", generation=self.generation, world_size=self.world_size,
                         ranks=self.group.ranks(), source=plan.source, step=plan.resumed_step,
                         restore_s=round(self.group.last_restore_s, 4))
        if self.auto is not None:
            self.auto.new_generation(plan.resumed_step if plan.source == "checkpoint" else None)
        logger.info("generation %d formed: %d workers, state from %s at step %d",
                    self.generation, self.world_size, plan.source, plan.resumed_step)
        if self._rec is not None:
            rec = self._rec
            self._awaiting_recovered = {
                "t0": rec.t0, "generation": self.generation, "world_size": self.world_size,
                "source": plan.source, "resumed_step": plan.resumed_step,
                "lost_steps": max(0, rec.step_before - plan.resumed_step),
                "last_step_t": rec.progress_t}
            self._rec = None
        self._plan = None
        self.group.launch(self.cfg.train.steps)
        self.phase = Phase.RUNNING
        return f"generation {self.generation} formed", None

    def _poll_training(self):
        """One poll of a training group: absorb what it reports; lost, hung or failed workers
        start a recovery. Returns (poll, the failure's note or None)."""
        poll = self.group.poll()
        self._absorb(poll)
        failures = poll.failures or self._kill_hung(poll)
        return poll, (self._failure(failures) if failures else None)

    def _run(self):
        poll, failed = self._poll_training()
        if failed is not None:
            return failed, self.progress()
        finished = poll.finished
        if finished and not self.group.busy() and not any(r.stopped for r in finished.values()) \
                and self.last_step_of(finished) >= self.cfg.train.steps:
            # The train calls returned: drain the last reports, which may postdate the heartbeat.
            self._absorb(self.group.poll())
            self.phase = Phase.FINALIZING
            return f"all workers reached step {self.last_step_of(finished)}", self.progress()
        if self.preempt_signal is not None:
            return self._begin_pause("preempt"), self.progress()
        for ev in self.chaos.due(self.last_step):
            self._inject(ev)
        self._progress_event()
        if self.auto is not None:
            self._auto_checkpoint()
        note = self._maybe_grow()
        return note, self.progress()

    @staticmethod
    def last_step_of(finished) -> int:
        return max(r.step for r in finished.values()) if finished else 0

    def _begin_pause(self, reason: str) -> str:
        self._pause_reason = reason
        if reason == "preempt":
            self.events.emit("failure_detected", kind="preempt", ranks=[], pids=[],
                             generation=self.generation, step=self.last_step,
                             error=f"{self.preempt_signal} received", last_step_t=self.last_step_t)
            logger.warning("%s received: taking an emergency checkpoint, then stopping",
                           self.preempt_signal)
            self.group.request_stop(STOP_CHECKPOINT)
        else:
            self.events.emit("pausing", reason=reason, step=self.last_step)
            self.group.request_stop(STOP_PAUSE)
        self.phase = Phase.PAUSING
        return f"pausing ({reason})"

    def _pause(self):
        _, failed = self._poll_training()
        if failed is not None:
            return failed, self.progress()
        if self.preempt_signal is not None and self._pause_reason != "preempt":
            self._pause_reason = "preempt"  # a notice during a grow pause: checkpoint first
            self.group.request_stop(STOP_CHECKPOINT)
        if self.group.busy():
            return "", self.progress()
        # Every train call returned at the same step. Drain the reports (the emergency
        # checkpoint's among them) before deciding.
        self._absorb(self.group.poll())
        if self._pause_reason == "preempt":
            return self._interrupt(f"stopped at step {self.last_step} on "
                                   f"{self.preempt_signal}"), self.progress()
        if self.last_step >= self.cfg.train.steps:
            self.phase = Phase.FINALIZING
            return "finished while pausing", self.progress()
        ready = self.group.collect_ready()
        plan = failure_policy.grow_plan(self.world_size, ready, self.cfg.scaling.max_workers,
                                        self.last_step)
        if plan.world_size <= self.world_size:  # the newcomers vanished: carry on as we were
            self.group.launch(self.cfg.train.steps)
            self.phase = Phase.RUNNING
            return "no newcomer ready: resuming", self.progress()
        for info in self.group.assign(plan.ranks, plan.newcomers):
            self._worker_started(info)
        logger.info("%s at step %d", plan.reason, self.last_step)
        self._plan = plan
        self.phase = Phase.FORMING
        return plan.reason, self.progress()

    def _maybe_grow(self) -> str:
        """Look for capacity every scaling.grow_check_s; start newcomers in the background and
        pause for them (at a step boundary) once they are ready. At max_workers, keep
        scaling.spare_workers started and idle instead."""
        if self.world_size >= self.cfg.scaling.max_workers or not self.cfg.scaling.grow:
            return self._keep_spares()
        ready = self.group.collect_ready()
        starting = self.group.pending() - ready
        if ready and not starting:  # all of them at once: one pause, not one per newcomer
            logger.info("%d new worker(s) ready: growing at the next step boundary", ready)
            return self._begin_pause("grow")
        now = self.clock()
        if now - self._last_grow_check < self.cfg.scaling.grow_check_s:
            return ""
        self._last_grow_check = now
        want = self.cfg.scaling.max_workers - self.world_size - self.group.pending()
        if want <= 0:
            return ""
        cap = self.capacity(exclude=self.isolation.isolated)
        n = self.group.spawn(min(want, cap), exclude=self.isolation.isolated) if cap else 0
        if n:
            logger.info("capacity for %d more worker(s): starting them", n)
            return f"starting {n} newcomers"
        return ""

    def _keep_spares(self) -> str:
        spares = self.cfg.scaling.spare_workers
        now = self.clock()
        if not spares or now - self._last_grow_check < self.cfg.scaling.grow_check_s:
            return ""
        self._last_grow_check = now
        self.group.collect_ready()
        want = spares - self.group.pending()
        cap = self.capacity(exclude=self.isolation.isolated) if want > 0 else 0
        n = self.group.spawn(min(want, cap), exclude=self.isolation.isolated) if cap else 0
        if n:
            logger.info("starting %d spare worker(s) (scaling.spare_workers=%d)", n, spares)
            return f"starting {n} spares"
        return ""

    # ---- failures and recovery ------------------------------------------------------------
    def _kill_hung(self, poll: PollResult) -> List[WorkerFailure]:
        hung = self._hung(poll.silent_s)
        for f in hung:
            logger.warning("worker %d (pid %s) has not answered a heartbeat for %.0fs while "
                           "its peers did (failure.hang_timeout_s=%g): killing it", f.rank,
                           f.pid, poll.silent_s[f.rank], self.cfg.failure.hang_timeout_s)
            self.group.kill(f.rank)
        return hung

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

    def _failure(self, failures: List[WorkerFailure], during: str = "training") -> str:
        """Record failures; a user-code error fails the job, anything else starts a recovery
        (or joins the one in progress)."""
        task_errors = [f for f in failures if f.kind == "task_error"]
        if task_errors:
            self._report(task_errors)
            return self._fail(f"worker failure at step {self.last_step}: "
                              f"{_describe('task_error', task_errors)}")
        new_incident = self._rec is None
        if new_incident:
            self.incidents += 1
            self._streak += 1
            self._rec = Recovery(self.clock(), self.world_size,
                                 step_before=max(self._max_step_seen, self.last_step))
        rec = self._rec
        lost = [f for f in failures if f.kind in LOST_KINDS and f.rank not in rec.lost]
        rec.lost.update(f.rank for f in lost)
        # A survivor's collective error is a consequence: its cause (a lost worker) usually shows
        # in the same poll or the next. Collective errors are reported only if, once the
        # survivors settle, no worker turned out lost.
        shown = lost
        if new_incident and not lost:
            rec.unexplained = list(failures)
        if shown:
            self._report(shown)
        for node in dict.fromkeys(self.group.node_of(f.rank) for f in lost):
            if node in rec.nodes_hit:
                continue  # one failure per node and incident, however many workers it held
            rec.nodes_hit.add(node)
            if self.isolation.record(node):
                logger.warning("node %s had %d worker failures (failure.node_failure_limit=%d): "
                               "this job no longer places workers on it", node,
                               self.isolation.counts[node], self.isolation.limit)
                self.events.emit("node_isolated", node_id=node, failures=self.isolation.counts[node])
        if rec.settled and lost:
            rec.settled = False  # a survivor died while we planned: look again
        self.phase = Phase.RECOVERING
        desc = "; ".join(_describe(k, fs) for k, fs in _by_kind(shown or failures).items())
        if new_incident:
            logger.warning("%s at step %d (%s); recovering (failure %d of "
                           "failure.max_failures=%d)", desc, self.last_step, during,
                           self.incidents, self.cfg.failure.max_failures)
        elif lost:
            logger.warning("%s while recovering; it is replaced in the same recovery", desc)
        return desc

    def _report(self, failures: List[WorkerFailure]) -> None:
        self.failures.extend(failures)
        for kind, fs in _by_kind(failures).items():
            self.events.emit("failure_detected", kind=kind, ranks=[f.rank for f in fs],
                             pids=[f.pid for f in fs], generation=self.generation,
                             step=self.last_step, error=fs[0].error,
                             last_step_t=self.last_step_t)
            if self.metrics is not None:
                self.metrics.failure(kind, len(fs))

    def _recover(self):
        rec = self._rec
        assert rec is not None
        now = self.clock()
        if self.preempt_signal is not None:  # no whole group to checkpoint: the last commit stands
            return self._interrupt(f"{self.preempt_signal} received while recovering at step "
                                   f"{self.last_step}: stopping without a new checkpoint"), None
        poll = self.group.poll()
        self._absorb(poll)
        more = [f for f in poll.failures if f.kind in LOST_KINDS + ("task_error",)]
        if more:
            self._failure(more)
            if self.phase == Phase.FAILED:
                return self.error, None
        if not rec.settled:
            busy = self.group.busy() - rec.lost
            if busy:
                # Survivors leave their broken collective within moments (their peers close
                # the group); one that does not within failure.hang_timeout_s is stuck: kill it.
                # Under FSDP2 a survivor's shards are discarded anyway (the group restores a
                # checkpoint), and gloo can keep an FSDP2 survivor waiting on queued collectives
                # of its peers until they exit: give it 2 s at most.
                grace = self.cfg.failure.hang_timeout_s
                if self.cfg.train.parallelism == "fsdp":
                    grace = min(grace, FSDP_SETTLE_S)
                if now - rec.t0 <= grace:
                    return "waiting for survivors to leave the failed group", None
                stuck = [WorkerFailure(r, "hang", self.group.pid(r),
                                       "still in the failed collective") for r in sorted(busy)]
                for f in stuck:
                    logger.warning("worker %d did not leave the failed group within %gs: "
                                   "killing it", f.rank, grace)
                    self.group.kill(f.rank)
                self._failure(stuck)
                return "killed stuck survivors", None
            fresh = self.group.poll(fresh=True)  # every survivor's final step
            self._absorb(fresh)
            lost_now = [f for f in fresh.failures if f.kind in LOST_KINDS]
            if lost_now:
                self._failure(lost_now)
                return "a survivor was lost while settling", None
            rec.survivors = {r: hb.step for r, hb in fresh.heartbeats.items()
                             if r not in rec.lost}
            missing = set(self.group.ranks()) - rec.lost - set(rec.survivors)
            if missing:  # no answer: treat as lost
                for r in sorted(missing):
                    self.group.kill(r)
                self._failure([WorkerFailure(r, "hang", self.group.pid(r), "no answer")
                               for r in sorted(missing)])
                return "survivors did not answer", None
            rec.settled = True
            # The last moment any survivor completed a step: the lost worker's own last reports
            # died with it, so failure_detected's last_step_t can be up to a poll earlier.
            rec.progress_t = max([self.last_step_t or 0.0]
                                 + [e[2] for e in self._pending.values()]) or None
            if not rec.lost and rec.unexplained:  # nobody was lost: the errors are the failure
                self._report(rec.unexplained)
                rec.unexplained = []
            self._max_step_seen = max([self._max_step_seen, *rec.survivors.values()])
        # Replacements: start as many as fit now, up to the size before the failure.
        target = min(self.cfg.scaling.max_workers, max(rec.world_size, self.cfg.scaling.min_workers))
        want = target - len(rec.survivors) - self.group.pending()
        needed = self.cfg.failure.replace or len(rec.survivors) < self.cfg.scaling.min_workers
        if needed and want > 0 \
                and (rec.spawned_at is None or now - rec.spawned_at >= 1.0):
            cap = self.capacity(exclude=self.isolation.isolated)
            if cap > 0 and self.group.spawn(min(want, cap), exclude=self.isolation.isolated):
                rec.spawned_at = now
        ready = self.group.collect_ready()
        starting = self.group.pending() - ready
        if starting and rec.spawned_at is None:
            rec.spawned_at = now  # started before the failure (growth, spares): wait for them too
        if starting and now - rec.spawned_at < self.cfg.failure.replace_timeout_s \
                and (self.cfg.failure.replace
                     or len(rec.survivors) < self.cfg.scaling.min_workers):
            return f"waiting for {starting} replacement(s) to start", None
        plan = failure_policy.decide(self._facts(rec, ready, now))
        if plan.action == "abort":
            return self._fail(f"cannot recover: {plan.reason}"), None
        if plan.action == "wait":
            if rec.wait_since is None:
                rec.wait_since = now
                logger.warning("waiting for capacity: %s (up to failure.wait_for_workers_s=%gs)",
                               plan.reason, self.cfg.failure.wait_for_workers_s)
                self.events.emit("capacity_wait", reason=plan.reason, step=self.last_step)
            return "waiting for capacity", None
        if plan.source == "checkpoint":
            self._rec_checkpoint = self.committer.resolve_resume()  # reads and verifies it
            if self._rec_checkpoint is None:
                logger.error("no readable committed checkpoint: starting over from step 0")
                plan.source, plan.resumed_step = "init", 0
            else:
                plan.resumed_step = self._rec_checkpoint.step
        for info in self.group.assign(plan.ranks, plan.newcomers):
            self._worker_started(info)
        rec.not_before = now + plan.backoff_s
        if plan.backoff_s:
            logger.warning("failure %d in a row without progress: waiting %.1fs before "
                           "re-forming (failure.backoff_s=%g)", self._streak, plan.backoff_s,
                           self.cfg.failure.backoff_s)
        logger.info("recovery plan: %s", plan.reason)
        self._plan = plan
        self.phase = Phase.FORMING
        return plan.reason, None

    def _facts(self, rec: Recovery, ready: int, now: float) -> Facts:
        ckpt = self.committer.latest_step() if self.committer is not None else None
        fc = self.cfg.failure
        return Facts(world_size=rec.world_size, survivors=dict(rec.survivors),
                     ready=ready,
                     min_workers=self.cfg.scaling.min_workers,
                     max_workers=self.cfg.scaling.max_workers,
                     parallelism=self.cfg.train.parallelism, checkpoint_step=ckpt,
                     failures=self.incidents, max_failures=fc.max_failures, streak=self._streak,
                     backoff_s=fc.backoff_s, backoff_max_s=fc.backoff_max_s,
                     waited_s=(now - rec.wait_since) if rec.wait_since is not None else 0.0,
                     wait_limit_s=fc.wait_for_workers_s)

    # ---- chaos ----------------------------------------------------------------------------
    def _inject(self, ev: ChaosEvent) -> None:
        ranks = self.group.ranks()
        rank = None
        if isinstance(ev.target, int) and ranks:
            rank = ev.target if ev.target in ranks else ranks[ev.target % len(ranks)]
        pid = self.group.pid(rank) if rank is not None else None
        logger.warning("chaos at step %d: %s%s", self.last_step, ev.action,
                       f" rank {rank} (pid {pid})" if rank is not None else "")
        self.events.emit("chaos", action=ev.action, rank=rank, pid=pid, step=self.last_step,
                         at_step=ev.at_step)
        if ev.action in ("kill_worker", "hang_worker", "kill_during_checkpoint"):
            self.group.chaos(rank, ev.action)
        elif ev.action == "kill_node":
            node = self.group.node_of(rank)
            if not self.hooks.remove_node(node):
                logger.warning("chaos: node %s is not a simulated node of this run: not removed",
                               node)
        elif ev.action == "add_node":
            for _ in range(int(ev.target or 1)):
                self.hooks.add_node()
        elif ev.action == "preempt":
            self.hooks.preempt()
        elif ev.action == "storage_outage":
            seconds = float(ev.target or 10.0)
            storage.inject_outage(seconds)  # the driver writes the manifests
            for r in ranks:
                self.group.chaos(r, "storage_outage", seconds)

    # ---- accounting -----------------------------------------------------------------------
    def _absorb(self, poll: PollResult) -> None:
        for hb in poll.heartbeats.values():
            for rep in hb.reports:
                self._account(rep.step, rep.weighted_loss, rep.t, rep.duration_s)
            for save in hb.saves:
                if self.committer is not None:
                    self.committer.on_save(save)
            self._max_step_seen = max(self._max_step_seen, hb.step)
        self._saves_settled()

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
        self._max_step_seen = max(self._max_step_seen, step)
        self._streak = 0
        self.step_time_s += entry[3]
        self._durations.append(entry[3])
        if self._recent and self._recent[-1][1] < entry[2] and step == self._recent[-1][0] + 1:
            self.exposure_worker_s += self.world_size * (entry[2] - self._recent[-1][1])
        self._recent.append((step, entry[2]))
        if self._warm is None and step >= self.warmup_steps:
            self._warm = (step, entry[2])
        if self._awaiting_recovered is not None:
            rec = self._awaiting_recovered
            self._awaiting_recovered = None
            rec["recovery_s"] = round(max(0.0, entry[2] - rec.pop("t0")), 3)
            self.recoveries.append(rec)
            self.events.emit("recovered", **rec)
            logger.warning("recovered: generation %d, %d workers, state from %s at step %d, "
                           "%d steps lost, %.2fs from detection to this step",
                           rec["generation"], rec["world_size"], rec["source"],
                           rec["resumed_step"], rec["lost_steps"], rec["recovery_s"])

    @property
    def last_step_t(self) -> Optional[float]:
        """Unix time the newest completed step ended (None before the first)."""
        return self._recent[-1][1] if self._recent else None

    def _progress_event(self) -> None:
        """A `progress` line in events.jsonl every run.log_interval_s while steps complete: the
        step-over-time curve of the report, and the last known step of a driver that crashed."""
        now = self.clock()
        if self.last_step == self._progress_event_step \
                or now - self._progress_event_t < self.cfg.run.log_interval_s:
            return
        self._progress_event_t, self._progress_event_step = now, self.last_step
        rate = self.progress().steps_per_s
        self.events.emit("progress", step=self.last_step, step_t=self.last_step_t,
                         world_size=self.world_size,
                         loss=None if self.last_loss is None else round(self.last_loss, 6),
                         steps_per_s=None if rate is None else round(rate, 3))
        if self.metrics is not None:
            wall = now - self.started_at
            self.metrics.progress(self.last_step, self.world_size, rate,
                                  self.step_time_s / wall if wall > 0 else None)

    # ---- checkpoint.interval_steps=auto ---------------------------------------------------
    def _auto_checkpoint(self) -> None:
        # seconds of training per step: recent step times, recoveries and polls left out
        step_s = sum(self._durations) / len(self._durations) if self._durations else None
        choice, ask = self.auto.tick(self.last_step, self.world_size, self.incidents,
                                     self.exposure_worker_s, step_s or None)
        if choice is not None:
            logger.info("checkpoint interval (auto): every %d steps: %s; %s MTBF per worker "
                        "(%d failure(s) in %.0f worker-s)", choice.interval_steps, choice.reason,
                        choice.mtbf_source, choice.failures, choice.exposure_worker_s)
            self.events.emit("checkpoint_interval", step=self.last_step, **choice.fields())
        if ask:
            self.group.request_checkpoint(self.auto.number)

    def _saves_settled(self) -> None:
        """Follow commits (and failed saves): the auto interval measures their stall, and its
        request in flight is answered."""
        if self.committer is None:
            return
        commits = self.committer.commits[self._commits_seen:]
        failed = self.committer.failed[self._failed_seen:]
        self._commits_seen += len(commits)
        self._failed_seen += len(failed)
        for step, stall, persist in commits:
            if self.auto is not None:
                self.auto.committed(step, stall, persist)
            if self.metrics is not None:
                self.metrics.checkpoint(stall, persist)
        if self.auto is not None and (commits or failed):
            self.auto.settled([s for s, _, _ in commits] + failed)

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

    # ---- endings --------------------------------------------------------------------------
    def _finalize(self):
        self.digest = self.group.final_digest()
        self.phase = Phase.DONE
        return "done", self.progress()

    def _interrupt(self, message: str) -> str:
        self.error = message
        self.phase = Phase.INTERRUPTED
        logger.warning(message)
        return message

    def _fail(self, message: str) -> str:
        self.error = message
        self.phase = Phase.FAILED
        logger.error(message)
        return message

    def summary(self) -> Dict[str, Any]:
        wall = self.clock() - self.started_at
        status = {Phase.DONE: "finished", Phase.INTERRUPTED: "interrupted"}.get(self.phase,
                                                                               "failed")
        return {
            "job": self.cfg.job.name,
            "status": status,
            "steps": self.last_step,
            "total_steps": self.cfg.train.steps,
            "final_loss": self.last_loss,
            "weights_digest": self.digest,
            "world_sizes": self.world_sizes,
            "generations": self.generation,
            "failures": len(self.failures),
            "recoveries": len(self.recoveries),
            "lost_steps": sum(r["lost_steps"] for r in self.recoveries),
            "resumed_from_step": self.resume.step if self.resume else None,
            "checkpoints_committed": len(self.committer.committed) if self.committer else 0,
            "checkpoints_failed": len(self.committer.failed) if self.committer else 0,
            "isolated_nodes": list(self.isolation.isolated),
            "steps_per_s": self.steady_steps_per_s(),
            "wall_s": round(wall, 3),
            "step_s": round(self.step_time_s, 3),  # time in steps (the slowest rank's, summed)
            "checkpoint_interval": self.auto.choice.fields() if self.auto and self.auto.choice
            else self.cfg.checkpoint.interval_steps,
            "error": self.error,
        }


def _by_kind(failures: List[WorkerFailure]) -> Dict[str, List[WorkerFailure]]:
    out: Dict[str, List[WorkerFailure]] = collections.defaultdict(list)
    for f in failures:
        out[f.kind].append(f)
    return dict(out)
