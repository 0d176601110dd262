"""Fencing: a worker of a generation that is over never writes into the checkpoint location.

A node that froze (SIGSTOP, a kernel stall, a network cut) while one of its workers persisted a
save is declared lost and replaced; the job moves on to a later generation, which may restore an
older checkpoint and write the same step directory again. When the node thaws, its stale worker
would resume its writes there. Before each write, the saver's fault point asks the driver's
rendezvous store which generation is current (the driver sets it as each generation begins
forming): a worker of an older one, or one that cannot reach the store to ask, stops writing.

A freeze that falls between the check and the write it guards can still land one write; the
manifest's checksum of every file catches that at load (`checkpoint.verify_on_load`), and such a
file belongs to a save that its ended generation can no longer commit.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Optional

KEY = "generation"  # the driver's store key: the generation being formed or trained


class StaleGeneration(RuntimeError):
    """This worker's generation is over (or cannot be confirmed current): it must not write."""


class GenerationFence:
    """`check()` raises StaleGeneration unless `generation` is still the job's current one. The
    answer is trusted for `every_s` of monotonic time, which keeps running while a process is
    stopped: the first write after a freeze of longer than that asks again."""

    def __init__(self, host: str, port: int, generation: int, every_s: float = 0.2,
                 timeout_s: float = 5.0):
        self.host, self.port, self.generation = host, port, generation
        self.every_s, self.timeout_s = every_s, timeout_s
        self._store = None  # made by the first check, in the thread that writes
        self._ok_at: Optional[float] = None

    def check(self) -> None:
        now = time.monotonic()
        if self._ok_at is not None and now - self._ok_at < self.every_s:
            return
        try:
            if self._store is None:
                import torch.distributed as dist

                self._store = dist.TCPStore(self.host, self.port, is_master=False,
                                            timeout=timedelta(seconds=self.timeout_s))
            current = int(self._store.get(KEY))
        except Exception as e:  # the driver is gone or unreachable: no proof we are current
            raise StaleGeneration(f"cannot confirm generation {self.generation} is current "
                                  f"({type(e).__name__}): not writing") from None
        if current != self.generation:
            raise StaleGeneration(f"generation {self.generation} is over (the job is at "
                                  f"generation {current}): a stale worker does not write")
        self._ok_at = time.monotonic()
