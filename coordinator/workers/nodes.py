"""What the driver can learn of, and do to, a worker's node: is it reachable, kill a pid on it."""

from __future__ import annotations

import socket

import ray


def kill_ray_process(pid: int) -> bool:
    """SIGKILL a worker process of this machine. False when it is gone already, or when the pid
    now belongs to another program (it was reused): that one is left alone."""
    import os
    import signal

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"ray" not in f.read():
                return False
    except OSError:
        pass  # no /proc (not Linux): trust the pid
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


@ray.remote(num_cpus=0, max_retries=0)
def reap(pid: int) -> bool:
    """SIGKILL a worker process from its own node (the node's raylet runs this task)."""
    return kill_ray_process(pid)


def node_reachable(node_id: str, timeout_s: float = 1.0) -> bool:
    """Is the node alive? The GCS may take seconds to mark a dead node, so besides its view we
    try the node's raylet port: a machine that is gone refuses or does not answer."""
    for node in ray.nodes():
        if node["NodeID"] != node_id:
            continue
        if not node.get("Alive"):
            return False
        try:
            with socket.create_connection((node["NodeManagerAddress"],
                                           int(node["NodeManagerPort"])), timeout=timeout_s):
                return True
        except (OSError, KeyError, ValueError):
            return False
    return False
