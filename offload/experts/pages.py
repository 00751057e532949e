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
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from typing import Any

log = logging.getLogger("offload")

_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4
# Private knob for benchmarks and tests: False gives pages back on eviction and reads into fresh ones.
_MOVE_PAGES = True


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


class PagePool:
    """Backed huge-page ranges of evicted experts, by size, waiting to be moved under the next read.

    ``give(table, a, b)`` takes table bytes ``[a, b)`` (an evicted expert's huge pages) if there is room;
    ``take(table, a, b)`` moves a held range of that size under ``[a, b)`` before a read fills it. Every
    call holds the pool's lock; the ranges given are not read or written by anyone until taken."""

    def __init__(self) -> None:
        self.held: dict[int, list[tuple[Any, int]]] = {}  # size -> [(table, offset)]
        self.bytes = 0
        self.limit = 0  # the most bytes held: what the latest batch of expert reads took (``resize``)
        self.moved_bytes = 0  # moved under a read instead of faulted in
        self.lock = threading.Lock()
        self.enabled = _MOVE_PAGES and _mremap is not None

    def give(self, table: Any, a: int, b: int) -> bool:
        with self.lock:
            if not self.enabled or self.bytes + (b - a) > self.limit:
                return False
            self.held.setdefault(b - a, []).append((table, a))
            self.bytes += b - a
            return True

    def take(self, table: Any, a: int, b: int) -> bool:
        with self.lock:
            spare = self.held.get(b - a)
            if not spare:
                return False
            if (table, a) in spare:  # its own pages are still there (evicted, routed again): no longer a donor,
                spare.remove((table, a))  # or a later take would move them from under the expert
                self.bytes -= b - a
                return True
            donor, at = spare.pop()
            self.bytes -= b - a
            try:
                move_pages(donor.address(at), table.address(a), b - a)
            except OSError as e:
                self.enabled = False
                log.info("offload: evicted experts' pages are given back, not reused (mremap: %s)", e)
                donor.give_back(at, at + b - a)
                self._trim(0)
                return False
            self.moved_bytes += b - a
            return True

    def resize(self, limit: int) -> None:
        """Hold at most ``limit`` bytes from now on (what the latest batch of reads took), giving back the rest."""
        with self.lock:
            self.limit = limit
            self._trim(limit)

    def _trim(self, limit: int) -> None:
        """Give back held ranges until at most ``limit`` bytes are held (under ``lock``)."""
        for size, rest in self.held.items():
            while rest and self.bytes > limit:
                t, x = rest.pop()
                t.give_back(x, x + size)
                self.bytes -= size

    def forget(self, table: Any) -> None:
        """Drop what ``table`` gave (it is closing: its mapping goes)."""
        with self.lock:
            for size, rest in self.held.items():
                kept = [(t, x) for t, x in rest if t is not table]
                self.bytes -= size * (len(rest) - len(kept))
                self.held[size] = kept

