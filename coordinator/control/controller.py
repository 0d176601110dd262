"""The job controller: a state machine you can step (phases and their data: control/state.py).

Each `step()` performs one transition, or one poll of the workers, and returns a `Transition`.
It never sleeps or waits: every `WorkerGroup` call returns within about a second (long waits are
begun by one call and polled by the next), so a preemption notice is acted on at the next step.
The caller paces the polls; tests drive it one step at a time with a fake group (tests/fakes.py).

It carries decisions out: *what* to decide comes from `failure_policy` and `scaling_policy`;
failures are recorded by `incidents`, steps by `accounting`; side concerns (progress events,
metrics, the auto interval, chaos) are observers on the `Bus`. A failure moves RUNNING to
RECOVERING: survivors leave their broken group, replacements are placed where capacity allows,
and FORMING re-forms the planned generation in place (survivors are not restarted).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from coordinator.events import Event
from coordinator.checkpoint.committer import log_resume
from coordinator.checkpoint.errors import StorageError
from coordinator.config import Config, memory_interval
from coordinator.control import failure_policy as fp
from coordinator.control import recovery_profile as profile
from coordinator.control import scaling_policy as sp
from coordinator.control.accounting import Progress, StepAccounting
from coordinator.control.incidents import Incidents
from coordinator.control.observers import Bus
from coordinator.control.summary import job_summary
from coordinator.control.state import (
    TERMINAL, Ended, Finalizing, Forming, JobRecord, Pausing, Phase, Recovering, Running,
    Starting, Transition,
)
from coordinator.protocol import (
    FailureKind, GroupError, PlanAction, PollResult, Source, SourceKind, StopMode, WorkerFailure,
    WorkerGroup,
)

logger = logging.getLogger(__name__)

Step = Tuple[str, Optional[Progress]]  # what a phase handler returns: (note, progress)
UNREADABLE_TRIES = 3  # listings of an unreadable checkpoint storage before the job fails


class Controller:
    def __init__(self, cfg: Config, group: WorkerGroup, bus: Bus,
                 capacity: Callable[..., int], committer=None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.group = group
        self.bus = bus
        self.capacity = capacity  # capacity(exclude=[node ids]) -> workers that fit now
        self.committer = committer  # coordinator.checkpoint.committer.Committer, or None
        self.clock = clock
        self._formed_at_step = 0  # the step the current generation formed at
        self.scaling = sp.ScalingPolicy(cfg.scaling.min_workers, cfg.scaling.max_workers,
                                        cfg.train.shard_group_size)
        self.job = JobRecord()
        self.steps = StepAccounting(cfg.train.steps)
        self.incidents = Incidents(cfg, group, bus, self.job, self.steps)
        self.state: Any = Starting()
        self.preempt_signal: Optional[str] = None  # set by the runner's signal handler
        self.started_at = clock()
        self._capacity_checked = -1e18  # when a running job last looked for capacity
        self._progress_t = self.started_at  # when a step last completed (or training began)

    # ---- the state machine ----------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def step(self) -> Transition:
        before = self.phase
        if self.done:
            return Transition(before, before, "terminal")
        if self.committer is not None:
            self.committer.poll()  # commits the storage finished meanwhile are announced
        handler = getattr(self, f"_{before.value}")
        note, progress = handler(self.state, self.clock())
        return Transition(before, self.phase, note, progress)

    def request_preempt(self, signal_name: str) -> None:
        """A scheduler's notice (SIGTERM, SIGUSR1): checkpoint at the next step, then stop."""
        if self.preempt_signal is None:
            self.preempt_signal = signal_name

    def _starting(self, st: Starting, now: float) -> Step:
        if self.preempt_signal is not None:
            return self._end(Phase.INTERRUPTED, "preempted before the workers started"), None
        if not st.world_size:
            note = self._place_initial(st, now)
            if note:
                return note, None
        ready = self.group.collect_ready()
        if ready < st.world_size:
            if self.group.pending() == ready \
                    or now - st.placed_at >= self.cfg.failure.wait_for_workers_s:
                self.group.drop_newcomers()
                return self._end(Phase.FAILED, (
                    f"only {ready} of {st.world_size} workers started within "
                    f"failure.wait_for_workers_s={self.cfg.failure.wait_for_workers_s:g}s")), None
            return f"starting {st.world_size} workers ({ready} ready)", None
        for info in self.group.assign({}, list(range(st.world_size))):
            self._worker_started(info)
        self.job.startup.update(placed=st.placed_at, ready=now)
        self.job.world_size = st.world_size
        self._enter_forming(st.plan, "start")
        return f"started {st.world_size} workers", None

    def _place_initial(self, st: Starting, now: float) -> str:
        """Size the first generation from capacity and place its workers. Returns a note while
        it cannot."""
        exclude = self.incidents.isolation.isolated
        cap = self.capacity(exclude=exclude)
        decision = self.scaling.initial(cap)
        if decision.world_size is None:
            wait_s = self.cfg.failure.wait_for_workers_s
            if st.waiting_since is None:
                st.waiting_since = now
                self._capacity_wait(decision.reason)
            if now - st.waiting_since >= wait_s:
                return self._end(Phase.FAILED, (
                    f"not enough capacity: {decision.reason}; waited "
                    f"{now - st.waiting_since:.0f}s (failure.wait_for_workers_s={wait_s:g}); "
                    "lower scaling.min_workers or scaling.cpus_per_worker, or add nodes"))
            return "waiting for capacity"
        n = decision.world_size
        if now < st.read_again_at:
            return "waiting to read the checkpoint storage again"
        st.plan = fp.Plan(PlanAction.REFORM, "initial", world_size=n)
        try:
            self._resume(st.plan)
        except StorageError as e:
            return self._unreadable(st, e, now)
        logger.info(decision.reason)
        # Spares start once training runs (_grow): before, they would only compete for CPU with
        # the members' own start-up and the first generation's formation.
        placed = self.group.spawn(n, exclude=exclude)
        if placed < n:
            self.group.drop_newcomers()
            return self._end(Phase.FAILED, f"could not place {n} workers: only {placed} placed "
                                           f"({self.group.capacity_note(exclude)})")
        st.world_size, st.placed_at = n, now
        return ""

    def _resume(self, plan: fp.Plan) -> None:
        """A rerun of the same command resumes: a committed checkpoint beats the initial state."""
        if self.committer is None:
            return
        self.job.resume = info = self.committer.resolve_resume()
        if info is not None:
            self.steps.resume_at(info.step)
            plan.source, plan.resumed_step = SourceKind.CHECKPOINT, info.step
            log_resume(info, self.cfg.train.steps)

    def _unreadable(self, st, e: StorageError, now: float) -> str:
        """The checkpoint storage could not be listed (`st`: Starting or Recovering). Neither
        resuming nor starting over is safe without knowing what is there: try again after
        1 s, 2 s, ..., and fail the job after UNREADABLE_TRIES."""
        st.unreadable += 1
        self.committer.restore_failed(None, e.words)
        if st.unreadable >= UNREADABLE_TRIES:
            return self._end(Phase.FAILED, (
                f"cannot read checkpoint.uri={self.cfg.checkpoint.uri} ({st.unreadable} tries): "
                f"{e.words}; rerun the same command once it is readable"))
        st.read_again_at = now + 2.0 ** (st.unreadable - 1)
        return "checkpoint storage unreadable: trying again"

    def _enter_forming(self, plan: fp.Plan, cause: str, rec: Optional[Recovering] = None,
                       checkpoint=None) -> None:
        """Enter FORMING with `plan`; `checkpoint` is what a recovery restores."""
        source = Source(plan.source, src=plan.src, senders=list(plan.senders), gather=(
            plan.source == SourceKind.PEER and self.cfg.train.parallelism != "ddp"))
        if plan.source == SourceKind.MEMORY:  # the newest snapshots the survivors hold
            source.generation, source.step = plan.memory_generation, plan.resumed_step
            source.holders = dict(plan.holders)
        if plan.source == SourceKind.CHECKPOINT:
            source.path = (checkpoint or self.job.resume).path
        self.state = Forming(plan, source, cause, rec)

    def _worker_started(self, info) -> None:
        self.bus.emit(Event.WORKER_START, rank=info.rank, pid=info.pid, node_id=info.node_id,
                      host=info.host, generation=self.job.generation + 1)

    def _forming(self, st: Forming, now: float) -> Step:
        plan, rec, job = st.plan, st.recovery, self.job
        if self.preempt_signal is not None:  # no formed group to checkpoint: the last commit stands
            self.group.abort_form()
            return self._end(Phase.INTERRUPTED, (
                f"{self.preempt_signal} received while forming a generation at step "
                f"{self.steps.last_step}: stopping without a new checkpoint")), None
        if rec is not None and now < rec.not_before:
            return "backing off", None
        if not st.began:
            st.began, st.began_at = True, now
            job.generation += 1
            self.bus.emit(Event.GROUP_FORMING, generation=job.generation,
                          world_size=plan.world_size, source=plan.source, cause=st.cause)
            self.group.begin_form(job.generation, st.source)
        failures = self.group.poll_form()
        if failures is None:
            return f"forming generation {job.generation}", None
        job.world_size = plan.world_size
        restore = [f for f in failures if f.kind == FailureKind.RESTORE_ERROR]
        if restore and self.committer is not None:
            self.committer.restore_failed(plan.resumed_step, restore[0].error)
        if failures:
            logger.warning("generation %d did not form", job.generation)
            mismatch = [f for f in failures if f.kind == FailureKind.TRANSFER_MISMATCH]
            if mismatch and all(f.kind in (FailureKind.TRANSFER_MISMATCH,
                                           FailureKind.COLLECTIVE_ERROR) for f in failures):
                self.state = self.incidents.transfer_mismatch(mismatch, now, rec)
                return "the state transfer failed its checksum", None
            return self._failure(failures, now, during="forming", carry=rec), None
        if self.committer is not None:
            self.committer.end_generation(job.generation - 1)
        job.world_sizes.append(plan.world_size)
        self._formed_at_step = plan.resumed_step  # this generation's snapshots come after it
        job.startup.setdefault("formed", now)
        self.steps.new_generation(plan.resumed_step)
        extra = {"buddies": {str(r): b for r, b in self.group.buddies.items()}} \
            if self.group.buddies else {}
        self.bus.emit(Event.GROUP_FORMED, generation=job.generation, world_size=plan.world_size,
                      ranks=self.group.ranks(), source=plan.source, step=plan.resumed_step,
                      restore_s=round(self.group.last_restore_s, 4), **extra)
        logger.info("generation %d formed: %d workers, state from %s at step %d",
                    job.generation, plan.world_size, plan.source, plan.resumed_step)
        if rec is not None:
            phases = profile.formed(rec.t0, rec.settled_at, rec.planned_at, now,
                                    self.group.last_join_parts)
            recovered = {"generation": job.generation, "world_size": plan.world_size,
                         "source": plan.source, "resumed_step": plan.resumed_step,
                         "lost_steps": max(0, rec.step_before - plan.resumed_step),
                         "last_step_t": rec.progress_t, "phases": phases,
                         # detection -> every survivor out of the failed group, step reported
                         "release_s": round(phases.get("settle_s", 0.0), 3),
                         "transfer_s": round(phases.get("transfer_s", 0.0), 3),
                         "transfer_bytes": self.group.last_transfer_bytes}
            if plan.resumed_step >= self.cfg.train.steps:  # lost at the end: no step follows
                self._recovered(dict(recovered, recovery_s=round(max(0.0, now - rec.t0), 3),
                                     phases=profile.first_step(phases, now, now)))
            else:
                self.steps.expect_recovery(recovered, t0=rec.t0, formed_t=now)
        self._launch(now)
        return f"generation {job.generation} formed", None

    def _launch(self, now: float) -> None:
        self.group.launch(self.cfg.train.steps, skip=self.job.skipped)
        self.state, self._progress_t = Running(), now

    def _running(self, st: Running, now: float) -> Step:
        poll, failed = self._poll_training(now)
        if failed is not None:
            return failed, self.progress()
        finished = poll.finished
        if any(r.nonfinite for r in finished.values()) and not self.group.busy():
            self._absorb(self.group.poll())  # the last steps' reports
            return self._nonfinite_stop(now), self.progress()
        last = max((r.step for r in finished.values()), default=0)
        if finished and not self.group.busy() and not any(r.stopped for r in finished.values()) \
                and last >= self.cfg.train.steps:
            # The train calls returned: drain the last reports, which may postdate the heartbeat,
            # and let the observers see the last step (progress event, curves).
            self._absorb(self.group.poll())
            self.bus.tick(self.steps.snapshot(now, self.job.world_size, self.job.incidents,
                                              now - self.started_at))
            self.state = Finalizing()
            return f"all workers reached step {last}", self.progress()
        if self.preempt_signal is not None:
            return self._begin_pause("preempt"), self.progress()
        self.bus.tick(self.steps.snapshot(now, self.job.world_size, self.job.incidents,
                                         now - self.started_at))
        return self._grow(now), self.progress()

    def _poll_training(self, now: float) -> Tuple[PollResult, Optional[str]]:
        """One poll of a training group: absorb what it reports; lost, hung or failed workers
        start a recovery. Returns (poll, the failure's note or None)."""
        poll, step = self.group.poll(), self.steps.last_step
        self._absorb(poll)
        if self.steps.last_step != step:
            self._progress_t = now
        failures = poll.failures or self.incidents.kill_hung(poll, now - self._progress_t)
        if not failures:
            return poll, None
        # A poll waits up to a second for heartbeats (a frozen worker never answers): what it
        # found was found when it returned, not when this step began.
        return poll, self._failure(failures, max(now, self.clock()))

    def _begin_pause(self, reason: str) -> str:
        if reason == "preempt":
            self.bus.emit(Event.FAILURE_DETECTED, kind=FailureKind.PREEMPT, ranks=[], pids=[],
                          generation=self.job.generation, step=self.steps.last_step,
                          error=f"{self.preempt_signal} received",
                          last_step_t=self.steps.last_step_t)
            logger.warning("%s received: taking an emergency checkpoint, then stopping",
                           self.preempt_signal)
            self.group.request_stop(StopMode.CHECKPOINT)
        else:
            self.bus.emit(Event.PAUSING, reason=reason, step=self.steps.last_step)
            self.group.request_stop(StopMode.PAUSE)
        self.state = Pausing(reason)
        return f"pausing ({reason})"

    def _pausing(self, st: Pausing, now: float) -> Step:
        poll, failed = self._poll_training(now)
        if failed is not None:
            return failed, self.progress()
        st.nonfinite |= any(r.nonfinite for r in poll.finished.values())
        if self.preempt_signal is not None and st.reason != "preempt":
            st.reason = "preempt"  # a notice during a grow pause: checkpoint first
            self.group.request_stop(StopMode.CHECKPOINT)
        if self.group.busy():
            return "", self.progress()
        # Every train call returned at the same step. Drain the reports (the emergency
        # checkpoint's among them) before deciding.
        self._absorb(self.group.poll())
        if st.reason == "preempt":
            return self._end(Phase.INTERRUPTED, f"stopped at step {self.steps.last_step} on "
                                                f"{self.preempt_signal}"), self.progress()
        if st.nonfinite:  # the group stopped on non-finite steps before the pause took effect
            return self._nonfinite_stop(now), self.progress()
        if self.steps.last_step >= self.cfg.train.steps:
            self.state = Finalizing()
            return "finished while pausing", self.progress()
        ready = self.group.collect_ready()
        plan = fp.grow_plan(self.job.world_size, ready, self.cfg.scaling.max_workers,
                            self.steps.last_step, self.cfg.train.shard_group_size)
        if plan.world_size <= self.job.world_size:  # the newcomers vanished: carry on
            self._launch(now)
            return "no newcomer ready: resuming", self.progress()
        every = memory_interval(self.cfg)
        if every and self.steps.last_step % every == 0 \
                and self.steps.last_step > self._formed_at_step:
            # Every member snapshotted the step it paused at: the new shards are cut from
            # those (no rank gathers the whole model), each member its own shard's holder.
            plan.source, plan.memory_generation = SourceKind.MEMORY, self.job.generation
            plan.holders = fp.own_holders(self.job.world_size, self.cfg.train.shard_group_size)
            plan.reason += " (shards from the members' snapshots)"
        for info in self.group.assign(plan.ranks, plan.newcomers):
            self._worker_started(info)
        logger.info("%s at step %d", plan.reason, self.steps.last_step)
        self._enter_forming(plan, "grow")
        return plan.reason, self.progress()

    def _grow(self, now: float) -> str:
        """Look for capacity to grow into (or for spares) every scaling.grow_check_s; not
        before a recovered generation's first step (the recovery's time): a worker starting
        meanwhile (importing torch, building its model) takes the CPU that step needs."""
        if self.steps.awaiting_recovery:
            return ""
        sc = self.cfg.scaling
        ready = self.group.collect_ready()
        due = now - self._capacity_checked >= sc.grow_check_s
        g = sp.growth(self.job.world_size, sc.max_workers, sc.grow, sc.spare_workers, ready,
                      self.group.pending() - ready, self.group.pending(), due,
                      self.cfg.train.shard_group_size)
        if g.pause:  # all of them at once: one pause, not one per newcomer
            logger.info("%d new worker(s) ready: growing at the next step boundary", ready)
            return self._begin_pause("grow")
        if due:
            self._capacity_checked = now
        n = self._spawn_up_to(g.spawn)
        if not n:
            return ""
        if g.spares:
            logger.info("starting %d spare worker(s) (scaling.spare_workers=%d)", n,
                        sc.spare_workers)
            return f"starting {n} spares"
        logger.info("capacity for %d more worker(s): starting them", n)
        return f"starting {n} newcomers"

    def _spawn_up_to(self, want: int) -> int:
        """Start up to `want` newcomers, as many as capacity allows now."""
        if want <= 0:
            return 0
        cap = self.capacity(exclude=self.incidents.isolation.isolated)
        return self.group.spawn(min(want, cap), exclude=self.incidents.isolation.isolated) if cap else 0

    # ---- non-finite steps (failure.nonfinite) ---------------------------------------------
    def _nonfinite_seen(self, step: int) -> None:
        """Step `step` was found non-finite and skipped on every rank."""
        job, fc = self.job, self.cfg.failure
        job.skipped.add(step)
        if job.nonfinite_run and job.nonfinite_run[-1] != step - 1:
            job.nonfinite_run = []
        job.nonfinite_run.append(step)
        streak = len(job.nonfinite_run)
        action = {"skip": "skip", "stop": "stop"}.get(fc.nonfinite) or (
            "rollback" if streak >= fc.nonfinite_limit else "skip")
        self.bus.emit(Event.NONFINITE_STEP, step=step, generation=job.generation,
                      streak=streak, action=action)
        if action == "skip":
            logger.warning("step %d: non-finite loss or gradient norm: no rank applied it "
                           "(%d in a row; failure.nonfinite=%s%s)", step, streak, fc.nonfinite,
                           f", rolls back at {fc.nonfinite_limit}" if fc.nonfinite == "rollback"
                           else "")

    def _nonfinite_stop(self, now: float) -> str:
        """The workers stopped on non-finite steps (failure.nonfinite: stop, or rollback with
        failure.nonfinite_limit reached): end the job, or restore the last committed checkpoint
        (init without one) with the same members and replay, skipping every non-finite step."""
        job, fc = self.job, self.cfg.failure
        run = list(job.nonfinite_run) or [self.steps.last_step]
        span = f"step {run[0]}" if len(run) == 1 else f"steps {run[0]}-{run[-1]}"
        latest = self.committer.latest_step() if self.committer is not None else None
        if fc.nonfinite == "stop":
            kept = (f"the last committed checkpoint is step {latest}" if latest is not None
                    else "no checkpoint was committed")
            return self._end(Phase.FAILED, (
                f"{span}: non-finite loss or gradient norm (failure.nonfinite=stop): the step "
                f"was not applied and {kept}; set failure.nonfinite=skip or rollback to train "
                "past it"))
        job.nonfinite_run = []
        ranks = self.group.ranks()
        # One failure of the job, not of a worker: every rank saw the same non-finite steps.
        why = f"{len(run)} non-finite step{'s' if len(run) > 1 else ''} in a row ({span})"
        job.failures.append(WorkerFailure(-1, FailureKind.NONFINITE, None, why))
        job.incidents += 1
        self.bus.emit(Event.FAILURE_DETECTED, kind=FailureKind.NONFINITE, ranks=ranks,
                      pids=[self.group.pid(r) for r in ranks], generation=job.generation,
                      step=self.steps.last_step, error=why, last_step_t=self.steps.last_step_t)
        if job.incidents > fc.max_failures:
            return self._end(Phase.FAILED, (
                f"cannot recover: failure budget spent: {job.incidents} failures > "
                f"failure.max_failures={fc.max_failures} ({span} non-finite)"))
        job.rollbacks += 1
        checkpoint = self.committer.resolve_resume() if self.committer is not None else None
        plan = fp.Plan(PlanAction.REFORM, "", world_size=job.world_size,
                       ranks={r: r for r in ranks})
        if checkpoint is not None:
            plan.source, plan.resumed_step = SourceKind.CHECKPOINT, checkpoint.step
            plan.reason = f"rolling back to checkpoint step {checkpoint.step}"
        else:
            plan.reason = "rolling back to step 0 (no committed checkpoint)"
        plan.reason += f"; {span} will be skipped when replayed"
        logger.warning("%s: non-finite loss or gradient norm, %s (failure.nonfinite_limit=%d): "
                       "%s (failure %d of failure.max_failures=%d)", span, why.split(" (")[0],
                       fc.nonfinite_limit, plan.reason, job.incidents, fc.max_failures)
        rec = Recovering(now, job.world_size, step_before=self.steps.last_step)
        self.group.assign(plan.ranks, [])
        self._enter_forming(plan, "rollback", rec, checkpoint)
        return plan.reason

    # ---- failures and recovery ------------------------------------------------------------
    def _failure(self, failures: List[WorkerFailure], now: float, during: str = "training",
                 carry: Optional[Recovering] = None) -> str:
        """A user-code error fails the job; anything else starts a recovery (or joins the one in
        progress). `carry`: a recovery this failure cut short (see Incidents.record)."""
        current = self.state if isinstance(self.state, Recovering) else None
        rec, note = self.incidents.record(failures, now, current, during, carry)
        if rec is None:
            self._last_reports()
            return self._end(Phase.FAILED, note)
        self.state = rec
        return note

    def _recovering(self, rec: Recovering, now: float) -> Step:
        if self.preempt_signal is not None:  # no whole group to checkpoint: the last commit stands
            return self._end(Phase.INTERRUPTED, (
                f"{self.preempt_signal} received while recovering at step "
                f"{self.steps.last_step}: stopping without a new checkpoint")), None
        # Until the survivors have left the failed group, a poll only looks for more losses and
        # returned train calls: heartbeats are not awaited (a survivor tearing its group down
        # answers late), settling asks every survivor for a current one.
        poll = self.group.poll(wait_s=None if rec.settled else 0.0)
        self._absorb(poll)
        more = [f for f in poll.failures if f.kind.lost or f.kind == FailureKind.TASK_ERROR]
        if more:
            self._failure(more, now)
            if self.done:
                return self.state.error, None
        if not rec.settled:
            note = self.incidents.settle(rec, now, self._absorb)
            if note:
                return note, None
        cfg = self.cfg
        need = sp.replacements(rec.world_size, len(rec.survivors), self.group.pending(),
                               cfg.scaling.min_workers, cfg.scaling.max_workers,
                               cfg.failure.replace)
        if need.needed and (rec.spawned_at is None or now - rec.spawned_at >= 1.0) \
                and self._spawn_up_to(need.want):
            rec.spawned_at = now
        if sp.await_freed_slot(need.needed, need.want, rec.lost_on_live_node,
                               rec.spawned_at is not None, now - rec.t0):
            return "waiting for the lost workers' slots to be freed", None
        ready = self.group.collect_ready()
        starting = self.group.pending() - ready
        if starting and rec.spawned_at is None:
            rec.spawned_at = now  # started before the failure (growth, spares): wait for them too
        if starting and need.needed and now - rec.spawned_at < cfg.failure.replace_timeout_s:
            return f"waiting for {starting} replacement(s) to start", None
        ckpt = self.committer.latest_step() if self.committer is not None else None
        plan = fp.decide(self.incidents.facts(rec, ready, now, ckpt))
        if plan.action == PlanAction.ABORT:
            return self._end(Phase.FAILED, f"cannot recover: {plan.reason}"), None
        if plan.action == PlanAction.WAIT:
            if rec.wait_since is None:
                rec.wait_since = now
                self._capacity_wait(plan.reason)
            return "waiting for capacity", None
        checkpoint = None
        if plan.source == SourceKind.CHECKPOINT:
            if now < rec.read_again_at:
                return "waiting to read the checkpoint storage again", None
            try:
                checkpoint = self.committer.resolve_resume()  # reads and verifies it
            except StorageError as e:
                return self._unreadable(rec, e, now), None
            if checkpoint is None:
                logger.error("no readable committed checkpoint: starting over from step 0")
                plan.source, plan.resumed_step = SourceKind.INIT, 0
            else:
                plan.resumed_step = checkpoint.step
        # survivors the new world has no room for (HSDP's whole shard groups) stay, idle
        idle = [r for r in rec.survivors if r not in plan.ranks]
        for info in self.group.assign(plan.ranks, plan.newcomers, spares=idle):
            self._worker_started(info)
        if idle:
            logger.info("ranks %s stay as idle spares (no room in a world of %d)", idle,
                        plan.world_size)
        rec.not_before = now + plan.backoff_s
        if plan.backoff_s:
            logger.warning("failure %d in a row without progress: waiting %.1fs before "
                           "re-forming (failure.backoff_s=%g)", self.job.streak, plan.backoff_s,
                           cfg.failure.backoff_s)
        logger.info("recovery plan: %s", plan.reason)
        rec.planned_at = now
        self._enter_forming(plan, "recovery", rec, checkpoint)
        return plan.reason, None

    def _capacity_wait(self, reason: str) -> None:
        logger.warning("waiting for capacity: %s (up to failure.wait_for_workers_s=%gs)", reason,
                       self.cfg.failure.wait_for_workers_s)
        self.bus.emit(Event.CAPACITY_WAIT, reason=reason, step=self.steps.last_step)

    # ---- what the workers report ----------------------------------------------------------
    def _last_reports(self) -> None:
        """Before the job fails: the steps and saves the others reported after the failing one
        (a step every rank completed counts, though its report came after the error)."""
        try:
            self._absorb(self.group.poll(fresh=True))
        except Exception as e:  # the job is failing already: its error is the one reported
            logger.debug("last reports before failing not taken: %s", e)

    def _absorb(self, poll: PollResult) -> None:
        for rank, hb in poll.heartbeats.items():
            pid = self.group.pid(rank)
            if hb.peak_rss_bytes and pid is not None:
                self.job.peak_rss[pid] = max(self.job.peak_rss.get(pid, 0), hb.peak_rss_bytes)
            for rep in hb.reports:
                done = self.steps.add(rep, self.job.world_size)
                if done is None:
                    continue
                self.job.streak = 0
                if done.nonfinite:
                    self._nonfinite_seen(done.step)
                elif not rep.skipped:
                    self.job.nonfinite_run = []
                if done.recovered is not None:
                    self._recovered(done.recovered)
                if done.eval is not None:
                    self.bus.emit(Event.EVAL, step=done.step, loss=done.eval["loss"],
                                  samples=self.cfg.train.eval_samples,
                                  world_size=self.job.world_size, eval_s=done.eval["eval_s"])
            for save in hb.saves:
                if self.committer is not None:
                    self.committer.on_save(save)  # commits are announced on the bus
            self.steps.saw(hb.step)
            self.job.memory_snapshot_bytes = max(self.job.memory_snapshot_bytes,
                                                 hb.memory_bytes)

    def _recovered(self, rec: Dict[str, Any]) -> None:
        self.job.recoveries.append(rec)
        self.bus.emit(Event.RECOVERED, **rec)
        logger.warning("recovered: generation %d, %d workers, state from %s at step %d, "
                       "%d steps lost, %.2fs from detection to this step", rec["generation"],
                       rec["world_size"], rec["source"], rec["resumed_step"], rec["lost_steps"],
                       rec["recovery_s"])

    def progress(self) -> Progress:
        return self.steps.progress(self.job.world_size)

    # ---- endings --------------------------------------------------------------------------
    def _finalizing(self, st: Finalizing, now: float) -> Step:
        if not st.began:
            st.began = True
            self.group.begin_digest()
        try:
            digest, failures = self.group.poll_digest()
        except GroupError as e:
            return self._end(Phase.FAILED, str(e)), None
        if failures:  # a worker lost at the very end: recover, then take the digest again
            return self._failure(failures, now, during="the final digest"), None
        if digest is None:
            return "taking the weights digest", None
        self.job.digest = digest
        self.state = Ended(Phase.DONE)
        return "done", self.progress()

    def _end(self, phase: Phase, message: str) -> str:
        self.state = Ended(phase, message)
        (logger.warning if phase == Phase.INTERRUPTED else logger.error)(message)
        return message

    @property
    def error(self) -> Optional[str]:
        return getattr(self.state, "error", None)

    def summary(self) -> Dict[str, Any]:
        """summary.json's fields (the runner adds goodput)."""
        return job_summary(self.cfg, self.job, self.steps, self.committer,
                           self.incidents.isolation.isolated, self.phase, self.error,
                           self.clock() - self.started_at, self.bus.summary())
