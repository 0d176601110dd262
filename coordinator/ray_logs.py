"""What of Ray's forwarded output reaches the terminal.

Ray prints on the driver's terminal what its workers write and what its raylets report. During an
expected recovery that is noise a user cannot act on: the raylet's multi-line notice that "A worker
died or was killed", and gloo's raw errors from the survivors ("Connection reset by peer", "GLHF").
Our own lines already say what happened. `route_ray_logs` sends those lines to a file in the run
directory (`logs/ray.log`, with the time and the process that wrote them) and leaves everything
else, a task's own prints included, on the terminal as Ray prints it.

It wraps the driver-side printer both paths go through (`ray._private.worker.print_to_stdstream`),
which is not a public API: where a Ray release lacks it, nothing changes and the lines stay on the
terminal.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Callable, Dict, List, Optional

logger = logging.getLogger(__name__)

# Lines of the training processes that only say a peer went away (gloo, c10d, the TCPStore).
PEER_NOISE = re.compile(r"gloo|GLHF|Connection reset by peer|Connection closed by peer|"
                        r"c10d|TCPStore|ProcessGroup", re.IGNORECASE)


# Ray's own processes (their "pid" is a name): the raylets' notices, the GCS's complaints about a
# node that went away ("Failed to kill actor NIL_ID ... GRPC client is shut down").
RAY_SYSTEM = frozenset({"raylet", "gcs_server", "autoscaler", "monitor", "dashboard"})


def is_noise(data: Dict, line: str) -> bool:
    """Whether one forwarded line goes to the file: everything Ray's own processes say, and the
    collective layer's complaints about a lost peer."""
    return data.get("pid") in RAY_SYSTEM or bool(PEER_NOISE.search(line))


class _Router:
    """Stands in for Ray's `print_to_stdstream(data, ignore_prefix)`, which both the workers'
    forwarded output and the raylets' error notices go through."""

    def __init__(self, path: str, terminal: Callable[..., None]):
        self.path, self.terminal = path, terminal
        self.lock = threading.Lock()
        self.routed = 0

    def __call__(self, data: Dict, *args, **kwargs) -> None:
        lines: List[str] = list(data.get("lines") or ())
        noise = [ln for ln in lines if is_noise(data, ln)]
        if noise and self._write(data, noise):
            lines = [ln for ln in lines if not is_noise(data, ln)]
            if not lines:
                return
            data = {**data, "lines": lines}
        self.terminal(data, *args, **kwargs)

    def _write(self, data: Dict, lines: List[str]) -> bool:
        who = data.get("actor_name") or data.get("task_name") or ""
        src = f"{who} pid={data.get('pid')}".strip() + (f" ip={data['ip']}" if data.get("ip")
                                                        else "")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with self.lock:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    for ln in lines:
                        f.write(f"{stamp} ({src}) {ln}\n")
                self.routed += len(lines)
            return True
        except OSError:  # the run directory is gone or full: the terminal gets them instead
            return False


def route_ray_logs(path: str) -> Optional[_Router]:
    """Send Ray's forwarded noise to `path` (see the top of this module). Call before
    `ray.init`, which binds the terminal printer when it starts. Returns the router, or None
    where Ray has no such hook."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return None
    current = getattr(ray_worker, "print_to_stdstream", None)
    if isinstance(current, _Router):
        current.path = path  # a later job of the same process
        return current
    if not callable(current):
        return None
    router = _Router(path, current)
    ray_worker.print_to_stdstream = router
    return router
