"""How a save's bytes reach storage: DCP's fsspec writer, with every file hashed on its way out
(`checkpoint.hash`) and a failed write kept in words instead of raised from DCP's threads; and
torch.save's own zip CRC turned off while we checksum the same bytes anyway."""

from __future__ import annotations

import io
import threading
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

from coordinator.checkpoint.errors import StorageError, classify
from coordinator.checkpoint.manifest import MANIFEST
from coordinator.checkpoint.storage import HASHES, HashingStream, basename, filesystem, join

DETAIL_CHARS = 4000  # traceback text a failed save sends to the run directory's log


class _Discard(io.RawIOBase):
    """Where the rest of a failed save's files go: nowhere (see _HashingFileSystem). It keeps a
    position, as torch's zip writer tells and seeks."""

    def __init__(self) -> None:
        super().__init__()
        self._pos = self._end = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._pos += n
        self._end = max(self._end, self._pos)
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end}[whence]
        self._pos = base + offset
        return self._pos


@contextmanager
def no_zip_crc():
    """DCP serialises each tensor with torch.save, whose zip writer takes a CRC32 of every
    record: redundant with the manifest's checksum of every byte (~17% of a persist to a fast
    disk, measured). The setting is the process's: restored after the save."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # an older torch always computes it
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class _HashingFileSystem(FileSystem):
    """DCP's fsspec filesystem, recording the size and checksum of every file it writes, and every
    path it opened for writing (`touched`: what a failed save removes).

    While DCP writes the shards (`collecting`), a write error is held (`error`, classified;
    `detail`, its traceback) instead of raised: DCP's extra writer threads print an exception
    they meet to stderr and carry on, dropping that file's entries from the checkpoint's metadata
    (measured: a checkpoint on a full disk "saved" without one shard). `HashingWriter.write_data`
    raises the held error on DCP's own thread, so the save fails on every rank alike. After an
    error the remaining files of the save go to `_Discard`: the save has failed already.
    `before_write`: a fault point for every write (chaos only); `progress`: called whenever a
    write returns (the persist's sign of life, see CheckpointSaver)."""

    def __init__(self, before_write: Optional[Callable[[], None]] = None,
                 progress: Optional[Callable[[], None]] = None, algorithm: str = HASHES[0]) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.records: Dict[str, Dict[str, Any]] = {}
        self.touched: List[str] = []
        self.before_write = before_write
        self.progress = progress
        self.collecting = False
        self.error: Optional[StorageError] = None
        self.detail = ""
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode):
        if not any(ch in mode for ch in "wa+"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        if self.collecting and self.error is not None:
            try:
                yield _Discard()
            except Exception:  # the save has failed already: nothing more to say
                pass
            return
        self.touched.append(str(path))
        try:
            with super().create_stream(path, mode) as stream:
                hashing = HashingStream(stream, self.before_write, self.progress, self.algorithm)
                yield hashing
        except Exception as e:
            if not self.collecting:
                raise
            with self._lock:
                if self.error is None:
                    self.error = classify(e, str(path).rsplit("/", 1)[0])
                    self.detail = "".join(traceback.format_exception(e))[-DETAIL_CHARS:]
            return
        size, digest = hashing.digest()  # recorded once the file is closed
        self.records[basename(str(path))] = {"size": size, self.algorithm: digest}
        if self.progress is not None:
            self.progress()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        old = basename(str(path))
        if old in self.records:
            self.records[basename(str(new_path))] = self.records.pop(old)
        self.touched.append(str(new_path))


class HashingWriter(FsspecWriter):
    def __init__(self, path: str, options: Dict[str, Any], thread_count: int,
                 before_write: Optional[Callable[[], None]] = None,
                 progress: Optional[Callable[[], None]] = None, algorithm: str = HASHES[0]):
        # overwrite: a step re-saved after a resume replaces its old files (uncommitted first).
        super().__init__(path, sync_files=True, thread_count=thread_count, overwrite=True,
                         **options)
        self.fs = _HashingFileSystem(before_write, progress, algorithm)
        self.path = self.fs.init_path(path, **options)

    def prepare_global_plan(self, plans):
        # Runs on the coordinator rank inside DCP's collective, so a failure here fails the save
        # on every rank alike (a rank failing on its own would leave its peers in a collective).
        # A step directory being (re)written must not keep an older manifest.
        manifest = self.fs.concat_path(self.path, MANIFEST)
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        return super().prepare_global_plan(plans)

    def write_data(self, plan, planner):
        # Inside DCP's "write" collective: what is raised here reaches every rank.
        self.fs.collecting = True
        try:
            written = super().write_data(plan, planner)
        finally:
            self.fs.collecting = False
        if self.fs.error is not None:
            raise self.fs.error
        return written


# Replicated tensors at least this large are split across the writers (see saver._split_views).
