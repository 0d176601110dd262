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
