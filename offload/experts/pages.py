"""Evicted experts' huge pages moved under the next experts read, instead of given back and faulted in again.

An expert read into its table region lands in fresh anonymous memory: the kernel faults each page in and
zeroes it first (a 2 MiB huge page at ~8 GB/s on this VM), on the reader threads, before the O_DIRECT
request goes out. With a small expert cache that is every read. ``PagePool`` keeps the huge pages of
evicted experts and moves them, page tables and all (``mremap`` with ``MREMAP_DONTUNMAP``: no copy, no
zeroing, ~40 us per 9 MiB expert), under the regions the next read fills; the donor region is left
mapped and empty, as ``MADV_DONTNEED`` leaves it. On the Qwen3-30B-A3B shape (bf16, 6 layers, no expert
cache, cold, alternated runs) it halves the process's kernel time per decode token (0.146 -> 0.079 s);
the read rate and s/token did not change beyond this disk's noise (README, Mixtures of experts): the
saving is CPU time, which a faster disk would need.

Only whole huge pages an experts table advised (``ExpertsTable._advise_huge``) move. A move splits at
most the mapping it lands in (adjacent advised ranges share one), so the process's count of mappings
stays within the two per range that the table's advice was allowed (``_mappings_allow``). What a pool holds is bounded by what the latest batch of expert reads took
(``limit``, ``resize``): memory that batch took in any case, so the peak stays what it was and a
prefill's large batch is given back at the next decode step; past the limit, and when the kernel cannot
move pages (before Linux 5.7), pages are given back as before.

Where no evicted expert's pages fit (an expert cache that is not full evicts nothing; a batch bigger than the
last one), the pool's spare pages (``_Spare``) serve instead: huge pages a thread of the pool's own faults in
once a forward's experts are done and the cache has evicted (``refill``), while the next units compute, up to
the same limit (spare pages are kept over evicted ones: they already cost their fault). A fault then happens
beside the compute instead of inside a read a forward waits for. On this VM that is most of a fresh read's
time: memory the guest has not touched lately faults at ~0.45 GB/s (the host backs it), recycled memory at
~8 GB/s (README, Mixtures of experts).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from typing import Any

from ..staging import HUGE_PAGE, HostBuffer

log = logging.getLogger("offload")

_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4
# Private knob for benchmarks and tests: False gives pages back on eviction and reads into fresh ones.
_MOVE_PAGES = True
# Private knob for benchmarks and tests: False faults no spare pages ahead (a read no evicted expert's pages
# fit faults its own in).
_SPARE_PAGES = True


def _libc_mremap() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.mremap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return fn


_mremap = _libc_mremap() if hasattr(mmap, "MADV_DONTNEED") else None


def move_pages(src: int, dst: int, nbytes: int) -> None:
    """Move the pages of ``[src, src + nbytes)`` to ``dst`` (both page aligned, anonymous private memory);
    ``src`` stays mapped and reads zeros. Raises OSError where the kernel cannot."""
    if _mremap is None:
        raise OSError(38, "mremap is not available here")
    got = _mremap(src, nbytes, nbytes, _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP, dst)
    if got != dst:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _thp_on() -> bool:
    """Whether advised memory gets transparent huge pages (a spare page faulted with THP off is 4 KiB of 2 MiB)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class _Spare:
    """Huge pages faulted in ahead of need, in a mapping of the pool's own.

    Page ``i`` is ``[base + i * HUGE_PAGE, +HUGE_PAGE)``; ``ready[i]``: faulted in and not moved away. The
    address space covers the most the pool may hold (``pages``); what is backed stays within the pool's limit
    (``PagePool.bytes`` counts it). A move leaves its pages mapped and empty, so a later fill faults them in
    again. State is read and written under the pool's lock, except the touch that faults a page in, made on
    a page marked ``filling``, which no one else takes."""

    def __init__(self, pages: int):
        self.pages = pages
        self.buffer = HostBuffer(pages * HUGE_PAGE)  # 2 MiB aligned, advised huge, nothing backed yet
        if not self.buffer.huge:
            self.buffer.close()
            raise OSError("transparent huge pages cannot be advised here")
        self.base = self.buffer.address
        self.ready = [False] * pages
        self.filling: set[int] = set()
        self.count = 0  # ready pages

    def run(self, n: int) -> int | None:
        """The first of ``n`` ready pages in a row (lowest first), or None."""
        length = 0
        for i, r in enumerate(self.ready):
            length = length + 1 if r else 0
            if length == n:
                return i - n + 1
        return None

    def claim(self, i: int, n: int) -> None:
        for j in range(i, i + n):
            self.ready[j] = False
        self.count -= n

    def next_empty(self) -> int | None:
        return next((i for i, r in enumerate(self.ready) if not r and i not in self.filling), None)

    def touch(self, i: int) -> None:
        """Fault page ``i`` in: a write to its first byte makes the kernel back (and zero) the whole huge page."""
        ctypes.memset(self.base + i * HUGE_PAGE, 0, 1)

    def drop(self, i: int) -> None:
        """Ready page ``i`` back to the kernel."""
        self.claim(i, 1)
        self.release(i)

    def release(self, i: int) -> None:
        if not self.buffer.closed:
            self.buffer.advise(mmap.MADV_DONTNEED, i * HUGE_PAGE, HUGE_PAGE)

    def close(self) -> None:
        self.buffer.close()


class PagePool:
    """Backed huge-page ranges of evicted experts, by size, waiting to be moved under the next read, and spare
    huge pages faulted in ahead by the pool's own thread (``_Spare``) for reads no held range fits.

    ``give(table, a, b)`` takes table bytes ``[a, b)`` (an evicted expert's huge pages) if there is room;
    ``take(table, a, b)`` moves a held range of that size, else as many spare pages in a row, under ``[a, b)``
    before a read fills it. ``refill()`` (a forward's experts are done and the cache has evicted: its pages came
    here first) wakes the thread that faults spare pages in, up to the limit. Every call holds the pool's lock;
    the ranges given are not read or written by anyone until taken."""

    def __init__(self, spare_pages: int = 0) -> None:
        self.held: dict[int, list[tuple[Any, int]]] = {}  # size -> [(table, offset)]
        self.held_bytes = 0
        self.limit = 0  # the most bytes held and spare (``resize``)
        self.moved_bytes = 0  # moved under a read instead of faulted in (held ranges and spare pages)
        self.spare_moved_bytes = 0  # of which spare pages
        self.lock = threading.Condition()
        self.enabled = _MOVE_PAGES and _mremap is not None
        self._spare: _Spare | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        if self.enabled and _SPARE_PAGES and spare_pages > 0 and hasattr(mmap, "MADV_HUGEPAGE") and _thp_on():
            try:
                self._spare = _Spare(spare_pages)
            except OSError as e:  # no address space, or THP compiled out: reads fault as before
                log.info("offload: no spare huge pages for expert reads (%s)", e)

    @property
    def bytes(self) -> int:
        """Memory the pool holds: evicted experts' ranges and spare pages (those being faulted in included)."""
        spare = self._spare
        return self._kept() + (0 if spare is None else len(spare.filling) * HUGE_PAGE)

    def _kept(self) -> int:
        """What the pool holds but for pages being faulted in (those are released, not kept, once they are in if
        the pool is full by then)."""
        return self.held_bytes + (0 if self._spare is None else self._spare.count * HUGE_PAGE)

    def give(self, table: Any, a: int, b: int) -> bool:
        with self.lock:
            if not self.enabled or self._closed:
                return False
            if self._kept() + (b - a) > self.limit:  # full: spare pages already cost their fault, these go back
                return False
            self.held.setdefault(b - a, []).append((table, a))
            self.held_bytes += b - a
            return True

    def take(self, table: Any, a: int, b: int) -> bool:
        with self.lock:
            spare = self.held.get(b - a)
            if not spare:
                return self._take_spare(table, a, b)
            if (table, a) in spare:  # its own pages are still there (evicted, routed again): no longer a donor,
                spare.remove((table, a))  # or a later take would move them from under the expert
                self.held_bytes -= b - a
                return True
            donor, at = spare.pop()
            self.held_bytes -= b - a
            try:
                move_pages(donor.address(at), table.address(a), b - a)
            except OSError as e:
                self._failed(e)
                donor.give_back(at, at + b - a)
                return False
            self.moved_bytes += b - a
            return True

    def _take_spare(self, table: Any, a: int, b: int) -> bool:
        """Move spare pages under ``[a, b)`` (under ``lock``): all of it in one move, so the table's mapping for
        the range is replaced whole, never split into more mappings."""
        sp, n = self._spare, (b - a) // HUGE_PAGE
        if sp is None or not self.enabled or n == 0 or (b - a) % HUGE_PAGE:
            return False
        i = sp.run(n)
        if i is None:
            return False
        sp.claim(i, n)
        try:
            move_pages(sp.base + i * HUGE_PAGE, table.address(a), b - a)
        except OSError as e:
            for j in range(i, i + n):  # claimed, not moved: still backed
                sp.release(j)
            self._failed(e)
            return False
        self.moved_bytes += b - a
        self.spare_moved_bytes += b - a
        return True

    def _failed(self, e: OSError) -> None:
        """The kernel cannot move pages: from now on the pool holds nothing (under ``lock``)."""
        self.enabled = False
        log.info("offload: evicted experts' pages are given back, not reused (mremap: %s)", e)
        self._trim(0)

    def refill(self) -> None:
        """Fault spare pages in, up to the limit, on the pool's thread (started the first time), while the
        model computes on."""
        with self.lock:
            if self._spare is None or self._closed or not self.enabled:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, name="offload-spare-pages", daemon=True)
                self._thread.start()
            self.lock.notify_all()

    def _fill(self) -> None:
        sp = self._spare
        assert sp is not None
        while True:
            with self.lock:
                while True:
                    if self._closed or not self.enabled:
                        return
                    i = sp.next_empty() if self.bytes + HUGE_PAGE <= self.limit else None
                    if i is not None:
                        break
                    self.lock.wait()
                sp.filling.add(i)
            try:
                sp.touch(i)  # outside the lock: the fault (zeroing 2 MiB, or the host backing it) takes time
            finally:
                with self.lock:
                    sp.filling.discard(i)
                    if self._closed or not self.enabled or self._kept() + HUGE_PAGE > self.limit:
                        sp.release(i)  # the pool shrank, filled with evicted pages, or stopped meanwhile
                    else:
                        sp.ready[i] = True
                        sp.count += 1
                    self.lock.notify_all()

    def _drop_spare(self, nbytes: int) -> None:
        """Give back ready spare pages, highest first, until ``nbytes`` are given back or none is left
        (under ``lock``)."""
        sp = self._spare
        if sp is None:
            return
        for i in range(sp.pages - 1, -1, -1):
            if nbytes <= 0:
                return
            if sp.ready[i]:
                sp.drop(i)
                nbytes -= HUGE_PAGE

    def resize(self, limit: int) -> None:
        """Hold at most ``limit`` bytes from now on (what the latest batch of reads took), giving back the rest."""
        with self.lock:
            self.limit = limit
            self._trim(limit)

    def _trim(self, limit: int) -> None:
        """Give back spare pages, then held ranges, until at most ``limit`` bytes are kept (under ``lock``); a page
        being faulted in is released by the thread once it is in."""
        self._drop_spare(self._kept() - limit)
        for size, rest in self.held.items():
            while rest and self._kept() > limit:
                t, x = rest.pop()
                t.give_back(x, x + size)
                self.held_bytes -= size

    def forget(self, table: Any) -> None:
        """Drop what ``table`` gave (it is closing: its mapping goes)."""
        with self.lock:
            for size, rest in self.held.items():
                kept = [(t, x) for t, x in rest if t is not table]
                self.held_bytes -= size * (len(rest) - len(kept))
                self.held[size] = kept

    def close(self) -> None:
        """Stop the thread and unmap the spare pages (what the tables gave is theirs: they close after)."""
        with self.lock:
            self._closed = True
            self.lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self.lock:
            if self._spare is not None:
                self._spare.close()
                self._spare = None

