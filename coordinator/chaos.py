"""Fault plan for the local simulation: the `chaos` section of the config as a list of due faults.

The controller asks `due(step)` on every poll and carries each fault out (see
`Controller._inject`): kill_worker (SIGKILL), hang_worker (SIGSTOP), kill_during_checkpoint (the
worker SIGKILLs itself while its next checkpoint is being written), kill_node (remove the simulated
Ray node hosting a rank), add_node, preempt (SIGUSR1 to the driver) and storage_outage (checkpoint
writes fail for a while). Faults from outside (a `kill -9` of any pid in events.jsonl) need no plan.
"""

from __future__ import annotations

import random
from typing import List

from coordinator.config import ChaosConfig, ChaosEvent


def random_schedule(cfg: ChaosConfig, total_steps: int, max_workers: int) -> List[ChaosEvent]:
    """`cfg.random_faults` faults, seeded by `cfg.random_seed`, spread over the run at least
    `cfg.random_min_gap` steps apart. A removed node comes back half a gap later, so a long soak
    does not drain the cluster."""
    rng = random.Random(cfg.random_seed)
    events: List[ChaosEvent] = []
    step = cfg.random_min_gap
    for _ in range(cfg.random_faults):
        if step >= total_steps:
            break
        action = rng.choice(cfg.random_actions)
        events.append(ChaosEvent(step, action, rng.randrange(max_workers)))
        if action == "kill_node":
            events.append(ChaosEvent(step + max(1, cfg.random_min_gap // 2), "add_node", 1))
        step += cfg.random_min_gap + rng.randrange(cfg.random_min_gap)
    return events


class ChaosPlan:
    def __init__(self, cfg: ChaosConfig, total_steps: int, max_workers: int):
        events = list(cfg.events) + random_schedule(cfg, total_steps, max_workers)
        self.pending: List[ChaosEvent] = sorted(events, key=lambda e: e.at_step)
        self.fired: List[ChaosEvent] = []

    def due(self, step: int) -> List[ChaosEvent]:
        """Faults whose step has been reached, each returned once."""
        out = [e for e in self.pending if e.at_step <= step]
        self.pending = [e for e in self.pending if e.at_step > step]
        self.fired.extend(out)
        return out
