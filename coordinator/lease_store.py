"""Exclusive writes of one small object (`lease.json`) on a local path, on S3 and on any other
fsspec URI: read, create (only if absent), replace and delete (only if unchanged since read).

A token identifies what was read (the bytes on a local path and through plain fsspec, the ETag
on S3); replace and delete act only while the object is still that.
- Local paths: create with a hard link of a complete temporary file (atomic, fails if the lease
  exists, safe on NFS; O_EXCL where links are not supported); replace and delete compare under
  `flock` of `lease.json.lock`, an empty file left beside the lease.
- s3://: conditional PUTs (`If-None-Match: *` to create, `If-Match: <etag>` to replace), each
  read back to check that our bytes landed (the guard on endpoints that ignore the headers).
- Other fsspec schemes (memory://, gs://, ...): a check, a plain write, a read back; two jobs
  writing within the same moment could both believe they hold it.
Callers bound every call in time (`coordinator.lease.bounded`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import uuid
from contextlib import contextmanager
from typing import Any, Dict, Optional, Tuple

from coordinator.checkpoint.storage import filesystem, join

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"


class LocalStore:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LEASE_FILE)
        self.lock_path = self.path + ".lock"
        self.directory = directory

    def read(self) -> Optional[Tuple[bytes, Any]]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def _tmp(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> Optional[Any]:
        os.makedirs(self.directory, exist_ok=True)
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)  # appears complete, or not at all
            return data
        except FileExistsError:
            return None
        except OSError as e:  # no hard links here (some FUSE mounts): O_EXCL
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return data
        finally:
            os.unlink(tmp)

    @contextmanager
    def _locked(self):
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # no locks on this mount (NFS with nolock): unserialized
                logger.debug("lease: flock of %s failed (%s); updating without it",
                             self.lock_path, e)
            yield
        finally:
            os.close(fd)  # releases the lock

    def replace(self, data: bytes, token: Any) -> Optional[Any]:
        with self._locked():
            got = self.read()
            if got is None or got[1] != token:
                return None
            os.replace(self._tmp(data), self.path)
            return data

    def delete(self, token: Any) -> bool:
        with self._locked():
            got = self.read()
            if got is None or got[1] != token:
                return False
            os.unlink(self.path)
            return True


class FsspecStore:
    """Any fsspec filesystem: plain writes, each read back (see the module's docstring)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> Optional[Tuple[bytes, Any]]:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def _write(self, data: bytes, **conditions) -> bool:
        self.fs.pipe_file(self.path, data)
        return True

    def _landed(self, data: bytes) -> Optional[Any]:
        got = self.read()
        return got[1] if got is not None and got[0] == data else None

    def create(self, data: bytes) -> Optional[Any]:
        if self.read() is not None or not self._write(data, IfNoneMatch="*"):
            return None
        return self._landed(data)

    def replace(self, data: bytes, token: Any) -> Optional[Any]:
        got = self.read()
        if got is None or got[1] != token or not self._write(data, IfMatch=token):
            return None
        return self._landed(data)

    def delete(self, token: Any) -> bool:
        got = self.read()
        if got is None or got[1] != token:
            return False
        self.fs.rm_file(self.path)
        return True


class S3Store(FsspecStore):
    """Conditional PUTs through s3fs; the ETag is the token."""

    def __init__(self, fs, path: str):
        super().__init__(fs, path)
        self.bucket, self.key, _ = fs.split_path(path)
        self.conditional = True  # cleared when the endpoint rejects the headers

    def read(self) -> Optional[Tuple[bytes, Any]]:
        from fsspec.asyn import sync

        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = resp["Body"]
            try:
                return await body.read(), resp.get("ETag")
            finally:
                body.close()
        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def _write(self, data: bytes, **conditions) -> bool:
        kwargs = conditions if self.conditional else {}
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **kwargs)
            self.fs.invalidate_cache(self.path)
            return True
        except FileExistsError:  # If-None-Match: the lease exists
            return False
        except OSError as e:
            code = _s3_code(e)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False  # If-Match: changed since we read it (or gone)
            if code == "NotImplemented" and self.conditional:
                logger.warning("lease: %s rejects conditional writes; falling back to writes "
                               "read back (a small race window, see docs/operations.md)",
                               self.bucket)
                self.conditional = False
                return self._write(data)
            raise

    def create(self, data: bytes) -> Optional[Any]:
        if not self._write(data, IfNoneMatch="*"):
            return None
        return self._landed(data)

    def replace(self, data: bytes, token: Any) -> Optional[Any]:
        if not self.conditional and (self.read() or (None, None))[1] != token:
            return None
        if not self._write(data, IfMatch=token):
            return None
        return self._landed(data)


def _s3_code(e: BaseException) -> Optional[str]:
    cause = e.__cause__
    resp = getattr(cause, "response", None) or {}
    return (resp.get("Error") or {}).get("Code")


def store_for(uri: str, storage_options: Dict) -> Any:
    """The store of `<uri>/lease.json`: a local path, s3://, or any other fsspec URI."""
    if "://" not in uri or uri.startswith("file://"):
        return LocalStore(os.path.abspath(uri[len("file://"):] if uri.startswith("file://")
                                          else uri))
    fs, root = filesystem(uri, storage_options)
    if uri.startswith(("s3://", "s3a://")):
        return S3Store(fs, join(root, LEASE_FILE))
    return FsspecStore(fs, join(root, LEASE_FILE))


