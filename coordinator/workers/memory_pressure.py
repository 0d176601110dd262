"""Workers killed by Ray's memory monitor, and the nodes it found short of memory.

Ray's raylet kills a worker when its node's memory use crosses `RAY_memory_usage_threshold`
(0.95 by default). To the driver that is a dead actor like any other, with Ray's explanation in
the error's text. It is a fault of the node, not of the job: the worker is lost like any lost
worker (its rank comes back from its peers' memory), it is said in one line ("worker 2 killed
by Ray's memory monitor: node at 96% memory"), and the node gets no new worker (replacement or
spare) for `failure.memory_pressure_s`: a replacement placed there would meet the same pressure
and be killed in turn. Meanwhile the job shrinks onto what it has, or waits for capacity
elsewhere, as after any loss with no room for a replacement.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Dict, List, Optional

from coordinator.protocol import MEMORY_KILLED

logger = logging.getLogger(__name__)

# What Ray writes when its memory monitor kills a worker (Ray 2.4x-2.6x): the exit detail says
# the node ran low on memory, the usage line says how far ("... was 22.9GB used / 24.0GB limit
# (0.954...)"; older releases: "... was 22.9 / 24.0 GB (0.954...)")
_MARKERS = ("running low on memory", "memory usage threshold", "NODE_OUT_OF_MEMORY",
            "OOM kill reason")
_USAGE = re.compile(r"Memory on the node.*? was [^()]*?\(([0-9.]+)\)")


def memory_kill(text: str) -> Optional[str]:
    """The one-line reason when `text` (a dead actor's error) says Ray's memory monitor killed
    it, else None."""
    if not any(m in text for m in _MARKERS):
        return None
    usage = _USAGE.search(text)
    if usage:
        try:
            return f"{MEMORY_KILLED}: node at {float(usage.group(1)) * 100:.0f}% memory"
        except ValueError:
            pass
    return f"{MEMORY_KILLED}: node short of memory"


class MemoryPressure:
    """Nodes where Ray's memory monitor killed a worker of this job, each until a time."""

    def __init__(self, hold_s: float, clock=time.monotonic):
        self.hold_s, self._clock = hold_s, clock
        self._until: Dict[str, float] = {}

    def killed_on(self, node_id: Optional[str]) -> None:
        if not node_id or self.hold_s <= 0:
            return
        fresh = node_id not in self.nodes()
        self._until[node_id] = self._clock() + self.hold_s
        if fresh:
            logger.warning("node %s is short of memory: no new worker is placed on it for %gs "
                           "(failure.memory_pressure_s)", node_id[:8], self.hold_s)

    def nodes(self) -> List[str]:
        """The nodes no new worker goes to now."""
        now = self._clock()
        for node in [n for n, t in self._until.items() if t <= now]:
            del self._until[node]
            logger.info("node %s may take workers again (failure.memory_pressure_s passed)",
                        node[:8])
        return sorted(self._until)
