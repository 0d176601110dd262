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
