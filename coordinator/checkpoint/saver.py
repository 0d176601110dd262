"""Two-phase asynchronous saves, run inside each worker.

Phase 1 (the only stall): copy the state to CPU memory. The stager keeps its CPU buffers between
saves, so steady-state staging is a memcpy into memory already allocated; and with an optimizer
given, only what the optimizer does not own is copied at the step boundary, the rest on the
persist thread beside the next step, whose update waits for it (checkpoint/staging.py).
Phase 2 (background thread): torch DCP writes this rank's shards through fsspec while training goes
on. DCP's planning collectives run on a separate gloo group made for checkpoints, never on the
training group. Every written byte is hashed on its way out (`checkpoint.hash`: crc32c by default,
or sha256), so the rank can report each file's size and checksum without reading it back; the driver commits (writes the manifest) only when every
rank has reported.

At most one save is in flight. When the next one is due while the previous is still persisting, we
WAIT for it rather than skip: every due checkpoint is written, and the wait shows up as a
`checkpoint_wait` event (raise `checkpoint.interval_steps` if it recurs). Skipping would need the
ranks to agree on it with a collective, and would silently widen the window of lost work.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

from coordinator.checkpoint import errors
from coordinator.checkpoint.errors import StorageError, classify
from coordinator.checkpoint.manifest import step_name
from coordinator.checkpoint.staging import (BesideStep, HostCopies, copy_unheld,
                                             optimizer_storages, side_stream_copy)
from coordinator.checkpoint.storage import HASHES, filesystem, join, new_hash, options_for
from coordinator.checkpoint.writer import DETAIL_CHARS, HashingWriter, no_zip_crc
from coordinator.procmem import release_free_memory
from coordinator.protocol import SaveReport
from train.errors import short_error
from train.state import first_nonfinite

logger = logging.getLogger(__name__)


SPLIT_MIN_NUMEL = 4096


def _split_views(sd: Any, world: int, rank: int, path: Tuple = ()) -> Tuple[Any, Dict]:
    """`sd` with every large replicated tensor (DDP's weights and optimizer state) replaced by
    this rank's slice of it along dim 0 (a view: nothing is copied), and {key path: (full shape,
    full stride)} of those slices. Each rank then stages and writes ~1/N of the bytes: DCP's own
    de-duplication works per whole tensor and would leave one rank writing each big matrix, and
    each rank's staging buffers hold its slice only, not a copy of the whole state. On load, DCP
    assembles the pieces for any world size (or none, as `dcp_to_torch_save` does)."""
    split: Dict[Tuple, Tuple] = {}

    def go(v: Any, at: Tuple) -> Any:
        if isinstance(v, dict):
            return {k: v2 if isinstance(k, str) and k.startswith("rng/") else go(v2, at + (k,))
                    for k, v2 in v.items()}
        if isinstance(v, list):
            return [go(v2, at + (i,)) for i, v2 in enumerate(v)]
        if isinstance(v, torch.Tensor) and not hasattr(v, "device_mesh") and v.dim() >= 1 \
                and v.numel() >= SPLIT_MIN_NUMEL and v.shape[0] >= world:
            split[at] = (v.shape, v.stride())
            return torch.chunk(v, world, dim=0)[rank]
        return v

    return go(sd, path), split


def _as_shards(sd: Any, split: Dict, mesh, path: Tuple = ()) -> Any:
    """The staged slices of `_split_views` as DTensors sharded on dim 0 over the checkpoint
    group (what DCP writes and reassembles)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(sd, dict):
        return {k: _as_shards(v, split, mesh, path + (k,)) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_as_shards(v, split, mesh, path + (i,)) for i, v in enumerate(sd)]
    if path in split:
        shape, stride = split[path]
        return DTensor.from_local(sd, mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride)
    return sd


# How long the training thread waits for a save in flight before the ranks compare notes again
# (see CheckpointSaver._settle): short, so a rank waiting in that all-reduce for a slower peer
# never nears the collective timeout, however long a healthy save takes.
SETTLE_ROUND_S = 0.25
# A failed save removes the files it wrote for causes that leave the storage writable (a full
# disk frees what the partial step took); within this many seconds, then it leaves the rest
# (uncommitted: no manifest).
CLEANUP_KINDS = frozenset({errors.DISK_FULL, errors.PERMISSION, errors.OTHER})
CLEANUP_BUDGET_S = 5.0


@dataclass
class _Persist:
    """One save, persisted by a thread of its own (a stuck one cannot be stopped, only left)."""
    seq: int  # saves of this saver so far: the same on every rank of the generation
    step: int
    group: Any  # the checkpoint group it writes over
    stall_s: float
    waited_s: float
    t0: float = field(default_factory=time.time)
    last_progress: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    copied: threading.Event = field(default_factory=threading.Event)  # the state is in host memory
    reported: bool = False  # its SaveReport is out (from its thread, or from give_up)
    abandoned: bool = False

    def tick(self) -> None:
        self.last_progress = time.monotonic()

    def add_stall(self, seconds: float) -> None:
        """The next update waited `seconds` for this save's copy (staging.BesideStep)."""
        self.stall_s += seconds

    def done(self) -> bool:
        return self.future.done()


def make_stager() -> HostCopies:
    """Staging buffers for saves (staging.HostCopies): host memory, kept between saves and
    reused for the same tensors (a copy into memory already allocated)."""
    return HostCopies()


class CheckpointSaver:
    def __init__(self, uri: str, storage_options: Dict[str, Any], async_: bool, rank: int,
                 group, retries: int = 3, backoff_s: float = 1.0, thread_count: int = 2,
                 split_replicated: bool = False, generation: int = 0,
                 reports: Optional["collections.deque[SaveReport]"] = None,
                 fault: Optional[Callable[[], None]] = None, persist_timeout_s: float = 60.0,
                 agree_group=None, new_group: Optional[Callable[[], Any]] = None,
                 hash_name: str = HASHES[0], stager: Optional[HostCopies] = None):
        """`group`: the gloo group DCP's collectives run on (None: no process group, one rank).
        `agree_group`: the group the training thread agrees on a save in flight over (None: the
        default group); `new_group`: makes a fresh checkpoint group when a stuck save is given up
        (default: `dist.new_group(backend="gloo")`; every rank calls it at the same point).
        `persist_timeout_s`: see `_settle`. `fault`: a fault point called before every write of
        every save (chaos only: a `checkpoint.faults.StorageOutage`'s `check`); None, the
        default, checks nothing. `hash_name`: the checksum of every file (one of
        storage.HASHES). `stager`: the staging buffers to copy into (`make_stager`), kept by the
        caller across savers so a new generation reuses them instead of allocating a second
        copy of the state; None: this saver's own, released by `close`."""
        new_hash(hash_name)  # a bad name fails here, not in the background
        self.hash_name = hash_name
        self.uri, self.rank, self.group, self.async_ = uri, rank, group, async_
        self.generation = generation
        self.world_size = group.size() if group is not None else 1
        self.storage_options = dict(storage_options or {})
        self.options = options_for(uri, storage_options)
        self.retries, self.backoff_s, self.thread_count = retries, backoff_s, thread_count
        self.persist_timeout_s = persist_timeout_s
        self.fault = fault
        self._agree_group = agree_group
        self._new_group = new_group or (lambda: dist.new_group(backend="gloo"))
        # Finished saves, drained by the worker's heartbeat. The worker may pass its own deque so
        # reports outlive this saver (a group re-forms while a save is being reported).
        self.reports: "collections.deque[SaveReport]" = (
            reports if reports is not None else collections.deque())
        self._lock = threading.Lock()
        self._writer: Optional[HashingWriter] = None
        self._current: Optional[_Persist] = None
        self.seq = 0
        self.given_up = 0  # saves given up for want of an answer from storage
        self._own_stager = stager is None
        self._stager = stager if stager is not None else make_stager()
        self._beside = BesideStep()
        self.last_step: Optional[int] = None
        self._split = split_replicated
        self._mesh = self._make_mesh()

    def _make_mesh(self):
        if not self._split or self.group is None:
            return None
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(self.group, "cpu")

    def save(self, step: int, state_dict: Dict[str, Any], started: Optional[float] = None,
             optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Stage `state_dict` and persist it in the background (or before returning, without
        async). Call on every rank at the same step. `started`: when the caller began building
        `state_dict`, so the stall counts it. `optimizer` (async only): the one whose step alone
        updates the parameters and optimizer state in `state_dict`; their copy then runs beside
        the next step and its update waits for it (checkpoint/staging.py)."""
        t0 = time.time()
        waited = time.time() - t0 if self._settle() else 0.0  # wait policy: module docstring
        later, split = 0, {}
        if self._mesh is not None:
            state_dict, split = _split_views(state_dict, self._mesh.size(), self.rank)
        if self.async_ and optimizer is not None:
            state_dict, later = copy_unheld(state_dict, optimizer_storages(optimizer))
        staged = None if later else self._stage(state_dict, split)
        stall = time.time() - (started if started is not None else t0)
        self.last_step = step
        self.seq += 1
        p = self._current = _Persist(self.seq, step, self.group, stall, waited)
        if staged is not None:
            p.copied.set()
        else:
            self._beside.arm(optimizer, p.copied, p.add_stall)
        threading.Thread(target=self._run, args=(p, state_dict if staged is None else staged,
                                                 staged is None, split),
                         name=f"ckpt-persist-{step}", daemon=True).start()
        if not self.async_:
            self._settle()

    def _stage(self, state_dict: Dict[str, Any], split: Dict) -> Dict[str, Any]:
        """The copy into the staging buffers; this rank's slices (`split`) become its shards."""
        staged = self._stager.stage(state_dict)
        if split:
            staged = _as_shards(staged, split, self._mesh)
        return staged

    def wait(self) -> None:
        """Until the save in flight is done or given up (every rank calls it at the same
        point)."""
        self._settle()

    def close(self) -> None:
        """A clean end of the generation (no collective: peers may have left): wait for the save
        in flight while storage answers, else leave it, reported failed."""
        p = self._current
        while p is not None and not p.done() \
                and time.monotonic() - p.last_progress <= self.persist_timeout_s:
            futures_wait([p.future], timeout=SETTLE_ROUND_S)
        if p is not None and not p.done():
            self._abandon_reported(p)
        self._current = None
        self._beside.release()
        if self._own_stager:
            self._stager.close()

    @property
    def in_flight(self) -> bool:
        """A save is being written (its staged copy is still read)."""
        return self._current is not None and not self._current.done()

    def abandon(self) -> None:
        """Give up on a save in flight without waiting for it: its group is broken (a peer was
        lost), so it cannot complete; it never reports success, so it is never committed."""
        if self._current is not None:
            self._current.abandoned = True
        self._current = None
        self._beside.release()  # a restore may write the state next: the copy ends first

    # ---- a save in flight, agreed by every rank --------------------------------------------
    def flags(self) -> Tuple[int, int]:
        """This rank's view of its save in flight, for a MAX all-reduce: (its number if one is
        in flight, else 0; its number if it is in flight and storage answered one of its writes
        within persist_timeout_s, else 0). Agreed over the ranks: a save is stuck when some rank
        has it in flight and on none does storage answer."""
        p = self._current
        if p is None or p.done():
            return 0, 0
        answering = time.monotonic() - p.last_progress <= self.persist_timeout_s
        return p.seq, p.seq if answering else 0

    def stuck(self, busy: int, answering: int) -> bool:
        """Whether agreed `flags` (MAX over the ranks) say the save in flight is stuck. The
        same on every rank: `seq` counts this generation's saves alike everywhere, so a vote
        about a save that has been replaced since is ignored by all."""
        return busy != 0 and answering < busy and busy == self.seq

    def give_up(self) -> None:
        """The ranks agreed that the save in flight is stuck (`stuck`): every rank calls this at
        the same point. Its thread cannot be stopped; it is left, reported failed (never
        committed), and later saves use a fresh checkpoint group, since the stuck thread may
        still enter a collective on the old one when storage answers again."""
        p = self._current
        if p is not None and not p.done():
            self._abandon_reported(p)
        self._current = None
        self.given_up += 1
        if self.group is not None:
            self.group = self._new_group()
            self.world_size = self.group.size()
            self._mesh = self._make_mesh()

    def _abandon_reported(self, p: _Persist) -> None:
        p.abandoned = True
        words = (f"storage did not answer within {self.persist_timeout_s:g} s "
                 "(checkpoint.persist_timeout_s): the save was given up")
        if self._report(p, SaveReport(p.step, self.rank, False, {}, p.stall_s, p.waited_s,
                                      time.time() - p.t0, 0, words,
                                      generation=self.generation, world_size=self.world_size)):
            logger.info("rank %d: checkpoint step %d given up: %s", self.rank, p.step, words)

    def _settle(self) -> bool:
        """Wait for the save in flight, with every rank: in rounds of SETTLE_ROUND_S, the ranks
        agree (one small all-reduce) whether some rank still has it in flight, and whether
        storage answered any of its writes within persist_timeout_s on some rank. Done
        everywhere: return. In flight but no answer anywhere: give it up (all ranks at once).
        Returns whether any rank had a save in flight (so the caller waited)."""
        waited = False
        while True:
            p = self._current
            if p is not None and not p.done():
                futures_wait([p.future], timeout=SETTLE_ROUND_S)
            busy, answering = self.flags()
            if self.group is not None:
                agreed = torch.tensor([busy, answering], dtype=torch.int64)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._agree_group)
                busy, answering = int(agreed[0]), int(agreed[1])
            if not busy:
                return waited
            waited = True
            if self.stuck(busy, answering):
                self.give_up()
                return waited

    # ---- the persist thread ----------------------------------------------------------------
    @property
    def files_written(self) -> int:
        """Files the save in flight has finished writing (for fault injection in tests)."""
        return len(self._writer.fs.records) if self._writer is not None else 0

    def set_fault(self, fault: Optional[Callable[[], None]]) -> None:
        """Install a fault point from another thread (chaos): the save in flight meets it from its
        next file on, later saves from their start."""
        self.fault = fault
        writer = self._writer
        if writer is not None:
            writer.fs.before_write = fault

    def _report(self, p: _Persist, rep: SaveReport) -> bool:
        """Hand `rep` to the heartbeat, once per save (its thread and give_up may race)."""
        with self._lock:
            if p.reported:
                return False
            p.reported = True
            self.reports.append(rep)
            return True

    def _run(self, p: _Persist, state: Dict[str, Any], copy: bool, split: Dict) -> None:
        """The persist thread: the copy to host memory first when `copy` (the save left it for
        beside the next step), then the write."""
        try:
            if copy:
                try:
                    state = side_stream_copy(lambda sd: self._stage(sd, split), state)
                finally:
                    p.copied.set()  # the next update goes on whatever happened
                p.t0 = time.time()  # persist_s: the write alone
            self._persist(p, state)
        except BaseException as e:  # a bug: report it rather than leave the save pending
            logger.error("rank %d: checkpoint step %d: %s", self.rank, p.step, short_error(e))
            self._report(p, SaveReport(p.step, self.rank, False, {}, p.stall_s, p.waited_s,
                                       time.time() - p.t0, 0, short_error(e), generation=
                                       self.generation, world_size=self.world_size))
        finally:
            release_free_memory()  # what the write's threads freed goes back to the kernel
            p.future.set_result(None)

    def _persist(self, p: _Persist, staged: Dict[str, Any]) -> None:
        path = join(self.uri, step_name(p.step))
        touched: List[str] = []
        error, detail, attempt = errors.StorageError(errors.OTHER, "not attempted"), "", 0
        # A state holding a NaN or an infinity is written (DCP's collectives need every rank)
        # but reported failed, so the checkpoint is never committed and never restored.
        poisoned = first_nonfinite(staged)
        for attempt in range(1, self.retries + 1):
            if p.abandoned or (p.group is not None and not dist.is_initialized()):
                # The group failed while this save waited to retry. Never retry then: without a
                # process group DCP would fall back to a single-process save into the step's
                # directory, where a later generation may be writing the same step.
                logger.info("rank %d: checkpoint step %d abandoned (the group failed)",
                            self.rank, p.step)
                return
            p.tick()
            writer = None
            try:
                writer = self._writer = HashingWriter(path, self.options, self.thread_count,
                                                self.fault, p.tick, self.hash_name)
                with no_zip_crc():
                    dcp.save(staged, storage_writer=writer, process_group=p.group)
                if poisoned is not None:
                    self._report(p, SaveReport(
                        p.step, self.rank, False, {}, p.stall_s, p.waited_s, time.time() - p.t0,
                        attempt, f"rank {self.rank}'s state holds non-finite values ({poisoned})",
                        generation=self.generation, world_size=self.world_size))
                    return
                self._report(p, SaveReport(p.step, self.rank, True, dict(writer.fs.records),
                                           p.stall_s, p.waited_s, time.time() - p.t0, attempt,
                                           generation=self.generation,
                                           world_size=self.world_size))
                return
            except (Exception, CheckpointException) as e:  # (the latter is a BaseException)
                if p.abandoned:
                    logger.info("rank %d: checkpoint step %d abandoned", self.rank, p.step)
                    return
                if writer is not None:
                    touched += writer.fs.touched
                error = errors.classify(e, path)
                detail = (writer.fs.detail if writer is not None and writer.fs.detail
                          else "".join(traceback.format_exception(e)))[-DETAIL_CHARS:]
                # The driver says it once for all ranks (checkpoint_failed); the details go to
                # the run directory's log with the report, not to the terminal.
                logger.info("rank %d: checkpoint step %d attempt %d/%d failed: %s", self.rank,
                            p.step, attempt, self.retries, error.words)
                # Every rank sees the same CheckpointException (DCP gathers the failures), so
                # every rank takes the same decision here.
                if not error.retryable or attempt == self.retries:
                    break
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        self._report(p, SaveReport(p.step, self.rank, False, {}, p.stall_s, p.waited_s,
                                   time.time() - p.t0, attempt, error.words,
                                   generation=self.generation, world_size=self.world_size,
                                   detail=detail))
        if error.kind in CLEANUP_KINDS and touched:
            self._remove(p, path, touched)

    def _remove(self, p: _Persist, path: str, touched: List[str]) -> None:
        """Remove the files a failed save wrote (best effort, within CLEANUP_BUDGET_S), and its
        step directory once empty. Only this save's own files: a step directory may hold
        another rank's files, or files of an older save of the same step."""
        deadline = time.monotonic() + CLEANUP_BUDGET_S
        fs, root = filesystem(path, self.storage_options)
        left = list(dict.fromkeys(touched))
        while left and time.monotonic() < deadline and not p.abandoned:
            name = left.pop(0)
            try:
                if fs.exists(name):
                    fs.rm_file(name)
            except Exception as e:
                logger.info("rank %d: could not remove %s: %s", self.rank, name, short_error(e))
            p.tick()
        if left:
            logger.info("rank %d: checkpoint step %d: %d partial files left (uncommitted)",
                        self.rank, p.step, len(left))
        try:
            if not fs.ls(root):
                fs.rmdir(root)
        except Exception:  # another rank's files are still there, or it is gone already
            pass


def load_checkpoint(path: str, storage_options: Dict[str, Any], template_fn, group):
    """Load a checkpoint into the state dict `template_fn(saved_sizes)` builds, resharding to its
    shapes (DCP). Tensors are read with torch.load(weights_only=True) by DCP."""
    options = options_for(path, storage_options)
    reader = FsspecReader(path, **options)
    metadata = reader.read_metadata()
    saved = {k: md.size for k, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}
    sd = template_fn(saved)
    dcp.load(sd, storage_reader=FsspecReader(path, **options), process_group=group)
    return sd
