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


# ------------------------------------------------------------------------------ locks: builds, stores in use
# (here, below both the cache listing and the store builder, which each use them)

IN_USE_FILE = ".offload-in-use"  # in a store: shared-flocked by every process reading it (``hold``)


def lock_held(path: str) -> bool:
    """Whether another process holds the build lock file ``path`` (a non-blocking shared ``flock``)."""
    import fcntl
    return _flock_refused(path, fcntl.LOCK_SH)


def _flock_refused(path: str, mode: int) -> bool:
    """Whether a non-blocking ``flock`` of ``mode`` on the file ``path`` is refused (someone holds a
    conflicting one); False when there is no such file."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def hold(store: str, cache: str) -> int | None:
    """Mark the store folder ``store`` as read by this process for as long as the returned descriptor is open
    (a shared ``flock`` on its ``IN_USE_FILE``; the kernel drops it when the process ends, however it ends).
    Only inside the cache folder ``cache``: a user's own store is never written to. None where it cannot be
    taken (outside the cache, a read-only cache)."""
    import fcntl
    real, root = os.path.realpath(store), os.path.realpath(cache)
    if os.path.commonpath([real, root]) != root or real == root:
        return None
    try:
        fd = os.open(os.path.join(real, IN_USE_FILE), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:  # blocking: `offload cache` probes with a brief exclusive lock, which must not make this one fail
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def in_use(folder: str) -> bool:
    """Whether a process holds ``folder``'s ``IN_USE_FILE`` (``hold``): an exclusive ``flock`` cannot be had."""
    import fcntl
    return _flock_refused(os.path.join(folder, IN_USE_FILE), fcntl.LOCK_EX)
