"""What every benchmark under scripts/ prints beside its figures: the machine, medians with their
spread, and the goal next to each figure."""

from __future__ import annotations

import os
import statistics
from importlib.metadata import PackageNotFoundError, version
from typing import Dict, Iterable, List, Optional


def package_version(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine(*packages: str) -> Dict[str, object]:
    """Cores and the versions of torch, ray and `packages` (None where not installed)."""
    out: Dict[str, object] = {"cores": os.cpu_count()}
    for name in ("torch", "ray") + packages:
        out[name.replace("-", "_")] = package_version(name)
    return out


def spread(xs: Iterable[float], digits: int = 4) -> List[float]:
    xs = list(xs)
    return [round(min(xs), digits), round(max(xs), digits)]


def figure(xs: Iterable[float], digits: int = 3) -> Dict[str, object]:
    """A measurement repeated: its median, spread (min, max) and every run, in run order."""
    xs = list(xs)
    return {"median": round(statistics.median(xs), digits), "spread": spread(xs, digits),
            "all": [round(x, digits) for x in xs]}


def goal(value: Optional[float], op: str, target: float) -> Dict[str, object]:
    """A figure checked against its goal: {"value", "goal": "<= 0.5", "met"} (met is None when
    the figure could not be had)."""
    met = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"value": value, "goal": f"{op} {target:g}", "met": met}
