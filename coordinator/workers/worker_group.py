"""The workers of a job as a group: place, form a generation, train, poll, stop, shut down.

`WorkerGroup` is the seam the controller talks to; `RayWorkerGroup` is the real one (one Ray actor
per worker, each pinned to a node we choose), and the controller tests use fakes with the same
methods.

Members are keyed by their rank in the current generation. Newcomers (replacements, growth) are
*spawned* while the others keep training, and join with a rank only when the controller re-forms
the group (`assign`, then `form`). Each worker is placed on a node picked here rather than in one
placement group: a placement group cannot grow, and picking nodes lets us spread workers and keep
away from nodes the failure policy has isolated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import ray
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coordinator.checkpoint.fence import KEY as FENCE_KEY
from coordinator.protocol import (
    FailureKind,
    GroupError,
    PollResult,
    Source,
    SourceKind,
    StopMode,
    TransferCheck,
    WorkerFailure,
    WorkerInfo,
)
from coordinator.workers.memory_pressure import MemoryPressure, memory_kill
from coordinator.workers.peer_transfer import StateTransferMismatch
from coordinator.workers import snapshots
from coordinator.workers.spec import WorkerSpec
from coordinator.workers.worker import RestoreError, TrainWorker, WorkerError
from coordinator.workers.nodes import kill_ray_process, node_reachable, reap
from train.errors import first_sentence, last_line

logger = logging.getLogger(__name__)


@dataclass
class _Newcomer:
    actor: "ray.actor.ActorHandle"
    info_ref: Optional["ray.ObjectRef"]  # None: a former member kept as a spare
    node_id: str
    since: float
    info: Optional[WorkerInfo] = None


UNRESPONSIVE_S = 5.0  # a node that has not run a task sent to it for this long is shunned
NODE_CHECK_S = 1.0  # how often a starting worker's node is asked whether it is still there


class RayWorkerGroup:
    def __init__(self, spec: WorkerSpec, cpus_per_worker: float, store, store_host: str,
                 free_slots: Callable[[Iterable[str]], Dict[str, int]], start_timeout_s: float,
                 hang_timeout_s: float = 3.0, rpc_timeout_s: float = 10.0,
                 busy_hang_timeout_s: float = 60.0, memory_pressure_s: float = 300.0):
        self.spec = spec
        self.cpus_per_worker = cpus_per_worker
        self.store = store  # the driver's TCPStore (master): rendezvous and abort keys
        self.store_host, self.store_port = store_host, store.port
        self.free_slots = free_slots
        self.start_timeout_s = start_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.hang_timeout_s = hang_timeout_s
        self.busy_hang_timeout_s = busy_hang_timeout_s  # silence allowed in a long phase
        self.pressure = MemoryPressure(memory_pressure_s)  # nodes short of memory
        self._node_checks: Dict[str, Tuple[float, bool]] = {}  # node -> (when asked, gone)
        self.actors: Dict[int, ray.actor.ActorHandle] = {}
        self.infos: Dict[int, WorkerInfo] = {}
        self.dead: Set[int] = set()  # ranks whose process is gone (reported once)
        self.killed: Set[int] = set()  # ranks killed by the controller: no heartbeat awaited
        self._spawning: List[_Newcomer] = []  # placed, not yet answering
        self._ready: List[_Newcomer] = []  # answering, waiting for a rank
        self._train_refs: Dict[int, ray.ObjectRef] = {}
        self._hb_refs: Dict[int, ray.ObjectRef] = {}  # heartbeats in flight
        self._busy: Dict[int, Optional[str]] = {}  # rank -> the long phase it last said
        self._last_heard: Dict[int, float] = {}  # rank -> monotonic time of its last answer
        self._stash = PollResult()  # heartbeats taken outside poll(), handed out by the next one
        self._form_refs: Dict[int, ray.ObjectRef] = {}  # joins in flight (begin_form)
        self._form_generation = 0
        self._form_aborted = False
        self._digest_refs: Dict[int, ray.ObjectRef] = {}  # final digests in flight
        self._digest: Optional[str] = None
        # node id -> (the reap task sent there, when): a node that has not run it within
        # UNRESPONSIVE_S is frozen or cut off, and gets no new workers until it does
        self._reaps: Dict[str, Tuple[ray.ObjectRef, float]] = {}
        self._shunned: Set[str] = set()
        self._node_id = ray.get_runtime_context().get_node_id()  # the driver's Ray node
        self.heartbeat_wait_s = 1.0  # how long one poll waits for heartbeats
        self.last_restore_s = 0.0  # see WorkerGroup
        self.last_join_parts: Dict[str, float] = {}  # see WorkerGroup
        self.last_transfer_bytes = 0  # see WorkerGroup
        self.buddies: Dict[int, int] = {}  # rank -> the rank holding its snapshots' copies

    # ---- membership -----------------------------------------------------------------------
    def capacity_note(self, exclude: Iterable[str] = ()) -> str:
        return f"each worker needs {self._bundle()}; free slots: {self.free_slots(exclude)}"

    def _bundle(self) -> Dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.spec.use_gpu:
            bundle["GPU"] = 1
        return bundle

    def spawn(self, n: int, exclude: Iterable[str] = ()) -> int:
        """Start up to `n` new workers on nodes with room (spread: the node with the fewest of our
        workers first), without waiting for them. Under HSDP whole shard groups go first, each
        on one node where one has the room (its all-gathers stay on the node; a lost node
        takes whole groups, whose replicas live elsewhere). Returns how many were placed."""
        shunned = self.unresponsive_nodes() + self.pressure.nodes()
        slots = self.free_slots(list(exclude) + shunned)
        ours: Dict[str, int] = {}
        for info in self.infos.values():
            ours[info.node_id] = ours.get(info.node_id, 0) + 1
        for nc in self._spawning + self._ready:
            ours[nc.node_id] = ours.get(nc.node_id, 0) + 1
        group = self.spec.shard_group_size or 1
        placed = 0
        while placed < n and slots:
            roomy = [nd for nd in slots if slots[nd] >= group] if n - placed >= group else []
            node = min(roomy or slots, key=lambda nd: (ours.get(nd, 0), -slots[nd], nd))
            for _ in range(group if roomy else 1):
                self._start_on(node)
                ours[node] = ours.get(node, 0) + 1
                slots[node] -= 1
                placed += 1
            if slots[node] <= 0:
                del slots[node]
        return placed

    def _start_on(self, node: str) -> None:
        strategy = (NodeAffinitySchedulingStrategy(node, soft=False) if node
                    else "SPREAD")  # "" = per-node view unavailable: let Ray spread
        actor = TrainWorker.options(num_cpus=self.cpus_per_worker,
                                    num_gpus=1 if self.spec.use_gpu else 0,
                                    scheduling_strategy=strategy).remote(self.spec)
        actor.warm.remote()  # builds its state once started (see TrainWorker.warm)
        self._spawning.append(_Newcomer(actor, actor.info.remote(), node, time.monotonic()))

    def collect_ready(self) -> int:
        """Newcomers that answer move to the ready list; ones that died or could not be placed
        in time are dropped. Returns how many are ready."""
        still = []
        for nc in self._spawning:
            done, _ = ray.wait([nc.info_ref], timeout=0)
            if not done:
                if self._node_gone(nc.node_id):
                    # Placed on a node that went down before it started (Ray still called the
                    # node alive then): it will never start, and a recovery must not wait for
                    # it (failure.replace_timeout_s).
                    logger.warning("a starting worker on node %s was lost with its node: dropped",
                                   nc.node_id[:8])
                    self._kill(nc.actor)
                elif time.monotonic() - nc.since > self.start_timeout_s:
                    logger.warning("a new worker on node %s did not start within %gs: dropped",
                                   nc.node_id[:8], self.start_timeout_s)
                    self._kill(nc.actor)
                else:
                    still.append(nc)
                continue
            try:
                info = ray.get(nc.info_ref, timeout=0)
            except (RayActorError, RayTaskError, OutOfMemoryError) as e:
                oom = memory_kill(str(e))
                if oom is not None:
                    self.pressure.killed_on(nc.node_id)
                logger.warning("a starting worker (newcomer or spare) on node %s was lost: %s",
                               nc.node_id[:8], oom or first_sentence(e))
                continue
            nc.info = WorkerInfo(-1, info["pid"], info["node_id"], info["host"])
            self._ready.append(nc)
        self._spawning = still
        return len(self._ready)

    def _node_gone(self, node: str) -> bool:
        """Whether a starting worker's node no longer answers. Asked at most every
        NODE_CHECK_S per node: collect_ready runs at every poll, and asking Ray for its node
        table that often took CPU from training on a small machine."""
        if not node:
            return False
        now = time.monotonic()
        asked = self._node_checks.get(node)
        if asked is None or now - asked[0] >= NODE_CHECK_S:
            asked = self._node_checks[node] = (now, not node_reachable(node, timeout_s=0.2))
        return asked[1]

    def pending(self) -> int:
        """Newcomers placed and not yet assigned a rank (starting or ready)."""
        return len(self._spawning) + len(self._ready)

    def assign(self, ranks: Dict[int, int], newcomers: List[int],
               spares: Iterable[int] = ()) -> List[WorkerInfo]:
        """The next generation's membership: `ranks` maps each staying member's current rank to
        its new one; ready newcomers take the ranks in `newcomers`. Members left out are killed,
        except `spares` (current ranks), which stay as idle ready workers (a survivor the new
        world has no room for). Returns the newcomers' infos."""
        assert len(newcomers) <= len(self._ready), "assign: not enough ready newcomers"
        if not ranks and self.spec.shard_group_size:
            # a first world under HSDP: consecutive ranks on one node wherever possible, so a
            # shard group shares a node and another group holds its replica
            nodes = list(dict.fromkeys(nc.node_id for nc in self._ready))
            self._ready.sort(key=lambda nc: nodes.index(nc.node_id))
        actors, infos = {}, {}
        for old, new in ranks.items():
            actors[new] = self.actors[old]
            info = self.infos[old]
            infos[new] = WorkerInfo(new, info.pid, info.node_id, info.host)
        idle = set(spares)
        for old, actor in self.actors.items():
            if old in ranks:
                continue
            if old in idle:
                info = self.infos[old]
                self._ready.append(_Newcomer(actor, None, info.node_id, time.monotonic(),
                                             WorkerInfo(-1, info.pid, info.node_id, info.host)))
            else:
                self._kill(actor)
        added = []
        for new in newcomers:
            nc = self._ready.pop(0)
            actors[new] = nc.actor
            infos[new] = WorkerInfo(new, nc.info.pid, nc.info.node_id, nc.info.host)
            added.append(infos[new])
        self.actors = {r: actors[r] for r in sorted(actors)}
        self.infos = {r: infos[r] for r in sorted(infos)}
        self.dead, self.killed = set(), set()
        self._train_refs, self._hb_refs, self._last_heard = {}, {}, {}
        self._digest_refs = {}
        return added

    def ranks(self) -> List[int]:
        return sorted(self.actors)

    # ---- a generation ---------------------------------------------------------------------
    def begin_form(self, generation: int, source: Source) -> None:
        """Every member starts joining generation `generation`, taking its state from `source`;
        `poll_form` follows the joins."""
        world = len(self.actors)
        # Workers of older generations stop writing checkpoints from now on (checkpoint/fence).
        self.store.set(FENCE_KEY, str(generation))
        if source.kind == SourceKind.MEMORY:
            source = dataclasses.replace(source, handles={
                owner: self.actors[r] for owner, r in source.holders.items()})
        buddies: Dict[int, int] = {}
        sgs = self.spec.shard_group_size
        # Copies go to another node wherever there is one. Under HSDP the other shard groups
        # hold the same shards: a buddy only when the world is a single group.
        if self.spec.memory_interval and not (sgs and world > sgs):
            ranks = sorted(self.actors)
            buddies = {ranks[i]: ranks[b] for i, b in snapshots.buddies(
                [self.infos[r].node_id if r in self.infos else "" for r in ranks]).items()}
        self.buddies = buddies
        self._form_refs = {r: a.join_group.remote(generation, r, world, self.store_host,
                                                  self.store_port, source, buddies)
                           for r, a in self.actors.items()}
        timeout = self.spec.collective_timeout_s + self.rpc_timeout_s
        if source.kind == SourceKind.CHECKPOINT:
            timeout += 600
        self._form_generation, self._form_timeout = generation, timeout
        self._form_deadline = time.monotonic() + timeout
        self._form_failures: List[WorkerFailure] = []
        self._form_aborted = False
        self.last_restore_s = 0.0
        self.last_join_parts: Dict[str, float] = {}
        self.last_transfer_bytes = 0
        self._hb_refs, self._last_heard = {}, {r: time.monotonic() for r in self.actors}

    def poll_form(self) -> Optional[List[WorkerFailure]]:
        """None while members are still joining; then the failures (empty: formed). If one is
        lost while joining, the generation is aborted through the store so the others return at
        once instead of waiting in the rendezvous."""
        refs, generation = self._form_refs, self._form_generation
        if refs and time.monotonic() < self._form_deadline:
            done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0.05)
            done_set = set(done)
            finished = {r: ref for r, ref in refs.items() if ref in done_set}
            for r in finished:
                del refs[r]
            joined, fs = self._collect(finished, timeout=0)
            for res in joined.values():
                self.last_restore_s = max(self.last_restore_s, float(res["restore_s"]))
                self.last_transfer_bytes += int(res.get("transfer_bytes", 0))
                for part, s in res.get("parts", {}).items():  # the slowest member's, per part
                    self.last_join_parts[part] = max(self.last_join_parts.get(part, 0.0), s)
            # A member frozen while joining (SIGSTOP) blocks the others: find it by its silence.
            self._heartbeats(self._stash, 0.0)  # its reports reach the controller's next poll
            now = time.monotonic()
            quiet = [r for r in refs if now - self._last_heard.get(r, now) > (
                self.busy_hang_timeout_s if self._busy.get(r) else self.hang_timeout_s)]
            if quiet and len(quiet) < len(self._last_heard):
                for r in quiet:
                    self.kill(r)
                    fs.append(WorkerFailure(r, FailureKind.HANG, self.pid(r),
                                            f"no heartbeat for {now - self._last_heard[r]:.0f}s "
                                            f"while joining generation {generation}"))
                    del refs[r]
            self._form_failures.extend(fs)
            if fs:
                self.abort_form()
            if refs and time.monotonic() < self._form_deadline:
                return None
        self._hb_refs = {}
        for r in refs:  # still joining at the deadline
            self._form_failures.append(WorkerFailure(
                r, FailureKind.HANG, self.pid(r),
                f"did not join generation {generation} in {self._form_timeout:g}s"))
        refs.clear()
        return self._form_failures

    def abort_form(self) -> None:
        if not self._form_aborted and self._form_generation:
            self.store.set(f"gen{self._form_generation}/abort", "1")
            self._form_aborted = True

    def launch(self, until_step: int, skip: Iterable[int] = ()) -> None:
        skip = tuple(sorted(skip))
        self._train_refs = {r: a.train.remote(until_step, skip) for r, a in self.actors.items()}
        now = time.monotonic()
        self._last_heard = {r: now for r in self.actors}

    def busy(self) -> Set[int]:
        """Ranks whose train (or final digest) call has not returned yet."""
        return set(self._train_refs) | set(self._digest_refs)

    def wait(self, timeout_s: float) -> None:
        """Sleep between polls, but wake at once when a train call ends (a worker died, its
        group failed, or it finished): a lost worker is noticed in milliseconds."""
        if self._train_refs:
            ray.wait(list(self._train_refs.values()), num_returns=1, timeout=timeout_s)
        else:
            time.sleep(timeout_s)

    def poll(self, fresh: bool = False, wait_s: Optional[float] = None) -> PollResult:
        """One round of heartbeats. A worker whose previous heartbeat is still unanswered (a
        frozen process) gets no new one; `silent_s` says how long each has not answered. A lost
        worker is reported once; a train call is reported once, when it returns. `fresh`: wait
        (up to the RPC timeout) for answers to heartbeats sent now, so each step is current.
        `wait_s`: how long to wait for heartbeats otherwise (default heartbeat_wait_s)."""
        result, self._stash = self._stash, PollResult()
        result.failures = []  # failures seen while forming were reported by form()
        self._heartbeats(result, self.rpc_timeout_s if fresh else (
            self.heartbeat_wait_s if wait_s is None else wait_s))
        if fresh:
            self._heartbeats(result, self.rpc_timeout_s)
        now = time.monotonic()
        result.silent_s = {r: now - t for r, t in self._last_heard.items()
                           if r not in self.dead and r not in self.killed}
        result.busy = {r: self._busy[r] for r in result.silent_s if self._busy.get(r)}
        if self._train_refs:
            done, _ = ray.wait(list(self._train_refs.values()),
                               num_returns=len(self._train_refs), timeout=0)
            done_set = set(done)
            finished = {r: ref for r, ref in self._train_refs.items() if ref in done_set}
            for r in finished:
                del self._train_refs[r]
            values, failures = self._collect(finished, timeout=self.rpc_timeout_s)
            result.finished = values
            seen = {f.rank for f in result.failures}
            result.failures.extend(f for f in failures if f.rank not in seen)
        seen = {f.rank for f in result.failures}
        result.failures.extend(f for f in self._reap_digests(wait_s=0) if f.rank not in seen)
        for f in result.failures:
            if f.kind in (FailureKind.PROCESS_EXIT, FailureKind.NODE_LOST):
                self.dead.add(f.rank)
                self._hb_refs.pop(f.rank, None)
                self._train_refs.pop(f.rank, None)
                self._last_heard.pop(f.rank, None)
        return result

    def _heartbeats(self, result: PollResult, wait_s: float) -> None:
        for r, a in self.actors.items():
            if r not in self._hb_refs and r not in self.dead and r not in self.killed:
                self._hb_refs[r] = a.heartbeat.remote()
        if self._hb_refs:
            ray.wait(list(self._hb_refs.values()), num_returns=len(self._hb_refs),
                     timeout=wait_s)
        answered = {r: ref for r, ref in self._hb_refs.items() if ray.wait([ref], timeout=0)[0]}
        for r in answered:
            del self._hb_refs[r]
        values, failures = self._collect(answered, timeout=0)
        now = time.monotonic()
        for r, hb in values.items():
            self._last_heard[r] = now
            self._busy[r] = hb.busy
            prev = result.heartbeats.get(r)
            if prev is not None:  # two answers in one poll: keep every report, the newer step
                hb.reports[:0] = prev.reports
                hb.saves[:0] = prev.saves
            result.heartbeats[r] = hb
        seen = {f.rank for f in result.failures}
        for f in failures:
            if f.rank not in seen:
                result.failures.append(f)
                if f.kind in (FailureKind.PROCESS_EXIT, FailureKind.NODE_LOST):
                    self.dead.add(f.rank)

    def request_stop(self, mode: StopMode) -> None:
        for r, a in self.actors.items():
            if r not in self.dead:
                a.request_stop.remote(mode)

    def request_checkpoint(self, number: int) -> None:
        for r, a in self.actors.items():
            if r not in self.dead:
                a.request_checkpoint.remote(number)

    def chaos(self, rank: int, action: str, arg: Optional[float] = None) -> None:
        self.actors[rank].chaos.remote(action, arg)

    def release(self, ranks: Iterable[int], generation: int) -> None:
        """Survivors blocked in the failed group are released in place (TrainWorker.release).
        Not awaited: a survivor answers on its control thread, and one that cannot (a frozen
        process) is found by its heartbeat."""
        for r in ranks:
            if r in self.actors and r not in self.dead:
                self.actors[r].release.remote(generation)

    def kill(self, rank: int) -> None:
        """Kill one worker (a hung one: its peers are then released from their collective).
        ray.kill asks the worker to exit, which a frozen (SIGSTOPped) process cannot do; so a
        SIGKILL is also sent by a small task placed on the worker's node. Its heartbeats are
        no longer awaited (a poll would wait for Ray to notice the process gone)."""
        self.killed.add(rank)
        self._hb_refs.pop(rank, None)
        self._kill(self.actors[rank])
        info = self.infos.get(rank)
        if info is not None and info.node_id == self._node_id:
            kill_ray_process(info.pid)  # on the driver's own node: at once, not via a task
        if info is not None:
            ref = reap.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                info.node_id, soft=False)).remote(info.pid)
            if info.node_id not in self._reaps:
                self._reaps[info.node_id] = (ref, time.monotonic())

    def unresponsive_nodes(self) -> List[str]:
        """Nodes that have not run the reap task sent to them for UNRESPONSIVE_S: frozen or cut
        off (Ray may still call them alive: its health checks take longer, and a stopped raylet's
        port still accepts connections). Such a node gets no new workers until the task runs
        (it thawed: the task kills the stale worker first) or Ray declares the node dead."""
        now = time.monotonic()
        for node, (ref, sent) in list(self._reaps.items()):
            done, _ = ray.wait([ref], timeout=0)
            if done or not node_reachable(node, timeout_s=0.2):
                del self._reaps[node]
                if node in self._shunned:
                    self._shunned.discard(node)
                    logger.info("node %s answers again (or is gone): it may take workers",
                                node[:8])
            elif now - sent > UNRESPONSIVE_S and node not in self._shunned:
                self._shunned.add(node)
                logger.warning("node %s has not run a task sent to it for %.0fs: frozen or cut "
                               "off; no workers are placed on it until it answers", node[:8],
                               now - sent)
        return sorted(self._shunned)

    def begin_digest(self) -> None:
        self._digest_refs = {r: a.final_digest.remote() for r, a in self.actors.items()}
        self._digest = None
        self._digest_deadline = (time.monotonic() + self.spec.collective_timeout_s
                                 + self.rpc_timeout_s)

    def poll_digest(self) -> Tuple[Optional[str], List[WorkerFailure]]:
        """Members that fail while taking the digest are reported (survivors blocked in its
        gather stay busy until they leave it); rank 0's answer is the digest."""
        failures = self._reap_digests(wait_s=0.05)
        if failures:
            return None, failures
        if self._digest_refs:
            if time.monotonic() > self._digest_deadline:
                raise GroupError(f"the weights digest took longer than "
                                 f"train.collective_timeout_s={self.spec.collective_timeout_s:g}s")
            return None, []
        return self._digest, []

    def _reap_digests(self, wait_s: float) -> List[WorkerFailure]:
        refs = self._digest_refs
        if not refs:
            return []
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=wait_s)
        done_set = set(done)
        finished = {r: ref for r, ref in refs.items() if ref in done_set}
        for r in finished:
            del refs[r]
        values, failures = self._collect(finished, timeout=0)
        if 0 in values:
            self._digest = values[0]
        for f in failures:
            if f.kind in (FailureKind.PROCESS_EXIT, FailureKind.NODE_LOST):
                self.dead.add(f.rank)
        return failures

    def shutdown(self) -> None:
        for actor in list(self.actors.values()) + [nc.actor for nc in
                                                   self._spawning + self._ready]:
            self._kill(actor)
        self.actors.clear()
        self._spawning, self._ready = [], []

    # ---- helpers --------------------------------------------------------------------------
    def drop_newcomers(self) -> None:
        for nc in self._spawning + self._ready:
            self._kill(nc.actor)
        self._spawning, self._ready = [], []

    @staticmethod
    def _kill(actor) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # already dead: nothing to clean
            logger.debug("kill failed: %s", e)

    def _collect(self, refs: Dict[int, ray.ObjectRef], timeout: float):
        """ray.get each ref; a dead actor or a raised error becomes a WorkerFailure."""
        values, failures = {}, []
        if not refs:
            return values, failures
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        for rank, ref in refs.items():
            try:
                values[rank] = ray.get(ref, timeout=0)
            except GetTimeoutError:
                continue  # no answer yet: the controller's hang detection looks at time instead
            except (RayActorError, OutOfMemoryError) as e:  # the latter: Ray's memory monitor
                failures.append(self._lost(rank, e))
            except RayTaskError as e:
                if isinstance(e.cause, StateTransferMismatch):
                    c = e.cause
                    failures.append(WorkerFailure(rank, FailureKind.TRANSFER_MISMATCH,
                                                  self.pid(rank), str(c),
                                                  TransferCheck(c.src, c.expected, c.got)))
                    continue
                # RestoreError: storage failed a checkpoint restore; WorkerError: the collective
                # failed (a peer died or hung); anything else was raised by the user's task code.
                kind = (FailureKind.RESTORE_ERROR if isinstance(e.cause, RestoreError)
                        else FailureKind.COLLECTIVE_ERROR if isinstance(e.cause, WorkerError)
                        else FailureKind.TASK_ERROR)
                failures.append(WorkerFailure(rank, kind, self.pid(rank), last_line(e)))
        return values, failures

    def _lost(self, rank: int, err: Exception) -> WorkerFailure:
        info = self.infos.get(rank)
        lost_node = info is not None and not node_reachable(info.node_id)
        kind = FailureKind.NODE_LOST if lost_node else FailureKind.PROCESS_EXIT
        oom = memory_kill(str(err))
        if oom is not None and info is not None:
            self.pressure.killed_on(info.node_id)
        return WorkerFailure(rank, kind, self.pid(rank), oom or first_sentence(err))

    def pid(self, rank: int) -> Optional[int]:
        info = self.infos.get(rank)
        return info.pid if info else None

    def node_of(self, rank: int) -> Optional[str]:
        info = self.infos.get(rank)
        return info.node_id if info else None
