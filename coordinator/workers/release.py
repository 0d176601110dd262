"""Releasing a worker from a failed process group in place, without killing it.

A survivor of a lost peer can stay blocked in a collective: under gloo, FSDP2 keeps several
collectives queued, and one survivor waits on another that waits on the lost (or frozen) rank,
so no one closes a connection and every one of them waits for the collective timeout. In torch
2.13 `ProcessGroupGloo.abort()` does not wake a thread blocked on a frozen peer.

What does wake it is the group's own transport going away: a connected socket shut down makes
gloo fail every pending and later operation on it ("Connection closed by peer"), and the thread
returns with an error it can handle. So each worker records the sockets its process groups open
(the sockets that appear while a group is created), and on the controller's word shuts them down.
Listening sockets are left alone (gloo aborts the process when its listener fails), and so is
everything else the process has open (Ray's connections, the rendezvous store).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import Dict, Iterator, Optional, Tuple

logger = logging.getLogger(__name__)

_FD_DIR = "/proc/self/fd"


def _open_sockets() -> Dict[int, str]:
    """fd -> its link ('socket:[inode]') for every socket the process has open now."""
    out: Dict[int, str] = {}
    try:
        names = os.listdir(_FD_DIR)
    except OSError:  # no /proc (not Linux): nothing can be tracked, release does nothing
        return out
    for name in names:
        try:
            link = os.readlink(f"{_FD_DIR}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(name)] = link
    return out


def _peer(sock: socket.socket) -> Optional[Tuple[str, int]]:
    try:
        addr = sock.getpeername()
    except OSError:
        return None
    return (addr[0], addr[1]) if isinstance(addr, tuple) else None


class GroupSockets:
    """The connected sockets of one generation's process groups. `track` wraps the creation of
    a group; `release` shuts its sockets down (once a generation is over: never the current one
    while it trains). Thread-safe: groups are created on the train and persist threads, the
    release comes on the control thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation: Optional[int] = None
        self._fds: Dict[int, str] = {}
        self._store_port: Optional[int] = None  # the rendezvous store's: never shut down

    def begin(self, generation: int, store_port: int) -> None:
        """A new generation: what was recorded before belongs to a group already destroyed."""
        with self._lock:
            self._generation, self._fds = generation, {}
            self._store_port = store_port

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        before = _open_sockets()
        try:
            yield
        finally:
            new = {fd: link for fd, link in _open_sockets().items() if before.get(fd) != link}
            with self._lock:
                self._fds.update(new)

    def release(self, generation: int) -> int:
        """Shut down the connected sockets of `generation`'s groups (nothing if the worker is in
        another generation by now). Returns how many were shut down."""
        with self._lock:
            if generation != self._generation:
                return 0
            fds, self._fds = self._fds, {}
            store_port = self._store_port
        done = 0
        for fd, link in fds.items():
            try:
                if os.readlink(f"{_FD_DIR}/{fd}") != link:
                    continue  # closed since (its number may be another file's now)
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue  # a listener: gloo aborts the process if its accept fails
                peer = _peer(sock)
                if sock.type != socket.SOCK_STREAM or peer is None or peer[1] == store_port:
                    continue
                sock.shutdown(socket.SHUT_RDWR)
                done += 1
            except OSError as e:  # not connected (any more): nothing to wake
                logger.debug("socket %d not shut down: %s", fd, e)
            finally:
                sock.close()  # the duplicate only; the group closes its own on destroy
        return done
