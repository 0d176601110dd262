"""Copies of a rank's in-memory snapshots to its buddy, over a gloo group of their own.

Each rank sends every snapshot it takes to its buddy (a rank on another node) and receives the
snapshots of the ranks it is buddy for, on background threads: the training thread only hands
the newest snapshot over (`offer`, never blocking), and a snapshot still waiting when a newer one
comes is skipped. A frame is three messages on the link group: int64 [header length, data
length, step, world size], the JSON header, the data (one uint8 block); the receiver stores a copy only once the
whole frame is in, so a copy is never partial. The link group is not the training group: a slow
buddy never delays a step, and the link's failure never fails one.

Closing: the worker shuts the link group's connections down (see release.GroupSockets), which
fails every send and receive in flight on both ends; the threads then end.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from coordinator.workers.snapshots import Snapshot, SnapshotStore, from_frame

logger = logging.getLogger(__name__)

class BuddyLink:
    def __init__(self, group, generation: int, rank: int, send_to: Optional[int],
                 recv_from: List[int], store: SnapshotStore):
        self.group, self.generation, self.rank = group, generation, rank
        self.send_to, self.store = send_to, store
        self._cv = threading.Condition()
        self._latest: Optional[Snapshot] = None
        self._closed = False
        self.sent = 0  # snapshots sent whole
        self.received = 0  # copies received whole
        self._threads = []
        if send_to is not None:
            self._threads.append(threading.Thread(target=self._send_loop, daemon=True,
                                                  name=f"buddy-send-{rank}"))
        for src in recv_from:
            self._threads.append(threading.Thread(target=self._recv_loop, args=(src,),
                                                  daemon=True, name=f"buddy-recv-{src}"))
        for t in self._threads:
            t.start()

    def offer(self, snap: Snapshot) -> None:
        """Send `snap` when the link is free (a snapshot not yet sent is replaced)."""
        with self._cv:
            self._latest = snap
            self._cv.notify()

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while self._latest is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                snap, self._latest = self._latest, None
            snap.wait()  # (a copy from device memory may still run)
            header = torch.frombuffer(bytearray(snap.header), dtype=torch.uint8)
            try:
                dist.send(torch.tensor([header.numel(), snap.buffer.numel(), snap.step,
                                        snap.world_size], dtype=torch.int64),
                          dst=self.send_to, group=self.group)
                dist.send(header, dst=self.send_to, group=self.group)
                dist.send(snap.buffer, dst=self.send_to, group=self.group)
            except RuntimeError as e:  # the buddy or the link is gone: no more copies
                logger.debug("rank %d: buddy link to %d closed: %s", self.rank, self.send_to, e)
                return
            self.sent += 1

    def _recv_loop(self, src: int) -> None:
        while True:
            try:
                lengths = torch.empty(4, dtype=torch.int64)
                dist.recv(lengths, src=src, group=self.group)
                header = torch.empty(int(lengths[0]), dtype=torch.uint8)
                dist.recv(header, src=src, group=self.group)
                data = torch.empty(int(lengths[1]), dtype=torch.uint8)
                dist.recv(data, src=src, group=self.group)
            except RuntimeError as e:
                logger.debug("rank %d: buddy link from %d closed: %s", self.rank, src, e)
                return
            snap = from_frame(header.numpy().tobytes(), data, int(lengths[2]), int(lengths[3]))
            self.store.put(self.generation, src, snap)
            self.received += 1

    def close(self) -> None:
        """Stop sending; the caller then shuts the link's connections down (which ends the
        transfers in flight) and joins the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def join(self, timeout_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
