"""A process's peak resident memory, as the kernel counts it (`VmHWM` in /proc/<pid>/status):
what each worker reports in its heartbeats (summary.json's `peak_rss_mb`), and what the scale
benchmark reads for the baselines' processes."""

from __future__ import annotations

from typing import Optional, Union


def peak_rss_bytes(pid: Union[int, str] = "self") -> Optional[int]:
    """The peak resident set size of `pid` in bytes, or None where /proc does not say (not
    Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_trim():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim). A save's
    background threads free hundreds of MB of temporaries (DCP's per-item copies) in arenas of
    their own, which glibc keeps: without this, a worker's resident memory crept up by ~0.2 GB
    a save at 1.2 GB of state. A no-op where the C library is not glibc."""
    if _TRIM is not None:
        _TRIM(0)


def _meminfo() -> dict:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def hog_memory(hold_s: float, chunk: int = 256 << 20) -> int:
    """Chaos `hog_memory`: fill this node's memory until Ray's memory monitor kills a worker
    (this one, whose task started last, as a rule), for up to `hold_s` seconds, then let it go;
    at once if memory comes back meanwhile (the monitor killed another worker: one fault).
    Never below a floor of free memory (what Ray's threshold, RAY_memory_usage_threshold, leaves
    free, less 2% of the node, and at least 0.5 GB), so the kernel's own OOM killer is not the
    one that acts. Returns the bytes held (if the process is still alive to say so)."""
    import os
    import time

    import torch

    threshold = float(os.environ.get("RAY_memory_usage_threshold", "0.95"))
    total = _meminfo()["MemTotal"]
    floor = max(512 << 20, int((1 - threshold - 0.02) * total))
    held = []
    deadline = time.monotonic() + hold_s
    low = None  # the least MemAvailable seen
    while time.monotonic() < deadline:
        available = _meminfo()["MemAvailable"]
        low = available if low is None else min(low, available)
        if available > low + (256 << 20):
            break  # memory came back: the monitor killed someone; one fault, not a cascade
        if available > floor + chunk:
            held.append(torch.ones(chunk, dtype=torch.uint8))  # written: resident
        else:
            time.sleep(0.05)
    total_held = sum(t.numel() for t in held)
    del held
    return total_held
