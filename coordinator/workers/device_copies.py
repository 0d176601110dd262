"""Host copies of device memory for the in-memory snapshots (workers/snapshots.py): the copy
runs beside the next step, and the next in-place update of what it copies waits for it.

Measured on an H200 (docs/benchmarks.md): a 12 GB shard copied on the training thread blocked
it 0.22 s a step (55 GB/s into pinned memory) against a 0.50 s step; beside the step it costs
8% of the step and 1.7 ms of blocking. No Ray in here.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

_COPY_STREAMS: Dict[int, Any] = {}  # device index -> the side stream device->host copies run on


def copy_out(parts: List[torch.Tensor], size: int) -> Tuple[torch.Tensor, Any]:
    """`parts` (uint8, each on the CPU or a GPU) end to end in one new host buffer; returns it
    and, when parts are in device memory, the CUDA event that marks the copy's end (None
    otherwise: the buffer is full on return).

    Parts in device memory go to a pinned buffer on a side stream, after the work queued so far
    (the step that made them), and the training thread goes on at once: the copy runs over the
    bus while the next step's forward and backward compute. Whoever reads the buffer waits for
    the event (Snapshot.wait), and so must the next in-place update of the tensors copied (see
    ShardMemory: an optimizer pre-hook makes the training stream wait for it, on the GPU, not
    the CPU). torch's caching host allocator hands the pinned memory of a snapshot the store
    dropped to a later one (no new pinning per step)."""
    on_gpu = any(p.is_cuda for p in parts)
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=on_gpu)
    if not on_gpu:
        if parts:
            torch.cat(parts, out=buffer)
        return buffer, None
    device = next(p.device for p in parts if p.is_cuda)
    stream = _COPY_STREAMS.get(device.index)
    if stream is None:
        stream = _COPY_STREAMS[device.index] = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    at = 0
    with torch.cuda.stream(stream):
        for p in parts:
            n = p.numel()
            buffer[at:at + n].copy_(p, non_blocking=p.is_cuda)
            if p.is_cuda:
                p.record_stream(stream)  # not reused by the allocator before the copy is done
            at += n
        ready = torch.cuda.Event()
        ready.record(stream)
    return buffer, ready


def _pin_ahead(nbytes: int, count: int) -> None:
    """Pin `count` host buffers of `nbytes` and free them: torch's caching host allocator keeps
    them for the next snapshots (pinning 12 GB took ~7 s on an H200 machine; reusing, none)."""
    try:
        held = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        del held
    except RuntimeError as e:  # out of pinnable memory: the snapshots pin as they go
        logger.warning("pinning host memory for snapshots ahead: %s", e)


class DeviceCopies:
    """One rank's snapshots of device memory while they copy (see take): the optimizer's next
    in-place update must not start before the copy of what it updates has ended. A step
    pre-hook makes the training stream wait on the newest copy's event, on the GPU, so the CPU
    goes on; the first such snapshot also has the pinned memory of the next `ahead` made on a
    background thread, so that only the first waits for pinning."""

    def __init__(self, ahead: int) -> None:
        self.ahead = ahead  # buffers pinned ahead: the snapshots held at once
        self._copying: Any = None  # the newest copy's CUDA event, until an update waited on it
        self._hook: Optional[Tuple[Any, Any]] = None  # (optimizer, its hook's handle)
        self._pinned_ahead = False

    def taken(self, optimizer, ready: Any, nbytes: int) -> None:
        """A snapshot of `nbytes` was taken; `ready`: its copy's CUDA event (None: on the host,
        nothing to wait for)."""
        if ready is None:
            return
        self._copying = ready
        if self._hook is None or self._hook[0] is not optimizer:
            self.close()
            self._hook = (optimizer, optimizer.register_step_pre_hook(self._before_update))
        if not self._pinned_ahead:
            self._pinned_ahead = True
            threading.Thread(target=_pin_ahead, args=(nbytes, self.ahead), name="pin-ahead",
                             daemon=True).start()

    def _before_update(self, optimizer, args, kwargs) -> None:
        ready, self._copying = self._copying, None
        if ready is not None:
            torch.cuda.current_stream().wait_event(ready)

    def close(self) -> None:
        """The optimizer is done with (a generation ends): the copy in flight ends first."""
        if self._copying is not None:
            self._copying.synchronize()
            self._copying = None
        if self._hook is not None:
            self._hook[1].remove()
            self._hook = None
