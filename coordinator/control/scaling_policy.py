"""How many workers to run with: facts (capacity, limits) in, a decision out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ScalingDecision:
    world_size: Optional[int]  # None: not enough capacity, wait
    reason: str


def whole_groups(n: int, shard_group_size: Optional[int]) -> int:
    """The largest world of at most `n` workers that HSDP can form (whole shard groups); `n`
    itself for the other parallelisms (shard_group_size None)."""
    return n - n % shard_group_size if shard_group_size else n


class ScalingPolicy:
    def __init__(self, min_workers: int, max_workers: int,
                 shard_group_size: Optional[int] = None):
        self.min_workers, self.max_workers = min_workers, max_workers
        self.shard_group_size = shard_group_size

    def initial(self, capacity: int) -> ScalingDecision:
        """Start as wide as capacity allows, up to max_workers (HSDP: whole shard groups);
        below min_workers, wait."""
        n = whole_groups(min(self.max_workers, capacity), self.shard_group_size)
        if n < self.min_workers or n < 1:
            groups = f" in whole shard groups of {self.shard_group_size}" \
                if self.shard_group_size else ""
            return ScalingDecision(None, f"capacity for {capacity} workers{groups}, "
                                         f"scaling.min_workers={self.min_workers}")
        why = "max_workers" if n == self.max_workers else f"capacity for {capacity} workers"
        return ScalingDecision(n, f"starting {n} workers ({why}; "
                                  f"min {self.min_workers}, max {self.max_workers})")


@dataclass(frozen=True)
class Replacements:
    want: int  # newcomers still to start (may be <= 0)
    needed: bool  # whether the recovery waits for them (failure.replace, or below min_workers)


def replacements(world_size: int, survivors: int, pending: int, min_workers: int,
                 max_workers: int, replace: bool) -> Replacements:
    """After a loss: start newcomers up to the size before the failure (at least min_workers,
    at most max_workers), counting those already starting. With failure.replace=false the
    survivors carry on alone unless they are fewer than min_workers."""
    target = min(max_workers, max(world_size, min_workers))
    return Replacements(target - survivors - pending, replace or survivors < min_workers)


# A worker whose process died on a live node frees its slot at once, but Ray's view of the free
# resources can take a moment to show it: a recovery that wants a replacement waits this long for
# the slot before it settles for fewer workers.
SLOT_RELEASE_S = 2.0


def await_freed_slot(needed: bool, want: int, on_live_node: bool, spawned: bool,
                     since_loss_s: float) -> bool:
    """Wait for the slots of workers lost on live nodes before shrinking (see SLOT_RELEASE_S);
    a lost node's slots are not coming back."""
    return needed and want > 0 and on_live_node and not spawned \
        and since_loss_s < SLOT_RELEASE_S


@dataclass(frozen=True)
class Growth:
    pause: bool = False  # pause at the next step boundary and re-form with the ready newcomers
    spawn: int = 0  # newcomers (or spares) to start now, if capacity allows
    spares: bool = False  # the ones to start are idle spares, not members-to-be


def growth(world_size: int, max_workers: int, grow: bool, spare_workers: int, ready: int,
           starting: int, pending: int, check_due: bool,
           shard_group_size: Optional[int] = None) -> Growth:
    """While training: below max_workers (and scaling.grow on), start newcomers when capacity
    appears (every scaling.grow_check_s) and pause once they are all ready, so the group grows
    in one pause, not one per newcomer. At max_workers, keep scaling.spare_workers started and
    idle instead, ready to replace a lost worker at once. Under HSDP the group grows by whole
    shard groups only: fewer ready newcomers wait (as spares) for the rest of a group."""
    if world_size >= max_workers or not grow:
        if not spare_workers or not check_due:
            return Growth()
        return Growth(spawn=max(0, spare_workers - pending), spares=True)
    if ready and not starting and \
            whole_groups(min(max_workers, world_size + ready), shard_group_size) > world_size:
        return Growth(pause=True)
    if not check_due:
        return Growth()
    return Growth(spawn=max(0, max_workers - world_size - pending))
