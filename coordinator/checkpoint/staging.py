"""A checkpoint's copy to host memory, beside the next step instead of in front of it.

An asynchronous save stalls training only while its state is copied into host buffers. That copy
is a memcpy of the whole state: on this 2-core machine 0.15 s per GB, 11-15% of a synchronous save
to a fast local disk. But most of those bytes (the parameters and the optimizer's state) change
only in the optimizer's step: the next step's forward and backward read them and write none. So
the saver copies now only what is not the optimizer's (buffers, the step, RNG: small), lets the
training thread go on, copies the rest on its persist thread beside the next forward and backward,
and an optimizer step pre-hook (`BesideStep`) holds the next update until that copy has ended.
What the hook waited counts as the save's stall. No Ray in here.

A task whose `loss` changes parameters in place outside the optimizer's step breaks the premise:
`checkpoint.stage_beside_step: false` copies everything at the step boundary instead.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional, Set, Tuple

import torch

logger = logging.getLogger(__name__)

# How long the end of a generation waits for a copy in flight before leaving it (the copy is a
# local memcpy of the state: seconds at most, never a remote call).
RELEASE_WAIT_S = 60.0


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, without autograd's bookkeeping (`to_local()` is an autograd
    function: ~10 us a call, 100+ calls a snapshot); any other tensor as it is."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        return local
    return t.to_local() if type(t).__name__ == "DTensor" and hasattr(t, "to_local") else t


def _storage(t: torch.Tensor) -> int:
    return local_tensor(t).untyped_storage().data_ptr()


def optimizer_storages(optimizer: torch.optim.Optimizer) -> Set[int]:
    """The storages that `optimizer.step()` updates in place and nothing else in the training
    loop writes: its parameters and its per-parameter state."""
    held: Set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            held.add(_storage(p))
    for per_param in optimizer.state.values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor):
                held.add(_storage(v))
    held.discard(0)  # empty tensors share the null storage: never defer on it
    return held


def copy_unheld(sd: Any, held: Set[int]) -> Tuple[Any, int]:
    """`sd` with every tensor whose storage is not in `held` cloned now (the rest stay as they
    are, for the copy beside the next step); and the bytes left for that copy."""
    if isinstance(sd, dict):
        out, later = {}, 0
        for k, v in sd.items():
            out[k], n = copy_unheld(v, held)
            later += n
        return out, later
    if isinstance(sd, (list, tuple)):
        parts = [copy_unheld(v, held) for v in sd]
        return type(sd)(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(sd, torch.Tensor):
        if _storage(sd) in held:
            return sd, sd.numel() * sd.element_size()
        return sd.detach().clone(), 0
    return sd, 0


def side_stream_copy(stage: Callable[[Any], Any], state: Any) -> Any:
    """`stage(state)` off the training stream when `state` holds device tensors: on a side CUDA
    stream that first waits for the work queued so far (the step that made the state), so the
    copy runs beside the next step's kernels instead of queued between them. On the CPU, or
    without device tensors, just `stage(state)`. (Written for the GPU path, which this session
    could not run: see docs/checkpoints.md.)"""
    device = _first_device(state)
    if device is None:
        return stage(state)
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.default_stream(device))
    with torch.cuda.stream(stream):
        out = stage(state)
        stream.synchronize()
    return out


def _first_device(sd: Any) -> Optional[torch.device]:
    if isinstance(sd, dict):
        sd = list(sd.values())
    if isinstance(sd, (list, tuple)):
        for v in sd:
            d = _first_device(v)
            if d is not None:
                return d
        return None
    if isinstance(sd, torch.Tensor) and local_tensor(sd).is_cuda:
        return local_tensor(sd).device
    return None


class BesideStep:
    """Holds the optimizer's next update until the copy of the save in flight has ended (see the
    module docstring). One per saver; `arm` after each save that left a copy for later."""

    def __init__(self) -> None:
        self._hook: Optional[Tuple[Any, Any]] = None  # (optimizer, its pre-hook's handle)
        self._copied: Optional[threading.Event] = None
        self._waited: Optional[Callable[[float], None]] = None

    def arm(self, optimizer: torch.optim.Optimizer, copied: threading.Event,
            waited: Callable[[float], None]) -> None:
        """The next `optimizer.step()` waits for `copied`, and reports the seconds to `waited`."""
        if self._hook is None or self._hook[0] is not optimizer:
            self.close()
            self._hook = (optimizer, optimizer.register_step_pre_hook(self._before_update))
        self._copied, self._waited = copied, waited

    def _before_update(self, optimizer, args, kwargs) -> None:
        copied, waited = self._copied, self._waited
        self._copied = self._waited = None
        if copied is None or copied.is_set():
            return
        t0 = time.time()
        copied.wait()  # set by the persist thread in every case (CheckpointSaver._run)
        if waited is not None:
            waited(time.time() - t0)

    def release(self, timeout_s: float = RELEASE_WAIT_S) -> None:
        """Before anything else writes the state (a restore at a new generation): the copy in
        flight ends first (bounded: it is a memcpy), then the hook goes."""
        copied = self._copied
        if copied is not None and not copied.wait(timeout_s):
            logger.warning("a checkpoint's copy to host memory did not end within %.0f s",
                           timeout_s)
        self.close()

    def close(self) -> None:
        self._copied = self._waited = None
        if self._hook is not None:
            self._hook[1].remove()
            self._hook = None


class HostCopies:
    """The buffers a save copies its state into, kept between saves (and, held by the worker,
    between generations): each tensor of the state dict is copied into a host buffer of its own
    size, found by its key path, so a save after the first copies into memory already there. A
    tensor that is a view (a DDP rank's slice of a replicated tensor, see saver._split_views)
    takes a buffer of the view's size, not of the storage behind it (torch's DefaultStager
    copies whole storages, so each rank would have held a copy of the whole state). Pinned on a
    GPU machine, so device copies run at full speed."""

    def __init__(self) -> None:
        self._bufs: dict = {}
        self._pin = torch.cuda.is_available()

    def stage(self, sd: Any) -> Any:
        return self._copy(sd, ())

    def close(self) -> None:
        self._bufs.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def _buffer(self, path: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            self._bufs.pop(path, None)  # a new size (the world changed): the old one goes first
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)
            self._bufs[path] = buf
        return buf

    def _copy(self, v: Any, path: tuple) -> Any:
        if isinstance(v, dict):
            return {k: self._copy(x, path + (k,)) for k, x in v.items()}
        if isinstance(v, list):
            return [self._copy(x, path + (i,)) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return tuple(self._copy(x, path + (i,)) for i, x in enumerate(v))
        if not isinstance(v, torch.Tensor):
            return v
        local = local_tensor(v)
        buf = self._buffer(path, local)
        buf.copy_(local.detach())
        if local is v:
            return buf
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(buf, v.device_mesh, v.placements, run_check=False,
                                  shape=v.shape, stride=v.stride())
