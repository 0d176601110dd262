"""The workers of a job as a group: create, place, form a generation, train, poll, shut down.

`WorkerGroup` is the seam the controller talks to; `RayWorkerGroup` is the real one (Ray actors in
a placement group), and the controller tests use fakes with the same methods.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from coordinator.worker import Heartbeat, TrainWorker, WorkerError, WorkerSpec

logger = logging.getLogger(__name__)


@dataclass
class WorkerInfo:
    rank: int
    pid: int
    node_id: str
    host: str


@dataclass
class WorkerFailure:
    rank: int
    kind: str  # process_exit | node_lost | hang | collective_error | task_error
    pid: Optional[int]
    error: str


@dataclass
class PollResult:
    heartbeats: Dict[int, Heartbeat] = field(default_factory=dict)
    finished: Dict[int, int] = field(default_factory=dict)  # rank -> completed step
    failures: List[WorkerFailure] = field(default_factory=list)
    silent_s: Dict[int, float] = field(default_factory=dict)  # rank -> seconds without an answer


class CapacityError(RuntimeError):
    """The cluster could not place the requested workers in time."""


class WorkerGroup(Protocol):
    def start(self, world_size: int) -> List[WorkerInfo]: ...
    def form(self, generation: int, restore_path: Optional[str] = None) -> List[WorkerFailure]: ...
    def launch(self, until_step: int) -> None: ...
    def poll(self) -> PollResult: ...
    def kill(self, rank: int) -> None: ...
    def pid(self, rank: int) -> Optional[int]: ...
    def final_digest(self) -> str: ...
    def shutdown(self) -> None: ...


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # RayTaskError's text starts with a header line; the user-facing reason is the last line.
    return text[-1] if text else type(err).__name__


def _first_sentence(err: BaseException) -> str:
    """Ray's actor-death text runs to a paragraph of troubleshooting advice: keep its opening."""
    text = " ".join(str(err).split())
    return text.split(". ")[0].rstrip(".") if text else type(err).__name__


class RayWorkerGroup:
    def __init__(self, spec: WorkerSpec, cpus_per_worker: float, store_host: str, store_port: int,
                 start_timeout_s: float, rpc_timeout_s: float = 10.0):
        self.spec = spec
        self.cpus_per_worker = cpus_per_worker
        self.store_host, self.store_port = store_host, store_port
        self.start_timeout_s = start_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.actors: Dict[int, ray.actor.ActorHandle] = {}
        self.infos: Dict[int, WorkerInfo] = {}
        self._pg = None
        self._train_refs: Dict[int, ray.ObjectRef] = {}
        self._hb_refs: Dict[int, ray.ObjectRef] = {}  # heartbeats in flight
        self._last_heard: Dict[int, float] = {}  # rank -> monotonic time of its last answer
        self.heartbeat_wait_s = 1.0  # how long one poll waits for heartbeats

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, world_size: int) -> List[WorkerInfo]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.spec.use_gpu:
            bundle["GPU"] = 1
        # SPREAD: one bundle per worker, spread over nodes where the cluster allows it.
        self._pg = placement_group([dict(bundle) for _ in range(world_size)], strategy="SPREAD")
        try:
            ray.get(self._pg.ready(), timeout=self.start_timeout_s)
        except GetTimeoutError:
            raise CapacityError(
                f"could not place {world_size} workers of {bundle} within "
                f"failure.wait_for_workers_s={self.start_timeout_s:g}s") from None
        for rank in range(world_size):
            self.actors[rank] = TrainWorker.options(
                num_cpus=self.cpus_per_worker, num_gpus=1 if self.spec.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=rank),
            ).remote(self.spec)
        infos = ray.get([a.info.remote() for a in self.actors.values()],
                        timeout=self.start_timeout_s)
        for rank, info in zip(self.actors, infos):
            self.infos[rank] = WorkerInfo(rank, info["pid"], info["node_id"], info["host"])
        return [self.infos[r] for r in sorted(self.infos)]

    def form(self, generation: int, restore_path: Optional[str] = None) -> List[WorkerFailure]:
        """Form generation `generation` over all actors; with `restore_path`, each loads its part
        of that checkpoint. Loading can take a while: no fixed timeout beyond the collective's."""
        world = len(self.actors)
        refs = {r: a.join_group.remote(generation, r, world, self.store_host, self.store_port,
                                       restore_path)
                for r, a in self.actors.items()}
        timeout = self.spec.collective_timeout_s + self.rpc_timeout_s
        if restore_path:
            timeout += 600
        return self._collect(refs, timeout=timeout)[1]

    def launch(self, until_step: int) -> None:
        self._train_refs = {r: a.train.remote(until_step) for r, a in self.actors.items()}
        now = time.monotonic()
        self._last_heard = {r: now for r in self.actors}

    def poll(self) -> PollResult:
        """One round of heartbeats. A worker whose previous heartbeat is still unanswered (a
        frozen process) gets no new one; `silent_s` says how long each has not answered."""
        result = PollResult()
        for r, a in self.actors.items():
            if r not in self._hb_refs:
                self._hb_refs[r] = a.heartbeat.remote()
        ray.wait(list(self._hb_refs.values()), num_returns=len(self._hb_refs),
                 timeout=self.heartbeat_wait_s)
        answered = {r: ref for r, ref in self._hb_refs.items()
                    if ray.wait([ref], timeout=0)[0]}
        for r in answered:
            del self._hb_refs[r]
        values, failures = self._collect(answered, timeout=0)
        now = time.monotonic()
        for r in values:
            self._last_heard[r] = now
        result.heartbeats = values
        result.failures.extend(failures)
        result.silent_s = {r: now - t for r, t in self._last_heard.items()}
        done, _ = ray.wait(list(self._train_refs.values()), num_returns=len(self._train_refs),
                           timeout=0)
        done_set = set(done)
        finished_refs = {r: ref for r, ref in self._train_refs.items() if ref in done_set}
        values, failures = self._collect(finished_refs, timeout=self.rpc_timeout_s)
        result.finished = values
        seen = {f.rank for f in result.failures}
        result.failures.extend(f for f in failures if f.rank not in seen)
        return result

    def kill(self, rank: int) -> None:
        """Kill one worker (a hung one: its peers are then released from their collective)."""
        ray.kill(self.actors[rank], no_restart=True)

    def final_digest(self) -> str:
        digests = ray.get([a.final_digest.remote() for a in self.actors.values()],
                          timeout=self.spec.collective_timeout_s + self.rpc_timeout_s)
        return digests[0]

    def shutdown(self) -> None:
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # already dead: nothing to clean
                logger.debug("kill failed: %s", e)
        self.actors.clear()
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception as e:
                logger.debug("placement group removal failed: %s", e)
            self._pg = None

    # ---- helpers --------------------------------------------------------------------------
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
            except RayActorError as e:
                failures.append(self._lost(rank, e))
            except RayTaskError as e:
                # WorkerError: the collective failed (a peer died or hung); anything else was
                # raised by the user's task code.
                kind = "collective_error" if isinstance(e.cause, WorkerError) else "task_error"
                failures.append(WorkerFailure(rank, kind, self.pid(rank), _first_line(e)))
        return values, failures

    def _lost(self, rank: int, err: RayActorError) -> WorkerFailure:
        info = self.infos.get(rank)
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        kind = "node_lost" if info is not None and info.node_id not in alive else "process_exit"
        return WorkerFailure(rank, kind, self.pid(rank), _first_sentence(err))

    def pid(self, rank: int) -> Optional[int]:
        info = self.infos.get(rank)
        return info.pid if info else None
