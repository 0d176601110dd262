"""CRC32C over memory in place: checkpoint files and peer transfers are checked with it.

google-crc32c's Python call takes `bytes` only, so every buffer would be copied first (the
checkpoint writer copied through a 1 MB chunk). The library it wraps (libcrc32c, in the wheel)
takes a pointer and a length: called through ctypes, which drops the GIL for the call, it reads
a tensor's or a buffer's memory where it lies (6.7 GB/s a core here, with no copy), and a
heartbeat answered on another thread is never held up by it. Where that library cannot be
found (a build of google-crc32c without it), the copying call is used.
"""

from __future__ import annotations

import ctypes
import glob
import os
import google_crc32c

_CHUNK = 1 << 20  # the copying fallback copies through a chunk this size (it stays in cache)


def _library():
    here = os.path.dirname(google_crc32c.__file__)
    for path in sorted(glob.glob(os.path.join(here + ".libs", "libcrc32c*"))
                       + glob.glob(os.path.join(here, "libcrc32c*"))):
        try:
            lib = ctypes.CDLL(path)
            fn = lib.crc32c_extend
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return fn
    return None


_extend = _library()


def extend_at(crc: int, address: int, nbytes: int) -> int:
    """`crc` extended by the `nbytes` bytes at `address` (memory the caller keeps alive)."""
    if not nbytes:
        return crc
    if _extend is not None:
        return int(_extend(crc, address, nbytes))
    view = (ctypes.c_char * nbytes).from_address(address)
    for i in range(0, nbytes, _CHUNK):
        crc = google_crc32c.extend(crc, bytes(view[i:i + _CHUNK]))
    return crc


def extend(crc: int, data) -> int:
    """`crc` extended by `data`: bytes, a buffer (memoryview, numpy array) or a contiguous CPU
    tensor (its bytes as they lie in memory)."""
    if isinstance(data, bytes):
        return google_crc32c.extend(crc, data) if data else crc
    if hasattr(data, "data_ptr"):  # a torch tensor
        assert data.device.type == "cpu" and data.is_contiguous(), \
            "crc32c of a tensor needs a contiguous CPU tensor"
        return extend_at(crc, data.data_ptr(), data.numel() * data.element_size())
    view = memoryview(data).cast("B")
    if not view.nbytes:
        return crc
    if view.readonly:  # ctypes cannot take the address of a read-only buffer
        return google_crc32c.extend(crc, bytes(view))
    holder = (ctypes.c_char * view.nbytes).from_buffer(view)
    return extend_at(crc, ctypes.addressof(holder), view.nbytes)


def value(data) -> int:
    """The CRC32C of `data` (as `extend` takes it)."""
    return extend(0, data)
