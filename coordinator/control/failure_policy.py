"""What to do after a failure: facts in, a plan out. No Ray, no clock, no I/O: the controller
gathers the facts, asks, and carries the plan out, so every branch is testable on its own.

The rules, in order:
1. Budget: more than `failure.max_failures` failures -> abort.
2. Size: survivors plus newcomers that are ready now, capped at `scaling.max_workers`. Below
   `scaling.min_workers` -> wait for capacity, and abort once `failure.wait_for_workers_s` is spent.
3. Ranks: when the world keeps (or regains) its size, survivors keep their ranks and newcomers take
   the vacant ones, so every rank reads the same samples as before and a DDP run stays
   bit-identical to one without the failure. When it shrinks, ranks are reassigned densely in the
   survivors' order.
4. State: under DDP every survivor holds a full replica: those at the highest completed step
   keep it and send it, each a stripe, to the members that lack it (newcomers, and survivors one
   step behind after a failure inside the last all-reduce), so no step is lost and nobody
   receives what it holds. Under FSDP2 a lost rank takes its shards with it: restore the latest committed
   checkpoint, resharded (or start over when there is none). A group that grows without a loss
   gathers the FSDP2 shards first and sends them like a replica. A survivor whose sent state
   failed its checksum in this recovery (`bad_sources`) sends no more: the next best survivor
   does, or the checkpoint; a newcomer (step 0) sending means starting over. When every member
   failed as a sender and no checkpoint exists, the job aborts rather than train on replicas
   nobody could check.
5. Hang: a worker silent past `failure.hang_timeout_s` while some peer still answers is hung
   (`hung`); when nobody answers, all are hung only if no step completed for as long either
   (`all_frozen`).
6. Settling: survivors leave the failed collective within moments (those still in it are
   released in place: their group's connections are shut down); one still in it after the grace
   (`settle_grace_s`) is stuck and killed.
7. Backoff: the first failure after progress re-forms at once; each further failure without a
   completed step in between waits twice as long (`failure.backoff_s`, capped at
   `failure.backoff_max_s`), so a crash loop does not spin.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from coordinator.control.scaling_policy import whole_groups
from coordinator.protocol import (MEMORY_KILLED, FailureKind, PlanAction, SourceKind,
                                  WorkerFailure)

SETTLE_MIN_S = 10.0  # the least survivors get to leave a failed group (see settle_grace_s)


@dataclass
class Facts:
    world_size: int  # members of the generation that failed
    survivors: Dict[int, int]  # rank -> completed step, for members still alive
    ready: int  # newcomers started and ready to join
    min_workers: int
    max_workers: int
    parallelism: str  # ddp | fsdp | hsdp
    checkpoint_step: Optional[int]  # the latest committed checkpoint known, if any
    failures: int  # failures so far, this one included
    max_failures: int
    streak: int  # failures in a row without a completed step in between, this one included
    backoff_s: float
    backoff_max_s: float
    waited_s: float = 0.0  # how long this recovery has waited for capacity so far
    wait_limit_s: float = 60.0
    bad_sources: Set[int] = field(default_factory=set)  # ranks whose sent state failed its check
    # FSDP2 in-memory snapshots of the failed generation (None: snapshots are off): owner rank ->
    # step -> the survivors holding that owner's shard at that step (itself, or its buddy)
    memory: Optional[Dict[int, Dict[int, List[int]]]] = None
    memory_world: Optional[int] = None  # the world size of the generation that took them
    memory_generation: Optional[int] = None  # that generation
    # hsdp: ranks per shard group. The world is a whole number of groups, and rank o holds the
    # same shard as every rank o' with o' % shard_group_size == o % shard_group_size (its
    # replicas in the other groups): any of them can stand in for a lost one.
    shard_group_size: Optional[int] = None


@dataclass
class Plan:
    action: PlanAction
    reason: str
    world_size: int = 0
    ranks: Dict[int, int] = field(default_factory=dict)  # survivor's old rank -> new rank
    newcomers: List[int] = field(default_factory=list)  # ranks the newcomers take
    source: SourceKind = SourceKind.INIT
    src: Optional[int] = None  # peer: the new rank of the sender (of the structure, under DDP)
    # peer (DDP): the new ranks whose replicas are at the resumed step; each sends a stripe of
    # the state to the members that lack it (every other one), and receives nothing
    senders: List[int] = field(default_factory=list)
    resumed_step: int = 0
    backoff_s: float = 0.0
    holders: Dict[int, int] = field(default_factory=dict)  # memory: old rank -> holder's new rank
    memory_generation: Optional[int] = None  # memory: the generation whose snapshots to take


def backoff(streak: int, base_s: float, cap_s: float) -> float:
    return 0.0 if streak <= 1 else min(cap_s, base_s * 2 ** (streak - 2))


def decide(f: Facts) -> Plan:
    if f.failures > f.max_failures:
        return Plan(PlanAction.ABORT, f"failure budget spent: {f.failures} failures > "
                             f"failure.max_failures={f.max_failures}")
    alive = len(f.survivors)
    size = whole_groups(min(f.max_workers, alive + f.ready), f.shard_group_size)
    if size < f.min_workers:
        missing = f.min_workers - size
        why = (f"{alive} workers survive and {f.ready} newcomers are ready: {missing} short of "
               f"scaling.min_workers={f.min_workers}")
        if f.waited_s >= f.wait_limit_s:
            return Plan(PlanAction.ABORT, f"{why}; waited {f.waited_s:.0f}s "
                                 f"(failure.wait_for_workers_s={f.wait_limit_s:g}); add nodes or "
                                 "lower scaling.min_workers")
        return Plan(PlanAction.WAIT, why)
    # more survivors than the world (max_workers, or HSDP's whole groups) stay idle, as spares
    keep = sorted(keeping(f.survivors, f.world_size, f.shard_group_size)[:size])
    if size >= f.world_size:
        ranks = {r: r for r in keep}
        vacant = [r for r in range(f.world_size) if r not in ranks]
        newcomers = vacant + list(range(f.world_size, size))
    else:
        ranks = {old: new for new, old in enumerate(keep)}
        newcomers = list(range(len(keep), size))
    plan = Plan(PlanAction.REFORM, "", world_size=size, ranks=ranks, newcomers=newcomers,
                backoff_s=backoff(f.streak, f.backoff_s, f.backoff_max_s))
    senders = [r for r in keep if r not in f.bad_sources]
    bad = sorted(set(keep) & f.bad_sources)
    failed = f"the state rank {bad[0] if len(bad) == 1 else bad} sent failed its checksum; " \
        if bad else ""
    if f.parallelism == "ddp" and keep and not senders and f.checkpoint_step is None:
        return Plan(PlanAction.ABORT, f"{failed}no other member can send its state and there "
                                      "is no committed checkpoint")
    best = max(senders, key=lambda r: (f.survivors[r], -r)) if senders else None
    if f.parallelism == "ddp" and best is not None \
            and f.survivors[best] >= (f.checkpoint_step or 0):
        top = f.survivors[best]
        plan.source, plan.src, plan.resumed_step = SourceKind.PEER, ranks[best], top
        plan.senders = sorted(ranks[r] for r in senders if f.survivors[r] == top)
        behind = sorted(r for r in keep if f.survivors[r] != top or r not in senders)
        n = len(plan.senders)
        plan.reason = (f"{failed}{n} survivor{'s hold' if n > 1 else ' holds'} the state at "
                       f"step {top}")
        takers = [f"rank{'s' if len(behind) > 1 else ''} {_ranks(behind)} (behind)"] \
            if behind else []
        takers += [f"the newcomer{'s' if len(newcomers) > 1 else ''}"] if newcomers else []
        if takers:
            many = len(takers) > 1 or len(behind) > 1 or len(newcomers) > 1
            plan.reason += (f"; {' and '.join(takers)} take{'' if many else 's'} it from "
                            f"{'them' if n > 1 else 'it'}")
    elif f.parallelism != "ddp" and (held := from_memory(f, ranks)) is not None \
            and held[0] >= (f.checkpoint_step or 0):
        step, plan.holders = held
        plan.source, plan.resumed_step = SourceKind.MEMORY, step
        plan.memory_generation = f.memory_generation
        plan.reason = f"shards rebuilt in memory at step {step}" + _stand_ins(f, ranks)
    elif f.checkpoint_step is not None:
        plan.source, plan.resumed_step = SourceKind.CHECKPOINT, f.checkpoint_step
        why = ("shards were lost" if f.parallelism != "ddp"
               else f"no {'other ' if bad else ''}survivor holds a newer state")
        if f.parallelism != "ddp" and f.memory is not None:
            why = unheld(f)
        plan.reason = f"{failed}{why}: restoring checkpoint step {f.checkpoint_step}"
    elif f.parallelism != "ddp" and f.memory:
        # (no snapshot anywhere: nothing trained since the state began, starting over is next)
        return Plan(PlanAction.ABORT, f"{unheld(f)} and there is no committed checkpoint "
                                      "(set checkpoint.interval_steps to have one)")
    else:
        plan.source, plan.resumed_step = SourceKind.INIT, 0
        plan.reason = "state lost and no committed checkpoint: starting over from step 0"
    if len(keep) < f.world_size and size < f.world_size:
        plan.reason += f"; shrinking {f.world_size} -> {size}"
    elif newcomers:
        plan.reason += f"; newcomers take ranks {newcomers}"
    return plan


def _ranks(ranks: List[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else str(ranks)


def keeping(survivors: Dict[int, int], world_size: int,
            shard_group_size: Optional[int]) -> List[int]:
    """The survivors in the order they are kept when not all of them fit: rank order, except
    under HSDP, where whole surviving shard groups come first (a group of the old world with
    no member lost holds every shard), so a shrink keeps the shards together."""
    if not shard_group_size:
        return sorted(survivors)
    s = shard_group_size
    whole = [g for g in range(world_size // s)
             if all(r in survivors for r in range(g * s, (g + 1) * s))]
    first = [r for g in whole for r in range(g * s, (g + 1) * s)]
    return first + [r for r in sorted(survivors) if r not in first]


def own_holders(world_size: int, shard_group_size: Optional[int]) -> Dict[int, int]:
    """Holders when every member of a healthy group snapshotted: each its own shard (under
    HSDP the first shard group's, one owner per shard)."""
    return {r: r for r in range(shard_group_size or world_size)}


def _stand_ins(f: Facts, ranks: Dict[int, int]) -> str:
    """Which lost ranks came from a stand-in (a replica or a buddy copy), in words."""
    lost = sorted(o for o in range(f.memory_world or f.world_size) if o not in ranks)
    if not lost:
        return ""
    if f.shard_group_size:
        return f" (lost ranks {lost}: from their replicas in the other shard groups)"
    return f" (lost ranks {lost} from their buddies' copies)"


def grow_plan(world_size: int, ready: int, max_workers: int, step: int,
              shard_group_size: Optional[int] = None) -> Plan:
    """A healthy group grows by the ready newcomers (at a step boundary, all members paused):
    members keep their ranks, newcomers are appended, rank 0 sends the state (FSDP2 gathers it
    first: see Source.gather). Under HSDP only whole shard groups join."""
    size = whole_groups(min(max_workers, world_size + ready), shard_group_size)
    return Plan(PlanAction.REFORM, f"growing {world_size} -> {size}", world_size=size,
                ranks={r: r for r in range(world_size)},
                newcomers=list(range(world_size, size)), source=SourceKind.PEER, src=0,
                senders=list(range(world_size)), resumed_step=step)


class NodeIsolation:
    """Counts failures per node; a node that reaches `limit` is no longer used by this job."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: Dict[str, int] = {}
        self.isolated: List[str] = []

    def record(self, node_id: Optional[str]) -> bool:
        """Count one failure on `node_id`. True when this one isolates the node."""
        if not node_id or self.limit <= 0:
            return False
        self.counts[node_id] = self.counts.get(node_id, 0) + 1
        if self.counts[node_id] >= self.limit and node_id not in self.isolated:
            self.isolated.append(node_id)
            return True
        return False


def limits(silent_s: Dict[int, float], limit_s: float, busy: Optional[Dict[int, str]] = None,
           busy_limit_s: Optional[float] = None) -> Dict[int, float]:
    """Each rank's allowed silence: `limit_s` (failure.hang_timeout_s), or `busy_limit_s`
    (failure.busy_hang_timeout_s) for a rank whose last answer said it was in a long phase."""
    busy = busy or {}
    return {r: busy_limit_s if busy_limit_s is not None and busy.get(r) else limit_s
            for r in silent_s}


def hung(silent_s: Dict[int, float], limit_s: float, busy: Optional[Dict[int, str]] = None,
         busy_limit_s: Optional[float] = None) -> List[int]:
    """Ranks silent for longer than their limit (see `limits`) while some peer still answers.
    A frozen process (SIGSTOP, a GIL-bound loop) cannot answer on its control thread; its
    peers, blocked in a collective with it, still can. If nobody answers, the driver's view is in
    doubt (e.g. the whole node is frozen) and nothing is decided here."""
    allowed = limits(silent_s, limit_s, busy, busy_limit_s)
    quiet = [r for r, s in silent_s.items() if s > allowed[r]]
    answering = [r for r, s in silent_s.items() if s <= limit_s]
    if not quiet or not answering:
        return []
    return sorted(quiet)


def all_frozen(silent_s: Dict[int, float], stalled_s: float, limit_s: float,
               busy: Optional[Dict[int, str]] = None,
               busy_limit_s: Optional[float] = None) -> List[int]:
    """No peer to compare with (a one-worker job, or every worker frozen at once): every rank
    silent past its limit AND no step completed for as long. A slow step is not silent (its
    control thread answers), and a driver that stalled itself hears the answers at its next poll,
    so together the two signals mean the workers are frozen."""
    allowed = limits(silent_s, limit_s, busy, busy_limit_s)
    if silent_s and all(s > allowed[r] and stalled_s > allowed[r] for r, s in silent_s.items()):
        return sorted(silent_s)
    return []


def _shards(f: Facts) -> List[List[int]]:
    """The old world's shards, each as the owners holding it: one owner each under FSDP2; under
    HSDP every replica of a shard (see Facts.shard_group_size)."""
    world = f.memory_world or f.world_size
    s = f.shard_group_size
    if not s or world % s:
        return [[o] for o in range(world)]
    return [list(range(k, world, s)) for k in range(s)]


def from_memory(f: Facts, ranks: Dict[int, int]):
    """(step, old rank -> new rank of its holder) for the newest step at which every old
    shard is held by a survivor that stays, or None. One owner per shard (its own snapshot
    preferred, then a surviving replica's, then a buddy's copy), so every row is sent once."""
    if not f.memory:
        return None
    shards = _shards(f)

    def held_at(owner: int) -> Set[int]:
        return {s for s, hs in f.memory.get(owner, {}).items() if any(h in ranks for h in hs)}

    steps = set.intersection(*(set().union(*(held_at(o) for o in owners)) for owners in shards))
    if not steps:
        return None
    step = max(steps)
    holders = {}
    for owners in shards:
        options = [(o, h) for o in owners for h in f.memory.get(o, {}).get(step, [])
                   if h in ranks]
        o, h = min(options, key=lambda oh: (oh[0] != oh[1], oh[0]))
        holders[o] = ranks[h]
    return step, holders


def unheld(f: Facts) -> str:
    """Why the in-memory snapshots cannot rebuild the state, in words."""
    held = f.memory or {}
    if not held:
        return "no survivor holds an in-memory snapshot of the generation that failed"
    gone = [o for owners in _shards(f) if not any(held.get(o) for o in owners)
            for o in owners]
    if gone:
        return (f"the shards of rank{'s' if len(gone) > 1 else ''} "
                f"{gone[0] if len(gone) == 1 else gone} and every copy of them were lost")
    return "no step is held in memory for every shard"


def settle_grace_s(hang_timeout_s: float) -> float:
    """How long survivors get to leave their failed collective before they count as stuck.
    A survivor leaves as soon as its group's connections close: the lost peer's when its process
    is gone, every one when the controller releases it (a survivor of an FSDP2 group can wait on
    queued collectives of a peer that itself waits on the lost one). A hung peer on another node
    is killed by a task that node must start first (seconds on a loaded node). So the grace is
    long, at least SETTLE_MIN_S: killing a survivor would throw its process, its state and its
    warm imports away, and a released one is out in well under a second."""
    return max(hang_timeout_s, SETTLE_MIN_S)


def by_kind(failures: List[WorkerFailure]) -> Dict[FailureKind, List[WorkerFailure]]:
    out: Dict[FailureKind, List[WorkerFailure]] = collections.defaultdict(list)
    for f in failures:
        out[f.kind].append(f)
    return dict(out)


def describe(kind: FailureKind, fs: List[WorkerFailure]) -> str:
    """'worker 2 lost (process exit, pid 4711)' / 'workers [0, 1] failed (task error: ...)'."""
    ranks = fs[0].rank if len(fs) == 1 else [f.rank for f in fs]
    noun = "worker" if len(fs) == 1 else "workers"
    pids = ", ".join(str(f.pid) for f in fs)
    words = kind.value.replace("_", " ")
    if kind.lost:
        if all(f.error.startswith(MEMORY_KILLED) for f in fs):  # the cause, in Ray's words
            return f"{noun} {ranks} {fs[0].error} (pid {pids})"
        return f"{noun} {ranks} lost ({words}, pid {pids})"
    return f"{noun} {ranks} failed ({words}: {fs[0].error})"


def describe_all(failures: List[WorkerFailure]) -> str:
    return "; ".join(describe(k, fs) for k, fs in by_kind(failures).items())
