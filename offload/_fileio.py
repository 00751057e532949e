"""Low-level helpers shared by every reader (python, mmap, native): alignment and short-read errors."""
from __future__ import annotations

import ctypes
import errno

PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffer addresses


def address_of(view: memoryview) -> int:
    """Address of a writable buffer (for native readers and O_DIRECT alignment checks)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def short_read(path: str, offset: int, want: int, got: int) -> OSError:
    return OSError(errno.EIO, f"short read: {got} of {want} bytes at offset {offset} (file truncated "
                              f"while in use? re-run `offload convert`)", path)
