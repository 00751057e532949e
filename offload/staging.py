"""Staging memory and who may use it: page-aligned host buffers, the ring of them, and leases.

A unit's bytes go disk → a ring slot (the readers write it) → the unit's forward, or a copy to the
GPU (the stager reads it). The ring is the slots' only owner. Everyone else holds a ``Lease``:

    lease = ring.lease(slot, unit)     # the slot cannot be reused while a lease is live
    lease.release()                    # the forward is over
    lease.release(after=event)         # a copy still reads it: reusable once ``event`` completes

A released lease with a fence (a CUDA event, or anything with ``query``/``synchronize``) keeps the
slot from being reused until the fence completes; whoever needs that slot *waits* on the fence
(bounded by ``StagingConfig.fence_timeout_s``, with the reason in the error), never raises at once
and never spins. The schedule (which unit goes into which slot) is ``prefetch.py``'s; this module
only keeps the books, under one lock that the schedule shares.
"""
from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ._fileio import PAGE
from .errors import OffloadError

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) PMD size
BOUNCE_MIN_BYTES = 64 << 10  # a misaligned read this big goes O_DIRECT through a bounce page; smaller: buffered


class HostBuffer:
    """A page-aligned, zero-filled host buffer (anonymous mmap), also visible as a uint8 tensor.

    Anonymous mappings are page aligned, which O_DIRECT needs, and can be registered with CUDA
    (``cudaHostRegister``) in place, so one buffer serves every reader and the copy engine.

    Buffers of 2 MiB or more are placed on a 2 MiB boundary and advised as transparent huge pages
    (``MADV_HUGEPAGE``). That is most of the reader's CPU cost: an O_DIRECT read pins its
    destination page by page, and a 1 MiB request over 4 KiB pages is 256 pins and 256 DMA
    segments (split into several device requests), over a huge page it is one. bench-disk measured
    sys time per GB falling from 0.05-0.08 s to 0.005-0.02 s, and bandwidth rising (README). The
    mapping is over-allocated by up to 2 MiB of address space to find the boundary, and only whole
    huge pages inside ``nbytes`` are advised (the tail stays on 4 KiB pages), so resident memory is
    ``nbytes``, never rounded up to 2 MiB: memory budgets count buffers exactly. ``huge=False`` or
    THP ``never`` gives plain 4 KiB pages.
    """

    def __init__(self, nbytes: int, huge: bool = True):
        self.nbytes = max(PAGE, (int(nbytes) + PAGE - 1) // PAGE * PAGE)
        huge = huge and self.nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")
        span = self.nbytes + HUGE_PAGE - PAGE if huge else self.nbytes
        self._mm: mmap.mmap | None = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with torch.inference_mode(False):  # made during a forward under inference mode (a ring made when units
            whole = torch.frombuffer(self._mm, dtype=torch.uint8)  # first stream), views of it would not serve later ones
        self._pad = (-whole.data_ptr()) % HUGE_PAGE if huge else 0
        self.huge = False
        if huge:
            try:
                self.advise(mmap.MADV_HUGEPAGE, 0, self.nbytes // HUGE_PAGE * HUGE_PAGE)
                self.huge = True
            except OSError:  # THP compiled out of this kernel: 4 KiB pages still work
                pass
        with torch.inference_mode(False):
            self.tensor = whole[self._pad:self._pad + self.nbytes]
        self.address = self.tensor.data_ptr()
        self.registered = False  # page-locked for DMA (transfer.register_host_buffer)
        self.on_close: list[Callable[[HostBuffer], None]] = []

    @property
    def closed(self) -> bool:
        return self._mm is None

    def advise(self, advice: int, offset: int, length: int) -> None:
        """``madvise`` bytes ``[offset, offset + length)`` of the buffer (huge pages on or off, pages given back)."""
        assert self._mm is not None, "buffer is closed"
        self._mm.madvise(advice, self._pad + offset, length)

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        assert self._mm is not None, "buffer is closed"
        end = self.nbytes if length is None else offset + length
        return memoryview(self._mm)[self._pad + offset:self._pad + end]

    def close(self) -> None:
        """Drop this object's references; the mapping is unmapped when the last view dies.

        ``torch.frombuffer`` does not hold a buffer export, so ``mmap.close()`` here could unmap
        memory under a tensor someone still holds. Reference counting frees it safely instead.
        """
        if self._mm is None:
            return
        for undo in reversed(self.on_close):  # e.g. cudaHostUnregister, added by whoever registered it
            undo(self)
        self.on_close = []
        self.tensor = None  # type: ignore[assignment]
        self._mm = None


class Fence(Protocol):
    """Completion of work that still reads a buffer (``torch.cuda.Event`` satisfies it)."""

    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


def wait_fence(fence: Fence, timeout_s: float, what: str) -> None:
    """Wait for ``fence`` with a bound; sleeps with back-off (a CUDA event has no timed wait)."""
    if fence.query():
        return
    deadline = time.monotonic() + timeout_s
    pause = 50e-6
    while not fence.query():
        if time.monotonic() > deadline:
            raise OffloadError(f"{what}: waited {timeout_s:.0f} s for a copy still reading this staging buffer "
                               f"(a device that stopped making progress?); raise fence_timeout_s if the device "
                               f"is this slow")
        time.sleep(pause)
        pause = min(pause * 2, 2e-3)


class Slot:
    """One ring buffer and its books. Only ``HostRing`` and the schedule (under ``ring.lock``) touch it."""

    __slots__ = ("index", "buffer", "unit", "load", "holders", "fences", "reserved_for")

    def __init__(self, index: int, buffer: HostBuffer):
        self.index, self.buffer = index, buffer
        self.unit: int | None = None  # whose bytes it holds or is being read into it
        self.load: Any = None  # the read filling it (has ``done``); None once forgotten
        self.holders = 0  # live leases
        self.fences: list[Fence] = []  # released leases whose copies may still read the buffer
        self.reserved_for: int | None = None  # a demand read waiting for this slot's previous user

    def reading(self) -> bool:
        return self.load is not None and not self.load.done.is_set()

    def fenced(self) -> bool:
        self.fences = [f for f in self.fences if not f.query()]
        return bool(self.fences)

    def idle(self) -> bool:
        """Nobody uses the buffer: no lease, no read writing it, no copy reading it, no reservation."""
        return self.holders == 0 and self.reserved_for is None and not self.reading() and not self.fenced()

    def __repr__(self) -> str:
        return (f"<slot {self.index} unit={self.unit} holders={self.holders} reading={self.reading()} "
                f"fences={len(self.fences)} reserved_for={self.reserved_for}>")


class Lease:
    """The right to read one unit's bytes until ``release``. Released exactly once (again is a no-op)."""

    __slots__ = ("ring", "slot", "unit", "tensor", "_live")

    def __init__(self, ring: HostRing | None, slot: Slot | None, unit: int, tensor: torch.Tensor):
        self.ring, self.slot, self.unit, self.tensor = ring, slot, unit, tensor
        self._live = slot is not None

    def release(self, after: Fence | None = None) -> None:
        """The holder is done; with ``after``, the buffer stays unavailable until that fence completes."""
        if not self._live:
            return
        self._live = False
        assert self.ring is not None and self.slot is not None
        self.ring._return(self.slot, after)

    @classmethod
    def outside_ring(cls, unit: int, tensor: torch.Tensor) -> Lease:
        """A lease on a buffer outside the ring (the RAM tier): nothing to give back."""
        return cls(None, None, unit, tensor)


class HostRing:
    """``config.ring_slots`` buffers of ``config.slot_bytes``: the only host staging memory for streamed units."""

    def __init__(self, slots: int, slot_bytes: int):
        self.lock = threading.RLock()  # shared with the schedule: slot state and decisions change together
        self.slot_bytes = slot_bytes
        self.slots = [Slot(k, HostBuffer(slot_bytes)) for k in range(slots)]

    def find(self, unit: int) -> Slot | None:
        for s in self.slots:
            if s.unit == unit:
                return s
        return None

    def lease(self, slot: Slot, nbytes: int) -> Lease:
        assert slot.unit is not None
        slot.holders += 1
        return Lease(self, slot, slot.unit, slot.buffer.tensor[:nbytes])

    def _return(self, slot: Slot, after: Fence | None) -> None:
        with self.lock:
            slot.holders -= 1
            assert slot.holders >= 0
            if after is not None and not after.query():
                slot.fences.append(after)

    def holders(self) -> int:
        with self.lock:
            return sum(s.holders for s in self.slots)

    def buffers(self) -> list[HostBuffer]:
        return [s.buffer for s in self.slots]

    def close(self) -> None:
        for s in self.slots:
            s.buffer.close()
        self.slots = []


_bounce = threading.local()


def bounces(offset: int, dest: memoryview, file_size: int) -> bool:
    """Whether a misaligned read of ``dest`` at ``offset`` goes through ``read_bounced``: big enough, into a
    writable buffer, and inside the file (a read past its end takes the plain path, which raises the
    short read naming the request; a read-only destination raises there too)."""
    return len(dest) >= BOUNCE_MIN_BYTES and not dest.readonly and offset + len(dest) <= file_size


def read_bounced(read_direct: Callable[[int, int, int], None], read_buffered: Callable[[int, memoryview], None],
                 offset: int, dest: memoryview, file_size: int) -> None:
    """Read ``len(dest)`` bytes at ``offset`` into ``dest`` where O_DIRECT cannot write into ``dest`` itself
    (the offset or the address is not page aligned: a checkpoint's per-expert tensors read in place):
    whole pages O_DIRECT into this thread's 2 MiB huge-page bounce buffer, copied out, and the file's
    partial last page (which O_DIRECT cannot read) buffered.

    Buffered, such reads went through the page cache with its readahead and eviction: 3 MiB pieces at
    random offsets, cold, read at 0.66-0.79 GB/s that way and 1.05-1.50 GB/s this way (2 MiB window; 4 and
    8 MiB were no faster). ``read_direct(address, nbytes, offset)`` reads page-aligned ranges;
    ``read_buffered(offset, view)`` any range."""
    buf = getattr(_bounce, "buffer", None)
    if buf is None:
        buf = _bounce.buffer = HostBuffer(HUGE_PAGE)  # one per reader thread, for the thread's life
    out = torch.frombuffer(dest, dtype=torch.uint8) if len(dest) else None
    end = offset + len(dest)
    direct_end = min(end, file_size // PAGE * PAGE)  # bytes past the last whole page: buffered
    pos = offset
    while pos < direct_end:
        start = pos // PAGE * PAGE
        stop = min(start + buf.nbytes, -(-direct_end // PAGE) * PAGE)
        read_direct(buf.address, stop - start, start)
        take = min(stop, direct_end) - pos
        assert out is not None
        out[pos - offset:pos - offset + take].copy_(buf.tensor[pos - start:pos - start + take])  # GIL released
        pos += take
    if pos < end:
        read_buffered(pos, dest[pos - offset:])
