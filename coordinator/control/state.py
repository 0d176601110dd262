"""The controller's phases, one object each, holding the data that belongs to that phase only.

    Starting -> Forming -> Running -> Finalizing -> Ended(done)
                  ^  |       |   \\
                  |  v       v    Pausing (grow at a step boundary, or preempt) -> Ended(interrupted)
               Recovering <--+
    (any phase) -> Ended(failed)

Data that outlives a phase (generation, failures, the world sizes so far) is on `JobRecord`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from coordinator.control.failure_policy import Plan
from coordinator.protocol import Source, WorkerFailure


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


@dataclass
class Transition:
    """What one `Controller.step()` did."""
    before: Phase
    after: Phase
    note: str = ""
    progress: Optional[Any] = None  # control.accounting.Progress while training


@dataclass
class Starting:
    phase = Phase.STARTING
    waiting_since: Optional[float] = None  # capacity short since then
    world_size: int = 0  # 0 until capacity allowed a size and the workers were placed
    placed_at: float = 0.0
    plan: Optional[Plan] = None
    unreadable: int = 0  # times the checkpoint storage could not be listed
    read_again_at: float = 0.0  # when to try listing it again


@dataclass
class Recovering:
    """One recovery in progress, from detection to the new generation's plan."""
    phase = Phase.RECOVERING
    t0: float  # when the failure was detected
    world_size: int  # the size of the generation that failed
    step_before: int = 0  # the highest step any rank completed before the failure
    lost: Set[int] = field(default_factory=set)
    lost_on_live_node: bool = False  # some lost worker's node is up: its slot will be freed
    nodes_hit: Set[str] = field(default_factory=set)  # nodes counted toward isolation
    unexplained: List[WorkerFailure] = field(default_factory=list)  # errors without a lost worker
    released: bool = False  # survivors still in the failed group were asked to leave it
    settled: bool = False  # every survivor left the failed group and reported its step
    settled_at: Optional[float] = None  # when it settled
    planned_at: Optional[float] = None  # when the new generation's plan was made
    survivors: Dict[int, int] = field(default_factory=dict)  # rank -> completed step
    # rank -> (generation, owner -> steps, world size) of the snapshots each survivor holds
    memory: Dict[int, Tuple[Optional[int], Dict[int, List[int]], int]] = \
        field(default_factory=dict)
    spawned_at: Optional[float] = None
    wait_since: Optional[float] = None
    not_before: float = 0.0  # backoff: do not re-form before this time
    progress_t: Optional[float] = None  # when the last step of any survivor completed
    unreadable: int = 0  # times the checkpoint storage could not be listed in this recovery
    read_again_at: float = 0.0  # when to try listing it again
    bad_sources: Set[int] = field(default_factory=set)  # pids whose sent state failed its check


@dataclass
class Forming:
    phase = Phase.FORMING
    plan: Plan
    source: Source
    cause: str  # start | recovery | grow
    recovery: Optional[Recovering] = None  # the recovery this generation ends
    began: bool = False
    began_at: Optional[float] = None  # when its members were asked to join


@dataclass
class Running:
    phase = Phase.RUNNING


@dataclass
class Pausing:
    phase = Phase.PAUSING
    reason: str  # grow | preempt
    nonfinite: bool = False  # a member's train call stopped on non-finite steps meanwhile


@dataclass
class Finalizing:
    phase = Phase.FINALIZING
    began: bool = False


@dataclass
class Ended:
    phase: Phase
    error: Optional[str] = None


@dataclass
class JobRecord:
    """What the job has been through, across phases and generations (the summary's facts)."""
    generation: int = 0
    world_size: int = 0
    world_sizes: List[int] = field(default_factory=list)
    failures: List[WorkerFailure] = field(default_factory=list)
    incidents: int = 0  # failures counted against failure.max_failures
    streak: int = 0  # failures without a completed step in between
    recoveries: List[Dict[str, Any]] = field(default_factory=list)
    resume: Optional[Any] = None  # the checkpoint this run started from (CheckpointInfo)
    transfer_mismatches: int = 0  # peer state transfers that failed their checksum
    memory_snapshot_bytes: int = 0  # the most host memory one rank's shard snapshots held
    peak_rss: Dict[int, int] = field(default_factory=dict)  # worker pid -> peak resident bytes
    digest: Optional[str] = None
    skipped: Set[int] = field(default_factory=set)  # steps found non-finite: never applied
    nonfinite_run: List[int] = field(default_factory=list)  # the latest ones in a row
    rollbacks: int = 0  # failure.nonfinite=rollback restores so far
    # start-up: unix times of its moments (placed, ready, formed), see summary.startup
    startup: Dict[str, float] = field(default_factory=dict)
