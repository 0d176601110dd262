"""The seam between deciding and carrying out: the types the controller and the workers exchange.

Nothing here imports Ray or torch, so the controller (`coordinator/control/`) and its unit tests
load neither. `WorkerGroup` is what the controller drives; `coordinator/workers/worker_group.py`
is the real one (Ray actors) and `tests/fakes.py` the test double, checked against this Protocol.

Every call on a `WorkerGroup` returns within about a second: long waits (workers starting, a
generation forming, the final digest) are begun by one call and polled by the next, so the
controller's `step()` never blocks and a preemption notice is acted on at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import (Any, Dict, Iterable, List, Optional, Protocol, Set, Tuple,
                    runtime_checkable)


class FailureKind(str, enum.Enum):
    """Why a worker (or the job) stopped training. A `str` enum: it is written to events as is."""
    PROCESS_EXIT = "process_exit"  # the worker's process died
    NODE_LOST = "node_lost"  # ... and its node is gone too
    HANG = "hang"  # no heartbeat for failure.hang_timeout_s while its peers answered
    PREEMPT = "preempt"  # the scheduler's notice (SIGTERM, SIGUSR1) to the driver
    COLLECTIVE_ERROR = "collective_error"  # a collective failed: usually a peer was lost
    # reading the checkpoint being restored failed (storage: a read error, a vanished shard):
    # retried, then the previous committed checkpoint is restored instead
    RESTORE_ERROR = "restore_error"
    TASK_ERROR = "task_error"  # the user's code raised: not retried
    NONFINITE = "nonfinite"  # failure.nonfinite_limit non-finite steps in a row: a rollback
    # A peer's state failed its checksum on a receiver while a generation formed: nobody is
    # lost; the controller takes the state from another source (see TransferCheck).
    TRANSFER_MISMATCH = "transfer_mismatch"

    @property
    def lost(self) -> bool:
        """The worker is gone (or killed for hanging): it must be replaced or dropped."""
        return self in LOST_KINDS

    def __str__(self) -> str:
        return self.value


# The start of a lost worker's error when Ray's memory monitor killed it (workers/memory_pressure)
MEMORY_KILLED = "killed by Ray's memory monitor"

LOST_KINDS = frozenset({FailureKind.PROCESS_EXIT, FailureKind.NODE_LOST, FailureKind.HANG})


class StopMode(enum.IntEnum):
    """A stop request, agreed by all ranks after each step (the highest request wins)."""
    NONE = 0
    PAUSE = 1  # stop after the agreed step (to re-form, e.g. to grow)
    CHECKPOINT = 2  # checkpoint at the agreed step, then stop (a preemption notice)


class SourceKind(str, enum.Enum):
    """Where a generation's members take their training state from."""
    INIT = "init"  # a fresh model (or the survivors' own state when nothing changed)
    PEER = "peer"  # a surviving replica, broadcast
    MEMORY = "memory"  # shards rebuilt from peers' in-memory snapshots
    CHECKPOINT = "checkpoint"  # the latest committed checkpoint, resharded

    def __str__(self) -> str:
        return self.value


class PlanAction(str, enum.Enum):
    REFORM = "reform"  # form the next generation as planned
    WAIT = "wait"  # too few workers: wait for capacity
    ABORT = "abort"  # give up: the job fails

    def __str__(self) -> str:
        return self.value


@dataclass
class WorkerInfo:
    rank: int  # -1 while a newcomer has no rank
    pid: int
    node_id: str
    host: str


@dataclass
class TransferCheck:
    """A state transfer whose checksum did not match (the same on every member that reports it):
    the sender's new-generation rank, the CRC-32 it sent, and receiver rank -> what it got."""
    src: int
    expected: int
    got: Dict[int, int]


@dataclass
class WorkerFailure:
    rank: int
    kind: FailureKind
    pid: Optional[int]
    error: str
    transfer: Optional[TransferCheck] = None  # kind TRANSFER_MISMATCH: what the check saw

    def __post_init__(self) -> None:
        self.kind = FailureKind(self.kind)


@dataclass
class StepReport:
    step: int  # the step just completed (1-based count of completed steps)
    weighted_loss: float  # this rank's mean loss times its share of the global batch
    t: float  # unix time the step completed
    duration_s: float  # wall time of the step on this rank
    skipped: bool = False  # not applied: non-finite now, or a replay of a step skipped before
    nonfinite: bool = False  # found non-finite in this run of it (not a replay)
    grad_norm: Optional[float] = None  # the global gradient norm (the same on every rank)
    lr: Optional[float] = None  # the learning rate the step used (first parameter group)
    eval_loss: Optional[float] = None  # the held-out loss after this step, if evaluated
    eval_s: Optional[float] = None  # seconds the evaluation took on this rank


@dataclass
class SaveReport:
    """One rank's account of one checkpoint write (the driver commits once all ranks report)."""
    step: int
    rank: int
    ok: bool
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> {size, <hash>: hex}
    stall_s: float = 0.0  # training blocked: waiting for the previous save + staging
    waited_s: float = 0.0  # the part of the stall spent waiting for the previous save
    persist_s: float = 0.0  # background write time, retries included
    attempts: int = 0
    error: str = ""
    generation: int = 0  # the process-group generation that wrote it
    world_size: int = 1  # ranks writing this checkpoint (all must report before a commit)
    detail: str = ""  # a failure's traceback, for the run directory's log (not the terminal)


@dataclass
class Heartbeat:
    rank: Optional[int]
    generation: int
    step: int  # completed steps
    reports: List[StepReport] = field(default_factory=list)  # completed steps since last poll
    saves: List[SaveReport] = field(default_factory=list)  # finished checkpoint writes since then
    # in-memory shard snapshots held (its own and its buddies' copies): the generation that
    # took them, owner rank -> steps, and that generation's world size (see workers/snapshots)
    memory_generation: Optional[int] = None
    memory: Dict[int, List[int]] = field(default_factory=dict)
    memory_world: int = 0
    memory_bytes: int = 0  # the most host memory its snapshots have held at once
    # the long phase it is in (a model build, a join, a save, the final digest; None: training
    # or idle): silence in it is allowed up to failure.busy_hang_timeout_s
    busy: Optional[str] = None
    peak_rss_bytes: Optional[int] = None  # its process's peak resident memory (VmHWM)


@dataclass
class TrainResult:
    step: int  # completed steps
    stopped: bool  # True: stopped early on a stop request (a pause or an emergency checkpoint)
    # stopped early by non-finite steps (failure.nonfinite: stop, or rollback's limit reached)
    nonfinite: bool = False


@dataclass
class Source:
    """Where the members of a new generation take their training state from."""
    kind: SourceKind = SourceKind.INIT
    path: Optional[str] = None  # checkpoint: the step directory to load
    src: Optional[int] = None  # peer: the new-generation rank that sends its full state
    # peer (DDP): the new-generation ranks whose replicas are at the source step; they send, the
    # others receive (empty: `src` alone)
    senders: List[int] = field(default_factory=list)
    gather: bool = False  # peer under FSDP2: gather the shards over the old group first
    # memory: the snapshots of generation `generation` at `step`; old rank -> the new-generation
    # rank holding its shard (the owner itself, or its buddy); `handles` (set by the group):
    # old rank -> the holder's actor
    generation: Optional[int] = None
    step: Optional[int] = None
    holders: Dict[int, int] = field(default_factory=dict)
    handles: Dict[int, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = SourceKind(self.kind)


@dataclass
class PollResult:
    heartbeats: Dict[int, Heartbeat] = field(default_factory=dict)
    finished: Dict[int, TrainResult] = field(default_factory=dict)  # train calls that returned
    failures: List[WorkerFailure] = field(default_factory=list)
    silent_s: Dict[int, float] = field(default_factory=dict)  # rank -> seconds without an answer
    # rank -> the long phase its last answer said it was in (Heartbeat.busy), where it said one
    busy: Dict[int, str] = field(default_factory=dict)


class GroupError(RuntimeError):
    """The group could not do what was asked within its bound (e.g. the final digest)."""


@runtime_checkable
class WorkerGroup(Protocol):
    """The workers of a job. Members are keyed by their rank in the current generation;
    newcomers are spawned while the others train and take a rank at the next `assign`."""

    last_restore_s: float  # after a generation formed: the slowest member's restore time
    # after a generation formed: seconds per part of the join (leave_s, rendezvous_s, build_s,
    # transfer_s, wrap_s), each the slowest member's
    last_join_parts: Dict[str, float]
    last_transfer_bytes: int  # after a generation formed: bytes its members took from peers
    buddies: Dict[int, int]  # rank -> the rank holding copies of its in-memory snapshots

    # ---- membership (newcomers start in the background) ----
    def spawn(self, n: int, exclude: Iterable[str] = ()) -> int:
        """Start up to `n` workers on nodes with room, not on `exclude`; returns how many."""
    def collect_ready(self) -> int:
        """Newcomers that answer become ready; dead or late ones are dropped. Returns ready."""
    def pending(self) -> int:
        """Newcomers placed and not yet given a rank (starting or ready)."""
    def drop_newcomers(self) -> None:
        """Stop every newcomer not yet given a rank."""
    def capacity_note(self, exclude: Iterable[str] = ()) -> str:
        """What one worker needs and where there is room, for error messages."""
    def assign(self, ranks: Dict[int, int], newcomers: List[int],
               spares: Iterable[int] = ()) -> List[WorkerInfo]:
        """Next generation's members: `ranks` maps staying members' ranks to new ones, ready
        newcomers take `newcomers`; members left out are stopped, but `spares` (current ranks)
        stay as idle ready workers. Returns the newcomers."""
    def ranks(self) -> List[int]: ...
    def pid(self, rank: int) -> Optional[int]: ...
    def node_of(self, rank: int) -> Optional[str]: ...

    # ---- a generation ----
    def begin_form(self, generation: int, source: Source) -> None:
        """Every member starts joining `generation`, taking its state from `source`."""
    def poll_form(self) -> Optional[List[WorkerFailure]]:
        """None while the generation forms; then the failures (empty: formed)."""
    def abort_form(self) -> None:
        """Release members waiting in the rendezvous of the generation being formed."""
    def launch(self, until_step: int, skip: Iterable[int] = ()) -> None:
        """Every member trains until `until_step` or an agreed stop, skipping the steps in
        `skip` (non-finite before)."""
    def poll(self, fresh: bool = False, wait_s: Optional[float] = None) -> PollResult:
        """One round of heartbeats (about a second at most, `wait_s` if given; `fresh`: current
        answers from every member, bounded by the RPC timeout)."""
    def busy(self) -> Set[int]:
        """Ranks whose train (or final digest) call has not returned."""
    def wait(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, waking at once when a train call returns."""
    def request_stop(self, mode: StopMode) -> None: ...
    def request_checkpoint(self, number: int) -> None: ...
    def chaos(self, rank: int, action: str, arg: Optional[float] = None) -> None: ...
    def kill(self, rank: int) -> None: ...
    def release(self, ranks: Iterable[int], generation: int) -> None:
        """Ask members still in generation `generation`'s failed group to leave it in place
        (their process stays); fire and forget."""
    def begin_digest(self) -> None:
        """Start taking the weights digest (a collective under FSDP2)."""
    def poll_digest(self) -> Tuple[Optional[str], List[WorkerFailure]]:
        """(the digest or None while it is taken, workers lost meanwhile); raises GroupError
        past its bound. A member still taking it counts as busy."""
    def shutdown(self) -> None: ...
