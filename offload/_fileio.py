"""Low-level helpers shared by every reader (python, mmap, native): alignment, short-read errors, and
dropping files from the page cache (what makes a measurement cold)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterable

PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffer addresses


def address_of(view: memoryview) -> int:
    """Address of a writable buffer (for native readers and O_DIRECT alignment checks)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def short_read(path: str, offset: int, want: int, got: int) -> OSError:
    return OSError(errno.EIO, f"short read: {got} of {want} bytes at offset {offset} (file truncated "
                              f"while in use? re-run `offload convert`)", path)


def _files_under(paths: Iterable[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isfile(p):
            out.append(p)
        elif os.path.isdir(p):
            for root, _, files in os.walk(p):
                out += [os.path.join(root, f) for f in files]
    return out


def evict(paths: Iterable[str]) -> None:
    """Drop these files (folders: every file under them) from the page cache. Advisory, never a write;
    pages mapped by a live mmap stay."""
    for f in _files_under(paths):
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
