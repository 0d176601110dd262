"""Storage faults for chaos runs: a fault point that fails checkpoint writes for a while.

The save path takes a fault point as an optional callable (`CheckpointSaver(fault=...)`,
`HashingStream(before_write=...)`, `write_manifest(before_write=...)`) called before each write; it
raises OSError as an unreachable store would. Only chaos passes one in: the default path checks
nothing.
"""

from __future__ import annotations

import time


class StorageOutage:
    """`start(seconds)` makes `check()` raise OSError for that long (from now; a later start
    replaces the end). One per process that writes: a worker's saves, the driver's manifests."""

    def __init__(self) -> None:
        self._until = 0.0  # unix time the outage ends

    def start(self, seconds: float) -> None:
        self._until = time.time() + seconds

    def check(self) -> None:
        """The fault point: raise while the outage lasts, do nothing otherwise."""
        left = self._until - time.time()
        if left > 0:
            raise OSError(f"storage unavailable (injected outage, {left:.1f}s left)")
