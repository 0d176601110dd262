"""How many workers to run with: facts (capacity, limits) in, a decision out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ScalingDecision:
    world_size: Optional[int]  # None: not enough capacity, wait
    reason: str


class ScalingPolicy:
    def __init__(self, min_workers: int, max_workers: int):
        self.min_workers, self.max_workers = min_workers, max_workers

    def initial(self, capacity: int) -> ScalingDecision:
        """Start as wide as capacity allows, up to max_workers; below min_workers, wait."""
        if capacity < self.min_workers:
            return ScalingDecision(None, f"capacity for {capacity} workers, "
                                         f"scaling.min_workers={self.min_workers}")
        n = min(self.max_workers, capacity)
        why = "max_workers" if n == self.max_workers else f"capacity for {capacity} workers"
        return ScalingDecision(n, f"starting {n} workers ({why}; "
                                  f"min {self.min_workers}, max {self.max_workers})")
