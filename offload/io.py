"""Readers: move ``length`` bytes at ``offset`` of a file into a caller's page-aligned buffer.

Every backend has the same three calls, ``open(path) -> handle``, ``read(handle, offset, dest)``
and ``close(handle)``; the prefetcher does not know which one it drives. ``task_bytes`` tells the
prefetcher how to split a unit: the python reader gets several chunk-sized tasks in flight on the
prefetcher's threads (that is its queue depth), a native reader takes a whole unit and keeps its own
queue full.

Backends
  * ``python``: ``os.preadv`` into a memoryview, with O_DIRECT when the file system allows it, so
    streamed weights never fill (or thrash) the page cache. Buffered fallback drops the pages it read
    with ``POSIX_FADV_DONTNEED``.
  * ``mmap``: copy out of a shared mapping. Best when the file is already in the page cache.
  * ``native``: see ``offload._native`` (C, O_DIRECT, io_uring or a pthread pool); used when built.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any, Protocol

from ._fileio import PAGE, address_of, short_read
from .staging import BOUNCE_MIN_BYTES, bounces, read_bounced

log = logging.getLogger("offload")

DEFAULT_CHUNK_BYTES = 8 << 20


class Reader(Protocol):
    name: str
    task_bytes: int | None  # split units into tasks of this size (None: one task per unit)

    def open(self, path: str) -> Any: ...
    def read(self, handle: Any, offset: int, dest: memoryview) -> None: ...
    def close(self, handle: Any) -> None: ...


@dataclass
class _PyHandle:
    fd: int
    path: str
    direct: bool


class PythonReader:
    """``os.preadv`` in a loop (short reads are continued, EOF is an error), optionally O_DIRECT."""

    name = "python"

    def __init__(self, direct: bool = True, task_bytes: int = DEFAULT_CHUNK_BYTES):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.task_bytes = task_bytes

    def open(self, path: str) -> _PyHandle:
        if self.direct:
            try:
                return _PyHandle(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), path, True)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT (tmpfs)
                    raise OSError(e.errno, e.strerror, path) from None
        try:
            return _PyHandle(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path, False)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None

    def read(self, h: _PyHandle, offset: int, dest: memoryview) -> None:
        want = len(dest)
        if h.direct and want >= BOUNCE_MIN_BYTES and (offset % PAGE or address_of(dest) % PAGE):
            size = os.fstat(h.fd).st_size
            if bounces(offset, dest, size):
                # O_DIRECT all the same, through a bounce page (staging.read_bounced); the aligned calls below
                # take the direct branch, the unaligned tail the buffered one
                def direct(address: int, n: int, at: int) -> None:
                    self.read(h, at, memoryview((ctypes.c_char * n).from_address(address)).cast("B"))
                read_bounced(direct, lambda at, v: self.read(h, at, v), offset, dest, size)
                return
        done = 0
        direct = h.direct and offset % PAGE == 0 and want % PAGE == 0 and (want == 0 or address_of(dest) % PAGE == 0)
        fd = h.fd
        if h.direct and not direct:
            # O_DIRECT needs aligned offsets and lengths; an odd request goes through the page cache.
            fd = os.open(h.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while done < want:
                try:
                    n = os.preadv(fd, [dest[done:]], offset + done)
                except InterruptedError:
                    continue
                except OSError as e:
                    raise OSError(e.errno, e.strerror, h.path) from None
                if n == 0:
                    raise short_read(h.path, offset, want, done)
                done += n
            if not direct:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, offset, want, os.POSIX_FADV_DONTNEED)
        finally:
            if fd != h.fd:
                os.close(fd)

    def close(self, h: _PyHandle) -> None:
        os.close(h.fd)


class MmapReader:
    """Copy from a read-only shared mapping of the file (page-cache hits cost one memcpy)."""

    name = "mmap"
    task_bytes: int | None = DEFAULT_CHUNK_BYTES

    def __init__(self, drop_cache: bool = False):
        self.drop_cache = drop_cache

    def open(self, path: str) -> tuple[mmap.mmap | None, int, str]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, e.strerror, path) from None
        except BaseException:
            os.close(fd)
            raise
        return mm, fd, path

    def read(self, h: tuple[mmap.mmap | None, int, str], offset: int, dest: memoryview) -> None:
        mm, fd, path = h
        size = len(mm) if mm is not None else 0
        # The file may have shrunk since it was mapped: touching pages past EOF would be SIGBUS.
        real = os.fstat(fd).st_size
        if offset + len(dest) > min(size, real):
            raise short_read(path, offset, len(dest), max(0, min(size, real) - offset))
        dest[:] = memoryview(mm)[offset:offset + len(dest)]  # type: ignore[index]
        if self.drop_cache:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, offset, len(dest), os.POSIX_FADV_DONTNEED)

    def close(self, h: tuple[mmap.mmap | None, int, str]) -> None:
        mm, fd, _ = h
        if mm is not None:
            mm.close()
        os.close(fd)


READERS = ("native", "native-threads", "native-uring", "python", "mmap")
_logged_backend: set[str] = set()


def get_reader(name: str | None = None) -> Reader:
    """The named backend, or the fastest one available (native when built, else python O_DIRECT).

    ``native`` is the native reader's default engine (the pthread pool); ``native-threads`` and
    ``native-uring`` name an engine, as ``offload bench-disk`` reports them.
    """
    if name is not None and name not in READERS:
        raise ValueError(f"unknown reader {name!r}: choose one of {', '.join(READERS)}")
    if name is None or name.startswith("native"):
        from ._native import NativeReader, load_error, uring_available
        if load_error() is None:
            if name == "native-uring" and not uring_available():
                raise RuntimeError("reader 'native-uring': io_uring is not available on this kernel (or is "
                                   "disabled by seccomp/sysctl): use reader='native'")
            return NativeReader(name.split("-")[1]) if name and "-" in name else NativeReader()
        if name is not None:
            raise RuntimeError(f"the native reader is not available ({load_error()}): reinstall with "
                               f"`pip install -e .` (needs a C compiler) or use reader='python'")
        if "native" not in _logged_backend:
            _logged_backend.add("native")
            log.info("offload: native reader unavailable (%s); using the python O_DIRECT reader", load_error())
    if name == "mmap":
        return MmapReader()
    return PythonReader()
