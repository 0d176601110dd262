"""Storage failures in words: what went wrong with a checkpoint write or read, and whether trying
again can help.

A failed save reaches us wrapped several times: DCP gathers each rank's exception into a
`CheckpointException`, torch's zip writer turns a short write into "enforce fail at
inline_container.cc ... unexpected pos", s3fs turns botocore's `ClientError` into `OSError`s. The
cause a user can act on (a full disk, a read-only mount, a missing bucket) sits somewhere in that
chain; `classify` walks it and returns a `StorageError`: a kind, one line of words, and whether a
retry can help. A full disk, a read-only mount or a refused permission does not heal in the
seconds a retry waits, so those are never retried (a retry only stalls the next save).

`StorageError` pickles with its words: DCP sends exceptions between ranks by pickling, which drops
`__cause__` and `__context__`, so a rank classifies its own exception before DCP gathers it.
Importing this module loads neither Ray nor torch.
"""

from __future__ import annotations

import errno
import os
from typing import Iterator, Optional

# kinds
DISK_FULL = "disk_full"
READ_ONLY = "read_only"
PERMISSION = "permission"
NOT_FOUND = "not_found"  # the storage location vanished (an unmounted disk, a deleted bucket)
UNREACHABLE = "unreachable"  # the endpoint refused or dropped the connection
TIMEOUT = "timeout"  # the endpoint did not answer in time
OTHER = "other"

# Causes that do not heal within a retry's backoff: retrying them only stalls the next save.
PERMANENT = frozenset({DISK_FULL, READ_ONLY, PERMISSION, NOT_FOUND})

_ERRNO_KINDS = {
    errno.ENOSPC: (DISK_FULL, "no space left on device"),
    errno.EDQUOT: (DISK_FULL, "disk quota exceeded"),
    errno.EROFS: (READ_ONLY, "read-only file system"),
    errno.EACCES: (PERMISSION, "permission denied"),
    errno.EPERM: (PERMISSION, "operation not permitted"),
    errno.ENOENT: (NOT_FOUND, "no such file or directory"),
    errno.ENODEV: (NOT_FOUND, "no such device"),
    errno.ESTALE: (NOT_FOUND, "stale file handle"),
    errno.ETIMEDOUT: (TIMEOUT, "timed out"),
    errno.ECONNREFUSED: (UNREACHABLE, "connection refused"),
    errno.ECONNRESET: (UNREACHABLE, "connection reset"),
    errno.EHOSTUNREACH: (UNREACHABLE, "host unreachable"),
    errno.ENETUNREACH: (UNREACHABLE, "network unreachable"),
}
# S3 error codes (botocore's ClientError.response["Error"]["Code"]).
_S3_CODES = {
    "AccessDenied": (PERMISSION, "S3 access denied"),
    "AllAccessDisabled": (PERMISSION, "S3 access disabled"),
    "InvalidAccessKeyId": (PERMISSION, "S3 credentials refused"),
    "SignatureDoesNotMatch": (PERMISSION, "S3 credentials refused"),
    "ExpiredToken": (PERMISSION, "S3 credentials expired"),
    "NoSuchBucket": (NOT_FOUND, "S3 bucket does not exist"),
    "QuotaExceeded": (DISK_FULL, "S3 quota exceeded"),
    "SlowDown": (UNREACHABLE, "S3 asks to slow down"),
    "ServiceUnavailable": (UNREACHABLE, "S3 service unavailable"),
    "InternalError": (UNREACHABLE, "S3 internal error"),
    "RequestTimeout": (TIMEOUT, "S3 request timed out"),
}
# botocore / aiohttp exception class names (matched by name: neither is imported here).
_NAMED = {
    "EndpointConnectionError": (UNREACHABLE, "storage endpoint unreachable"),
    "ConnectionClosedError": (UNREACHABLE, "storage endpoint closed the connection"),
    "ClientConnectorError": (UNREACHABLE, "storage endpoint unreachable"),
    "ServerDisconnectedError": (UNREACHABLE, "storage endpoint closed the connection"),
    "ReadTimeoutError": (TIMEOUT, "storage endpoint did not answer in time"),
    "ConnectTimeoutError": (TIMEOUT, "storage endpoint did not answer in time"),
    "TimeoutError": (TIMEOUT, "timed out"),
}
# torch's zip writer after a write that wrote less than asked (the disk filled up mid-file).
_SHORT_WRITE = "unexpected pos"


class StorageError(Exception):
    """A storage failure in words. `kind`: one of the kinds above; `words`: one line for an
    event or a log ("no space left on device: /ckpt/step-00000040"); `retryable`: whether a retry
    of the same save can help."""

    def __init__(self, kind: str, words: str, retryable: Optional[bool] = None):
        retryable = kind not in PERMANENT if retryable is None else retryable
        super().__init__(kind, words, retryable)
        self.kind, self.words, self.retryable = kind, words, retryable

    def __str__(self) -> str:
        return self.words


def chain(exc: BaseException, limit: int = 32) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the per-rank failures inside a DCP
    `CheckpointException` (found by its `failures` attribute), each once, depth first."""
    seen, todo = set(), [exc]
    while todo and len(seen) < limit:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for _, wrapped in sorted(failures.items(), key=lambda kv: kv[0]):
                todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        todo.extend([e.__cause__, e.__context__])


def _where(e: BaseException, path: str) -> str:
    name = getattr(e, "filename", None)
    return str(name) if name else path


def _s3_code(e: BaseException) -> Optional[str]:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        return str(code) if code else None
    return None


def classify(exc: BaseException, path: str = "") -> StorageError:
    """The storage failure behind `exc`, in words; `path`: where the write or read went (named
    when the exception names no file). The first recognised cause in the chain wins, most
    specific first: an S3 error code, an errno, a known client exception, torch's short write."""
    found = list(chain(exc))
    for e in found:
        if isinstance(e, StorageError):
            return e
    for e in found:
        code = _s3_code(e)
        if code in _S3_CODES:
            kind, words = _S3_CODES[code]
            return StorageError(kind, f"{words} ({code}): {path}" if path else
                                f"{words} ({code})")
    for e in found:
        if isinstance(e, OSError) and e.errno in _ERRNO_KINDS:
            kind, words = _ERRNO_KINDS[e.errno]
            where = _where(e, path)
            if kind == NOT_FOUND:
                words += " (the storage location vanished?)"
            return StorageError(kind, f"{words}: {where}" if where else words)
    for e in found:
        name = type(e).__name__
        if name in _NAMED:
            kind, words = _NAMED[name]
            detail = " ".join(str(e).split())[:200]
            return StorageError(kind, f"{words} ({name}: {detail})" if detail else
                                f"{words} ({name})")
    for e in found:
        if _SHORT_WRITE in str(e):
            # torch's zip writer noticed that fewer bytes landed than it wrote: the write
            # failed underneath it, which on a local disk is a full disk.
            return StorageError(DISK_FULL, f"no space left on device (short write): {path}"
                                if path else "no space left on device (short write)")
    for e in found:  # a permission refusal without an errno (s3fs raises PermissionError(msg))
        if isinstance(e, PermissionError):
            return StorageError(PERMISSION, f"permission denied: {_where(e, path)}")
        if isinstance(e, FileNotFoundError):
            return StorageError(NOT_FOUND, "no such file or directory (the storage location "
                                f"vanished?): {_where(e, path)}")
    inner = next((e for e in found if not hasattr(e, "failures")), exc)
    text = " ".join(str(inner).split())[:300]
    return StorageError(OTHER, f"{type(inner).__name__}: {text}" if text else
                        type(inner).__name__)


def local_free_bytes(path: str) -> Optional[int]:
    """Free bytes on the local file system holding `path` (its nearest existing parent), or
    None for a remote URI or an unreadable path."""
    if "://" in path and not path.startswith("file://"):
        return None
    p = path[len("file://"):] if path.startswith("file://") else path
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    try:
        st = os.statvfs(p or "/")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
