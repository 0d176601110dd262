"""The storage seam: plain string URIs through fsspec (local paths, file://, memory://, s3://).

URIs stay strings end to end (`pathlib` would mangle `s3://`). For s3:// the botocore timeouts and
retries are bounded by default so an endpoint outage costs seconds, not minutes; anything given in
`checkpoint.storage_options` wins.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Callable, Dict, Optional, Tuple

import fsspec
from fsspec.core import url_to_fs

from coordinator import crc32c


# Bounded S3 behaviour (seconds): connect, read, and botocore's own retry attempts.
S3_DEFAULT_CONFIG = {"connect_timeout": 5, "read_timeout": 20,
                     "retries": {"max_attempts": 2, "mode": "standard"}}


def options_for(uri: str, storage_options: Dict[str, Any]) -> Dict[str, Any]:
    opts = copy.deepcopy(dict(storage_options or {}))
    if uri.startswith(("s3://", "s3a://")):
        cfg = dict(S3_DEFAULT_CONFIG)
        cfg.update(opts.get("config_kwargs") or {})
        opts["config_kwargs"] = cfg
    return opts


def filesystem(uri: str, storage_options: Dict[str, Any]) -> Tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI. Raises ValueError for an unknown scheme."""
    try:
        return url_to_fs(uri, **options_for(uri, storage_options))
    except (ValueError, ImportError) as e:
        raise ValueError(f"checkpoint.uri={uri!r}: {e}") from None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


# The checksums a manifest may carry for a file, the default first (`checkpoint.hash`).
HASHES = ("crc32c", "sha256")


class _Crc32c:
    """CRC32C (hardware-accelerated where the CPU has it: ~6 GB/s a core here, sha256 ~1.5)."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data) -> None:
        self._crc = crc32c.extend(self._crc, data)  # in place, without the GIL

    def hexdigest(self) -> str:
        return f"{self._crc:08x}"


def new_hash(name: str):
    """A hashlib-like object (update, hexdigest) for one of HASHES."""
    if name == "crc32c":
        return _Crc32c()
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"checkpoint.hash={name!r}: expected one of {', '.join(HASHES)}")


def file_checksum(meta: Dict[str, Any]) -> Tuple[str, str]:
    """(algorithm, hex digest) a manifest's file entry carries (a manifest from before
    `checkpoint.hash` carries sha256). Raises ValueError when it carries none."""
    for name in HASHES:
        if isinstance(meta.get(name), str):
            return name, meta[name]
    raise ValueError(f"no checksum (expected one of {', '.join(HASHES)})")


def hash_file(fs: fsspec.AbstractFileSystem, path: str, name: str, chunk: int = 8 << 20) -> str:
    h = new_hash(name)
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class HashingStream:
    """A write stream that hashes and counts what passes through it, so the manifest's checksums
    cost no second read of the data."""

    def __init__(self, stream, before_write: Optional[Callable[[], None]] = None,
                 progress: Optional[Callable[[], None]] = None, algorithm: str = HASHES[0]):
        self._stream = stream
        self._before_write = before_write  # a fault point (chaos only; see checkpoint.faults)
        self._progress = progress  # called each time a write returns: storage answered
        self.algorithm = algorithm
        self._hash = new_hash(algorithm)
        self._size = 0

    def write(self, data) -> int:
        if self._before_write is not None:
            self._before_write()
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._size += view.nbytes
        written = self._stream.write(data)
        if self._progress is not None:
            self._progress()
        return written

    def tell(self) -> int:
        return self._stream.tell()

    def digest(self) -> Tuple[int, str]:
        return self._size, self._hash.hexdigest()

    def __getattr__(self, name):  # flush, fileno, ... (fileno may raise: DCP falls back)
        return getattr(self._stream, name)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def list_files(fs: fsspec.AbstractFileSystem, path: str) -> Dict[str, int]:
    """{name: size} of every file directly under path."""
    return {basename(info["name"]): int(info.get("size") or 0)
            for info in fs.ls(path, detail=True) if info.get("type") == "file"}
