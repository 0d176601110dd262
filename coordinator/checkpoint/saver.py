"""Two-phase asynchronous saves, run inside each worker.

Phase 1 (the only stall): at a step boundary, copy the state to CPU memory. The stager keeps its
CPU buffers between saves, so steady-state staging is a memcpy into memory already allocated.
Phase 2 (background thread): torch DCP writes this rank's shards through fsspec while training goes
on. DCP's planning collectives run on a separate gloo group made for checkpoints, never on the
training group. Every written byte is hashed on its way out, so the rank can report each file's
size and sha256 without reading it back; the driver commits (writes the manifest) only when every
rank has reported.

At most one save is in flight. When the next one is due while the previous is still persisting, we
WAIT for it rather than skip: every due checkpoint is written, and the wait shows up as a
`checkpoint_wait` event (raise `checkpoint.interval_steps` if it recurs). Skipping would need the
ranks to agree on it with a collective, and would silently widen the window of lost work.
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from coordinator.checkpoint.manifest import MANIFEST, step_name
from coordinator.checkpoint.storage import HashingStream, basename, join, options_for
from coordinator.protocol import SaveReport
from train.errors import short_error
from train.state import first_nonfinite

logger = logging.getLogger(__name__)


class _HashingFileSystem(FileSystem):
    """DCP's fsspec filesystem, recording the size and sha256 of every file it writes.
    `before_write`: a fault point for every write (chaos only)."""

    def __init__(self, before_write: Optional[Callable[[], None]] = None) -> None:
        super().__init__()
        self.records: Dict[str, Dict[str, Any]] = {}
        self.before_write = before_write

    @contextmanager
    def create_stream(self, path, mode):
        if not any(ch in mode for ch in "wa+"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            hashing = HashingStream(stream, self.before_write)
            yield hashing
        size, digest = hashing.digest()  # recorded once the file is closed
        self.records[basename(str(path))] = {"size": size, "sha256": digest}

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        old = basename(str(path))
        if old in self.records:
            self.records[basename(str(new_path))] = self.records.pop(old)


class _Writer(FsspecWriter):
    def __init__(self, path: str, options: Dict[str, Any], thread_count: int,
                 before_write: Optional[Callable[[], None]] = None):
        # overwrite: a step re-saved after a resume replaces its old files (uncommitted first).
        super().__init__(path, sync_files=True, thread_count=thread_count, overwrite=True,
                         **options)
        self.fs = _HashingFileSystem(before_write)
        self.path = self.fs.init_path(path, **options)

    def prepare_global_plan(self, plans):
        # Runs on the coordinator rank inside DCP's collective, so a failure here fails the save
        # on every rank alike (a rank failing on its own would leave its peers in a collective).
        # A step directory being (re)written must not keep an older manifest.
        manifest = self.fs.concat_path(self.path, MANIFEST)
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        return super().prepare_global_plan(plans)


# Replicated tensors at least this large are split across the writers (see _split_replicated).
SPLIT_MIN_NUMEL = 4096


def _split_replicated(sd: Any, mesh, world: int, rank: int) -> Any:
    """Present every large replicated tensor (DDP's weights and optimizer state) as a DTensor
    sharded on dim 0 over the checkpoint group, so each rank writes ~1/N of the bytes. DCP's own
    de-duplication works per whole tensor and would leave one rank writing each big matrix. On
    load, DCP assembles the pieces for any world size (or none, as `dcp_to_torch_save` does)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(sd, dict):
        return {k: v if k.startswith("rng/") else _split_replicated(v, mesh, world, rank)
                for k, v in sd.items()}
    if isinstance(sd, list):
        return [_split_replicated(v, mesh, world, rank) for v in sd]
    if isinstance(sd, torch.Tensor) and not isinstance(sd, DTensor) and sd.dim() >= 1 \
            and sd.numel() >= SPLIT_MIN_NUMEL and sd.shape[0] >= world:
        local = torch.chunk(sd, world, dim=0)[rank]
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=sd.shape,
                                  stride=sd.stride())
    return sd


class CheckpointSaver:
    def __init__(self, uri: str, storage_options: Dict[str, Any], async_: bool, rank: int,
                 group, retries: int = 3, backoff_s: float = 1.0, thread_count: int = 2,
                 split_replicated: bool = False, generation: int = 0,
                 reports: Optional["collections.deque[SaveReport]"] = None,
                 fault: Optional[Callable[[], None]] = None):
        """`fault`: a fault point called before every write of every save (chaos only: a
        `checkpoint.faults.StorageOutage`'s `check`); None, the default, checks nothing."""
        self.uri, self.rank, self.group, self.async_ = uri, rank, group, async_
        self.generation = generation
        self.world_size = group.size() if group is not None else 1
        self.options = options_for(uri, storage_options)
        self.retries, self.backoff_s, self.thread_count = retries, backoff_s, thread_count
        self.fault = fault
        # Finished saves, drained by the worker's heartbeat. The worker may pass its own deque so
        # reports outlive this saver (a group re-forms while a save is being reported).
        self.reports: "collections.deque[SaveReport]" = (
            reports if reports is not None else collections.deque())
        self._writer: Optional[_Writer] = None
        self._abandoned = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-persist")
        self._future: Optional[Future] = None
        self._stager = DefaultStager(StagingOptions(
            use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
            use_async_staging=False, use_non_blocking_copy=False))
        self.last_step: Optional[int] = None
        self._mesh = None
        if split_replicated:
            from torch.distributed.device_mesh import DeviceMesh

            self._mesh = DeviceMesh.from_group(group, "cpu")

    def save(self, step: int, state_dict: Dict[str, Any], started: Optional[float] = None) -> None:
        """`started`: when the caller began building `state_dict`, so the stall counts it."""
        t0 = time.time()
        waited = 0.0
        if self._future is not None and not self._future.done():
            self._future.result()  # wait policy: see the module docstring
            waited = time.time() - t0
        staged = self._stager.stage(state_dict)
        if self._mesh is not None:
            staged = _split_replicated(staged, self._mesh, self._mesh.size(), self.rank)
        stall = time.time() - (started if started is not None else t0)
        self.last_step = step
        if self.async_:
            self._future = self._executor.submit(self._persist, step, staged, stall, waited)
        else:
            self._persist(step, staged, stall, waited)

    def wait(self) -> None:
        if self._future is not None:
            self._future.result()

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)
        self._stager.close()

    def abandon(self) -> None:
        """Give up on a save in flight without waiting for it: its group is broken (a peer was
        lost), so it cannot complete; it never reports success, so it is never committed."""
        self._abandoned = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def set_fault(self, fault: Optional[Callable[[], None]]) -> None:
        """Install a fault point from another thread (chaos): the save in flight meets it from its
        next file on, later saves from their start."""
        self.fault = fault
        writer = self._writer
        if writer is not None:
            writer.fs.before_write = fault

    @property
    def files_written(self) -> int:
        """Files the save in flight has finished writing (for fault injection in tests)."""
        return len(self._writer.fs.records) if self._writer is not None else 0

    def _persist(self, step: int, staged: Dict[str, Any], stall: float, waited: float) -> None:
        path = join(self.uri, step_name(step))
        t0 = time.time()
        error = ""
        # A state holding a NaN or an infinity is written (DCP's collectives need every rank)
        # but reported failed, so the checkpoint is never committed and never restored.
        poisoned = first_nonfinite(staged)
        for attempt in range(1, self.retries + 1):
            if self._abandoned or (self.group is not None and not dist.is_initialized()):
                # The group failed while this save waited to retry. Never retry then: without a
                # process group DCP would fall back to a single-process save into the step's
                # directory, where a later generation may be writing the same step.
                logger.info("rank %d: checkpoint step %d abandoned (the group failed)",
                            self.rank, step)
                return
            try:
                writer = self._writer = _Writer(path, self.options, self.thread_count,
                                                self.fault)
                dcp.save(staged, storage_writer=writer, process_group=self.group)
                if poisoned is not None:
                    error = f"rank {self.rank}'s state holds non-finite values ({poisoned})"
                    break
                self.reports.append(SaveReport(step, self.rank, True, dict(writer.fs.records),
                                               stall, waited, time.time() - t0, attempt,
                                               generation=self.generation,
                                               world_size=self.world_size))
                return
            except (Exception, CheckpointException) as e:  # (the latter is a BaseException)
                if self._abandoned:
                    logger.info("rank %d: checkpoint step %d abandoned (the group failed)",
                                self.rank, step)
                    return
                error = _error_text(e)
                logger.warning("rank %d: checkpoint step %d attempt %d/%d failed: %s",
                               self.rank, step, attempt, self.retries, error)
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
        self.reports.append(SaveReport(step, self.rank, False, {}, stall, waited,
                                       time.time() - t0, attempt, error,
                                       generation=self.generation, world_size=self.world_size))


def _error_text(e: BaseException) -> str:
    """One line: DCP wraps each rank's exception with its traceback; keep rank and reason."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (exc, _) = sorted(e.failures.items())[0]
        e, prefix = exc, f"rank {rank}: "
    else:
        prefix = ""
    return short_error(f"{prefix}{type(e).__name__}: {e}", limit=400)


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
