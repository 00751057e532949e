"""The native reader (``native/``): O_DIRECT with many requests in flight, io_uring or a pthread pool.

The extension is optional: ``load_error()`` says why it is unavailable, and ``get_reader`` then
falls back to the python reader and logs that once.
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from ._fileio import PAGE, address_of, short_read
from .staging import HostBuffer, bounces, read_bounced

_buffered_lock = threading.Lock()

try:
    from . import _ol_native as _ext  # type: ignore[attr-defined]
    _error: str | None = None
except ImportError as e:  # not built (no compiler at install time) or built for another Python
    _ext = None
    _error = f"extension offload._ol_native not built: {e}"

ENGINES = {"auto": 0, "uring": 1, "threads": 2}
# Through a bounce region (``NativeReader.bounce``), requests of this size, ``depth`` of them per read: each read's
# region is then 4 MiB, and small is the point. bloom-1b7 fp32 streamed cold at prefetch 4 (four reads in flight),
# alternated in one run: direct 1.89 s/token; 16 x 512 KiB per read 1.58-1.60; 16 x 256 KiB 1.47-1.49;
# 16 x 128 KiB 1.68; 32 x 256 KiB 1.69; 32 x 512 KiB 1.82; 32 x 512 KiB shared by the reads in flight 2.03.
BOUNCE_CHUNK = 256 << 10
# Reads shorter than this go direct all the same: a mixture of experts' routed reads (6-9 MiB each, many at once)
# and the 8 MiB slices its blocks are read in were slower through regions (Qwen3-30B-A3B:6 routed, no cache,
# alternated: 0.45 s/token and 1.80 GB/s of expert reads vs 0.39 and 1.88-1.96 direct); bloom's units of
# 27-200 MB were faster (above).
BOUNCE_MIN_READ = 16 << 20


def load_error() -> str | None:
    return _error


def uring_available() -> bool:
    return bool(_ext is not None and _ext.uring_available())


@dataclass
class _Handle:
    fd: int
    path: str
    direct: bool
    buffered_fd: int = -1  # for requests O_DIRECT cannot serve (unaligned offset or address)


class NativeReader:
    """Whole-unit reads: one call keeps ``depth`` requests of ``chunk_bytes`` in flight, GIL released; or,
    with ``bounce``, ``depth`` requests of ``bounce_chunk``, each landing in a small region of the read's
    own and copied out (``ol_io.h`` says why)."""

    task_bytes: int | None = None  # the native engine keeps its own queue full

    # Default engine: threads. On this VM it measured 1.06x fio vs io_uring 0.88x (bench-disk, README).
    def __init__(self, engine: str = "threads", depth: int = 16, chunk_bytes: int = 1 << 20, direct: bool = True,
                 bounce: bool | None = None):
        if _ext is None:
            raise RuntimeError(_error)
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if bounce and engine == "uring":
            raise ValueError("bounce=True reads with the thread engine: use engine='threads' (or 'auto')")
        self.engine, self.depth, self.chunk_bytes, self.direct = engine, depth, chunk_bytes, direct
        self.name = f"native-{engine}"
        # bounce: each request lands in a small region reused call after call (one per read in flight, kept
        # until the reader goes) and is copied out; None: as the disk measured faster (``measure.use_profile``)
        self.bounce = bool(bounce)
        self.bounce_auto = bounce is None and engine != "uring" and direct
        # bounce regions no read is using: reused (last in, first out), so hot; one per read ever in flight at once
        # (4 MiB each: the prefetcher's reads in flight, up to io_threads), outside ``cpu_memory`` (README, "Memory")
        self._bounces: list[HostBuffer] = []
        self.bounce_chunk = BOUNCE_CHUNK  # (tests make both small, so a small file takes many requests)
        self.bounce_min_read = BOUNCE_MIN_READ
        self._bounce_lock = threading.Lock()

    def open(self, path: str) -> _Handle:
        flags = os.O_RDONLY | os.O_CLOEXEC
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                return _Handle(os.open(path, flags | os.O_DIRECT), path, True)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise OSError(e.errno, e.strerror, path) from None
        try:
            return _Handle(os.open(path, flags), path, False)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None

    def read(self, h: _Handle, offset: int, dest: memoryview) -> None:
        n = len(dest)
        if n == 0:
            return
        addr = address_of(dest)
        if h.direct and (offset % PAGE or addr % PAGE):
            size = os.fstat(h.fd).st_size
            if bounces(offset, dest, size):  # O_DIRECT all the same, through a bounce page
                read_bounced(lambda a, k, o: self._read(h, h.fd, a, k, o),
                             lambda o, v: self._read(h, self._buffered(h), address_of(v), len(v), o, evict=True),
                             offset, dest, size)
                return
            self._read(h, self._buffered(h), addr, n, offset, evict=True)
            return
        self._read(h, h.fd, addr, n, offset, evict=not h.direct)

    @staticmethod
    def _buffered(h: _Handle) -> int:
        if h.buffered_fd < 0:
            with _buffered_lock:  # a handle is shared by the prefetcher's reader threads
                if h.buffered_fd < 0:
                    h.buffered_fd = os.open(h.path, os.O_RDONLY | os.O_CLOEXEC)
        return h.buffered_fd

    def _read(self, h: _Handle, fd: int, addr: int, n: int, offset: int, evict: bool = False) -> None:
        assert _ext is not None
        # (a buffered read lands in the page cache anyway)
        if self.bounce and h.direct and fd == h.fd and n >= max(self.bounce_min_read, PAGE + 1):
            region = self._take_bounce()
            try:
                rc, valid = _ext.read(fd, addr, n, offset, self.bounce_chunk, region.nbytes // self.bounce_chunk,
                                      ENGINES["threads"], region.tensor.data_ptr(), region.nbytes)
            finally:
                self._give_bounce(region)
        else:
            rc, valid = _ext.read(fd, addr, n, offset, self.chunk_bytes, self.depth, ENGINES[self.engine])
        if rc == _ext.SHORT:
            raise short_read(h.path, offset, n, valid)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc), h.path)
        if evict:  # a buffered read: leave no page behind (a later cold pass must not find it)
            try:
                os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def _take_bounce(self) -> HostBuffer:
        """A region for one read: the one given back last (hot), or a new one, backed now, not inside the read."""
        with self._bounce_lock:
            if self._bounces:
                return self._bounces.pop()
        region = HostBuffer(self.depth * self.bounce_chunk)
        region.tensor.fill_(0)
        return region

    def _give_bounce(self, region: HostBuffer) -> None:
        with self._bounce_lock:
            self._bounces.append(region)

    def close(self, h: _Handle) -> None:
        os.close(h.fd)
        if h.buffered_fd >= 0:
            os.close(h.buffered_fd)
