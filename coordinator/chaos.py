"""Fault injection, in one place: the `chaos` section of the config as a schedule, and the
injector that fires each fault when the job reaches its step.

`ChaosInjector` is an observer (control/observers.py has the protocol and adds it to the job's
bus): the controller's state machine knows nothing of it. It carries each fault out through the worker group and the cluster hooks:
kill_worker (SIGKILL), hang_worker (SIGSTOP), kill_during_checkpoint (the
worker SIGKILLs itself while its next checkpoint is being written), kill_node (remove the simulated
Ray node hosting a rank), add_node, preempt (SIGUSR1 to the driver), storage_outage (checkpoint
writes fail for a while), corrupt_transfer (the next state the rank sends a peer has a bit
flipped after its checksum was taken) and hog_memory (the rank fills its node's memory past Ray's
memory monitor threshold, which then kills a worker). Faults from outside (a `kill -9` of any pid in events.jsonl) need no plan.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, List, Optional

from coordinator.events import Event
from coordinator.config import ChaosConfig, ChaosEvent

logger = logging.getLogger(__name__)


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


@dataclass
class ClusterHooks:
    """What chaos may do to the cluster beyond the workers (the runner fills these in)."""
    remove_node: Callable[[str], bool] = lambda node_id: False  # a simulated node, by id
    add_node: Callable[[], None] = lambda: None
    preempt: Callable[[], None] = lambda: None  # signal the driver as a scheduler would
    storage_outage: Callable[[float], None] = lambda seconds: None  # the driver's own writes
    freeze_node: Callable[[str, float], bool] = lambda node_id, seconds: False  # a simulated node


class ChaosInjector:
    def __init__(self, plan: ChaosPlan, group, bus, hooks: Optional[ClusterHooks] = None):
        self.plan, self.group, self.bus = plan, group, bus
        self.hooks = hooks or ClusterHooks()

    def on_event(self, record) -> None:
        pass

    def on_tick(self, snap) -> None:
        """`snap`: control.observers.Snapshot; faults fire once their step is reached."""
        for ev in self.plan.due(snap.step):
            self.inject(ev, snap.step)

    def summary(self):
        return {}

    def inject(self, ev: ChaosEvent, step: int) -> None:
        ranks = self.group.ranks()
        rank = None
        if isinstance(ev.target, int) and ranks:
            rank = ev.target if ev.target in ranks else ranks[ev.target % len(ranks)]
        pid = self.group.pid(rank) if rank is not None else None
        logger.warning("chaos at step %d: %s%s", step, ev.action,
                       f" rank {rank} (pid {pid})" if rank is not None else "")
        self.bus.emit(Event.CHAOS, action=ev.action, rank=rank, pid=pid, step=step,
                      at_step=ev.at_step)
        if ev.action in ("kill_worker", "hang_worker", "kill_during_checkpoint", "nonfinite",
                         "corrupt_transfer"):
            self.group.chaos(rank, ev.action)
        elif ev.action == "hog_memory":
            self.group.chaos(rank, ev.action, float(ev.seconds or 20.0))
        elif ev.action == "kill_node":
            node = self.group.node_of(rank)
            if not self.hooks.remove_node(node):
                logger.warning("chaos: node %s is not a simulated node of this run: not removed",
                               node)
        elif ev.action == "freeze_node":
            node = self.group.node_of(rank)
            if not self.hooks.freeze_node(node, float(ev.seconds or 15.0)):
                logger.warning("chaos: node %s is not a simulated node of this run: not frozen",
                               node)
        elif ev.action == "add_node":
            for _ in range(int(ev.target or 1)):
                self.hooks.add_node()
        elif ev.action == "preempt":
            self.hooks.preempt()
        elif ev.action == "storage_outage":
            seconds = float(ev.target or 10.0)
            self.hooks.storage_outage(seconds)  # the driver writes the manifests
            for r in ranks:
                self.group.chaos(r, "storage_outage", seconds)
