"""Failures as the job records them, and the survivors' side of a recovery.

An *incident* is a failure and everything lost with it until the next generation forms: one
`Recovering` state, counted once against `failure.max_failures`, each node it hit counted once
toward isolation, each kind reported once as `failure_detected` with the list of ranks. Workers
lost while a recovery is in progress join that incident. `settle` waits for the survivors to leave
the failed group and takes each one's final step, which is what the failure policy plans from.
A peer's state that fails its checksum while a generation forms (`transfer_mismatch`) is no lost
worker: the recovery goes on without that sender.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple

from coordinator.events import Event
from coordinator.config import Config, memory_interval
from coordinator.control import failure_policy as fp
from coordinator.control.accounting import StepAccounting
from coordinator.control.state import JobRecord, Recovering
from coordinator.protocol import FailureKind, PollResult, WorkerFailure, WorkerGroup

logger = logging.getLogger(__name__)


class Incidents:
    def __init__(self, cfg: Config, group: WorkerGroup, bus, job: JobRecord,
                 steps: StepAccounting):
        self.cfg, self.group, self.bus, self.job, self.steps = cfg, group, bus, job, steps
        self.isolation = fp.NodeIsolation(cfg.failure.node_failure_limit)

    def kill_hung(self, poll: PollResult, stalled_s: float) -> List[WorkerFailure]:
        """Workers silent past failure.hang_timeout_s while their peers answer, or all of them
        when none answers and no step completed for as long (`stalled_s`): killed."""
        limit, busy_limit = self.cfg.failure.hang_timeout_s, self.cfg.failure.busy_hang_timeout_s
        ranks = fp.hung(poll.silent_s, limit, poll.busy, busy_limit)
        why = "while its peers did"
        if not ranks:
            ranks = fp.all_frozen(poll.silent_s, stalled_s, limit, poll.busy, busy_limit)
            why = f"nor did any peer, and no step completed for {stalled_s:.0f}s"
        hung = [WorkerFailure(r, FailureKind.HANG, self.group.pid(r),
                              f"no heartbeat for {poll.silent_s[r]:.0f}s"
                              + (f" while {poll.busy[r]}" if poll.busy.get(r) else ""))
                for r in ranks]
        for f in hung:
            phase = poll.busy.get(f.rank)
            logger.warning("worker %d (pid %s) has not answered a heartbeat for %.0fs%s %s "
                           "(%s): killing it", f.rank, f.pid, poll.silent_s[f.rank],
                           f" while {phase}" if phase else "", why,
                           f"failure.busy_hang_timeout_s={busy_limit:g}" if phase
                           else f"failure.hang_timeout_s={limit:g}")
            self.group.kill(f.rank)
        return hung

    def record(self, failures: List[WorkerFailure], now: float, current: Optional[Recovering],
               during: str = "training", carry: Optional[Recovering] = None
               ) -> Tuple[Optional[Recovering], str]:
        """Record failures into the incident in progress (`current`) or a new one. Returns the
        incident and a description, or (None, the reason the job fails) for a user-code error.
        `carry`: a recovery cut short by this failure, whose start time and step the new
        incident keeps."""
        job, steps = self.job, self.steps
        task_errors = [f for f in failures if f.kind == FailureKind.TASK_ERROR]
        if task_errors:
            self.report(task_errors)
            return None, (f"worker failure at step {steps.last_step}: "
                          f"{fp.describe_all(task_errors)}")
        rec, new_incident = current, current is None
        if rec is None:
            job.incidents += 1
            job.streak += 1
            rec = Recovering(now, job.world_size,
                             step_before=max(steps.max_step_seen, steps.last_step))
            if carry is not None:
                rec.t0, rec.step_before = carry.t0, max(rec.step_before, carry.step_before)
                rec.bad_sources = set(carry.bad_sources)
        lost = [f for f in failures if f.kind.lost and f.rank not in rec.lost]
        rec.lost.update(f.rank for f in lost)
        rec.lost_on_live_node |= any(f.kind != FailureKind.NODE_LOST for f in lost)
        # A survivor's collective error is a consequence: its cause (a lost worker) usually shows
        # in the same poll or the next. Collective errors are reported only if, once the
        # survivors settle, no worker turned out lost.
        if new_incident and not lost:
            rec.unexplained = list(failures)
        if lost:
            self.report(lost)
        self._count_nodes(rec, lost)
        if rec.settled and lost:
            rec.settled = False  # a survivor died while we planned: look again
        desc = fp.describe_all(lost or failures)
        if new_incident:
            logger.warning("%s at step %d (%s); recovering (failure %d of "
                           "failure.max_failures=%d)", desc, steps.last_step, during,
                           job.incidents, self.cfg.failure.max_failures)
        elif lost:
            logger.warning("%s while recovering; it is replaced in the same recovery", desc)
        return rec, desc

    def transfer_mismatch(self, failures: List[WorkerFailure], now: float,
                          carry: Optional[Recovering]) -> Recovering:
        """A generation did not form because the state its source sent failed its checksum on
        some receiver (every member reports the same check; nobody applied the state). Emits one
        `state_transfer_mismatch` per receiver and returns the recovery to plan again, with the
        sender excluded: `carry`'s (the same incident, not counted again) or, after a grow, a new
        incident."""
        job, check = self.job, failures[0].transfer
        job.transfer_mismatches += 1
        for receiver, got in sorted(check.got.items()):
            self.bus.emit(Event.STATE_TRANSFER_MISMATCH, generation=job.generation,
                          source_rank=check.src, receiver_rank=receiver,
                          expected=f"{check.expected:08x}", got=f"{got:08x}")
        rec = Recovering(now, job.world_size,
                         step_before=max(self.steps.max_step_seen, self.steps.last_step))
        if carry is None:
            job.incidents += 1
            job.streak += 1
        else:
            rec.t0, rec.step_before = carry.t0, max(rec.step_before, carry.step_before)
            rec.bad_sources = set(carry.bad_sources)
        rec.bad_sources.add(self.group.pid(check.src))
        receivers = sorted(check.got)
        logger.warning(
            "generation %d: the state rank %d sent failed its checksum on %s %s (crc32 %08x "
            "sent, %s received): nobody applied it; taking the state from another source "
            "(state transfer mismatch %d of this job%s)", job.generation, check.src,
            "rank" if len(receivers) == 1 else "ranks",
            receivers[0] if len(receivers) == 1 else receivers, check.expected,
            ", ".join(f"{check.got[r]:08x}" for r in receivers), job.transfer_mismatches,
            "" if carry is not None else
            f"; failure {job.incidents} of failure.max_failures={self.cfg.failure.max_failures}")
        return rec

    def _count_nodes(self, rec: Recovering, lost: List[WorkerFailure]) -> None:
        for node in dict.fromkeys(self.group.node_of(f.rank) for f in lost):
            if node in rec.nodes_hit:
                continue  # one failure per node and incident, however many workers it held
            rec.nodes_hit.add(node)
            iso = self.isolation
            if iso.record(node):
                logger.warning("node %s had %d worker failures (failure.node_failure_limit=%d): "
                               "this job no longer places workers on it", node, iso.counts[node],
                               iso.limit)
                self.bus.emit(Event.NODE_ISOLATED, node_id=node, failures=iso.counts[node])

    def report(self, failures: List[WorkerFailure]) -> None:
        self.job.failures.extend(failures)
        for kind, fs in fp.by_kind(failures).items():
            self.bus.emit(Event.FAILURE_DETECTED, kind=kind, ranks=[f.rank for f in fs],
                          pids=[f.pid for f in fs], generation=self.job.generation,
                          step=self.steps.last_step, error=fs[0].error,
                          last_step_t=self.steps.last_step_t)

    def settle(self, rec: Recovering, now: float,
               absorb: Callable[[PollResult], None]) -> Optional[str]:
        """Wait for the survivors to leave the failed group, then take each one's final step.
        Returns a note while not settled, None once settled."""
        busy = self.group.busy() - rec.lost
        if busy:
            # Survivors still in the failed collective (one waits on a peer that waits on the
            # lost one, or on a frozen peer) are released in place: their group's connections
            # are shut down, their process stays. One still in it after the grace is stuck
            # (its process does not answer): kill it.
            if not rec.released:
                self.group.release(sorted(busy), self.job.generation)
                rec.released = True
            grace = fp.settle_grace_s(self.cfg.failure.hang_timeout_s)
            if now - rec.t0 <= grace:
                return "waiting for survivors to leave the failed group"
            stuck = [WorkerFailure(r, FailureKind.HANG, self.group.pid(r),
                                   "still in the failed collective") for r in sorted(busy)]
            for f in stuck:
                logger.warning("worker %d did not leave the failed group within %gs: "
                               "killing it", f.rank, grace)
                self.group.kill(f.rank)
            self.record(stuck, now, rec)
            return "killed stuck survivors"
        fresh = self.group.poll(fresh=True)  # every survivor's final step
        absorb(fresh)
        lost_now = [f for f in fresh.failures if f.kind.lost]
        if lost_now:
            self.record(lost_now, now, rec)
            return "a survivor was lost while settling"
        rec.survivors = {r: hb.step for r, hb in fresh.heartbeats.items() if r not in rec.lost}
        rec.memory = {r: (hb.memory_generation, hb.memory, hb.memory_world)
                      for r, hb in fresh.heartbeats.items() if r in rec.survivors}
        missing = set(self.group.ranks()) - rec.lost - set(rec.survivors)
        if missing:  # no answer: treat as lost
            for r in sorted(missing):
                self.group.kill(r)
            self.record([WorkerFailure(r, FailureKind.HANG, self.group.pid(r), "no answer")
                         for r in sorted(missing)], now, rec)
            return "survivors did not answer"
        rec.settled, rec.settled_at = True, now
        # The last moment any survivor completed a step: the lost worker's own last reports
        # died with it, so failure_detected's last_step_t can be up to a poll earlier.
        rec.progress_t = self.steps.newest_report_t()
        if not rec.lost and rec.unexplained:  # nobody was lost: the errors are the failure
            self.report(rec.unexplained)
            rec.unexplained = []
        for step in rec.survivors.values():
            self.steps.saw(step)
        return None

    def facts(self, rec: Recovering, ready: int, now: float,
              checkpoint_step: Optional[int]) -> fp.Facts:
        """What the failure policy decides from."""
        fc, sc = self.cfg.failure, self.cfg.scaling
        return fp.Facts(world_size=rec.world_size, survivors=dict(rec.survivors), ready=ready,
                        min_workers=sc.min_workers, max_workers=sc.max_workers,
                        parallelism=self.cfg.train.parallelism, checkpoint_step=checkpoint_step,
                        failures=self.job.incidents, max_failures=fc.max_failures,
                        streak=self.job.streak, backoff_s=fc.backoff_s,
                        backoff_max_s=fc.backoff_max_s,
                        waited_s=(now - rec.wait_since) if rec.wait_since is not None else 0.0,
                        wait_limit_s=fc.wait_for_workers_s,
                        bad_sources={r for r in rec.survivors
                                     if self.group.pid(r) in rec.bad_sources},
                        memory=self._memory(rec), memory_world=self._memory_world(rec),
                        memory_generation=self._memory_generation(rec),
                        shard_group_size=self.cfg.train.shard_group_size)

    @staticmethod
    def _memory_generation(rec: Recovering) -> Optional[int]:
        return max((gen for gen, _, _ in rec.memory.values() if gen is not None), default=None)

    def _memory_world(self, rec: Recovering) -> Optional[int]:
        """The world size of the generation whose snapshots `_memory` reads (its owners)."""
        newest = self._memory_generation(rec)
        worlds = {w for gen, _, w in rec.memory.values() if gen == newest and gen is not None}
        return max(worlds) if worlds else None

    def _memory(self, rec: Recovering) -> Optional[Dict[int, Dict[int, List[int]]]]:
        """owner -> step -> survivors holding its shard, from the newest generation's snapshots
        the survivors hold (the one that failed, or the last that snapshotted before it: a
        failure while the next generation formed, or before its first snapshot, leaves them
        current); None when snapshots are off, or the parallelism has no shards."""
        if not memory_interval(self.cfg):  # (off, or a parallelism without shards)
            return None
        newest = self._memory_generation(rec)
        out: Dict[int, Dict[int, List[int]]] = {}
        for r, (gen, held, world) in sorted(rec.memory.items()):
            if gen != newest:
                continue  # an older generation's shards (this survivor took no newer one)
            for owner, steps in held.items():
                for s in steps:
                    out.setdefault(owner, {}).setdefault(s, []).append(r)
        return out
