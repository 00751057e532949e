"""CUDA staging: host ring → device ring on a copy stream, ordered by events, never by host syncs.

Per unit i (all on the GPU's queues; the host only enqueues)::

    copy stream:    wait(free[slot])  →  copy host(i) → slot  →  record ready[slot]
    compute stream: wait(ready[slot]) →  unit i's forward      →  record free[slot]

``stage(i)`` is called from unit i's pre-hook. Besides unit i it starts copies for the units the
prefetcher expects next whose disk reads have already finished (``Prefetcher.peek``), so the copy
of unit i+1 runs while unit i computes. A host buffer lent to a copy is returned to the prefetcher
once that copy's ``ready`` event has completed (polled with ``event.query()``, which does not block).

Host buffers are page-aligned anonymous mappings registered with ``cudaHostRegister``, so disk
reads land directly in memory the GPU can DMA from, and O_DIRECT still works on them. Device slots
are allocated once; tensor views inside them are 256-byte aligned (the store's layout).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .errors import OffloadError
from .io import HostBuffer
from .store import UnitRecord


def register_host_buffer(buf: HostBuffer) -> None:
    """Pin an existing page-aligned buffer in place (no copy, same address for the readers)."""
    if buf.registered or not torch.cuda.is_available():
        return
    rc = torch.cuda.cudart().cudaHostRegister(buf.address, buf.nbytes, 1)  # 1: portable (every GPU)
    err = int(getattr(rc, "value", rc))
    if err != 0:
        raise OffloadError(f"cudaHostRegister of a {buf.nbytes}-byte staging buffer failed (cudaError {err}): "
                           f"the system may limit locked memory (ulimit -l); lower prefetch= or cpu_memory=")
    buf.registered = True


def unregister_host_buffer(buf: HostBuffer) -> None:
    if buf.registered:
        torch.cuda.cudart().cudaHostUnregister(buf.address)
        buf.registered = False


@dataclasses.dataclass
class _DeviceSlot:
    tensor: torch.Tensor
    ready: torch.cuda.Event
    free: torch.cuda.Event
    unit: int | None = None
    in_use: bool = False
    lent_host: int | None = None  # unit whose host buffer this slot's copy still reads from


class CudaStager:
    """A ring of ``prefetch + 1`` device slots (plus a GPU tier) fed by one copy stream."""

    def __init__(self, device: torch.device, prefetch: int, records: Sequence[UnitRecord], indices: Sequence[int],
                 gpu_resident: Sequence[int] = ()):
        if not torch.cuda.is_available():
            raise OffloadError(f"units are to execute on {device} but CUDA is not available")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.records = list(records)
        self.indices = set(indices)
        self.gpu_resident = set(gpu_resident)
        streamed = [self.records[i].data_bytes for i in indices if i not in self.gpu_resident]
        slot_bytes = max(streamed, default=0)
        n = min(prefetch + 1, len(streamed))
        with torch.cuda.device(self.device):
            self.copy_stream = torch.cuda.Stream(self.device)
            self.slots = [_DeviceSlot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device),
                                      torch.cuda.Event(), torch.cuda.Event()) for _ in range(n)]
            self.resident: dict[int, torch.Tensor] = {}
        self.slot_bytes = slot_bytes
        self.prefetcher = None

    def attach(self, prefetcher) -> None:  # noqa: ANN001 - avoids an import cycle
        self.prefetcher = prefetcher

    def load_gpu_tier(self) -> None:
        """Read the GPU-tier units from disk once and copy them to the device (enable time, synchronous)."""
        assert self.prefetcher is not None
        for i in sorted(self.gpu_resident):
            buf = HostBuffer(self.records[i].data_bytes)
            self.prefetcher.read_into({i: buf})
            t = torch.empty(self.records[i].data_bytes, dtype=torch.uint8, device=self.device)
            t.copy_(buf.tensor[:self.records[i].data_bytes])
            self.resident[i] = t
            buf.close()

    # ------------------------------------------------------------------ per unit

    def stage(self, index: int, host: torch.Tensor) -> torch.Tensor:
        if index in self.resident:
            return self.resident[index]
        self._reap()
        slot = self._slot_of(index)
        if slot is None:
            slot = self._claim({index})
            # The hook releases unit i's host buffer after its forward is *enqueued*; the copy may still
            # be reading it then, so pin it here and return it only when the copy's event has completed.
            pinned = self.prefetcher.peek(index) if self.prefetcher is not None else None
            self._copy(slot, index, host, lent=pinned is not None)
        slot.in_use = True
        torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._copy_ahead(index)
        return slot.tensor[:self.records[index].data_bytes]

    def done(self, index: int) -> None:
        if index in self.resident:
            return
        slot = self._slot_of(index)
        if slot is not None:
            slot.free.record(torch.cuda.current_stream(self.device))
            slot.in_use = False

    # ------------------------------------------------------------------ internals

    def _copy(self, slot: _DeviceSlot, index: int, host: torch.Tensor, lent: bool) -> None:
        n = self.records[index].data_bytes
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slot.free)  # the slot's previous unit has finished computing
            slot.tensor[:n].copy_(host[:n], non_blocking=True)
            slot.ready.record(self.copy_stream)
        slot.unit = index
        slot.lent_host = index if lent else None

    def _copy_ahead(self, index: int) -> None:
        if self.prefetcher is None:
            return
        window = [j for j in self.prefetcher.window(index, include_resident=True)
                  if j not in self.resident and j in self.indices]
        keep = set(window) | {index}
        for j in window:
            if self._slot_of(j) is not None:
                continue
            free = [s for s in self.slots if not s.in_use and s.lent_host is None and (s.unit is None or s.unit not in keep)]
            if not free:
                return
            host = self.prefetcher.peek(j)
            if host is None:
                return  # not read from disk yet; its own pre-hook will copy it
            self._copy(free[0], j, host, lent=True)

    def _reap(self) -> None:
        """Give host buffers back to the prefetcher once the copies reading them have finished."""
        for s in self.slots:
            if s.lent_host is not None and s.ready.query():
                assert self.prefetcher is not None
                self.prefetcher.release(s.lent_host)
                s.lent_host = None

    def _claim(self, keep: set[int]) -> _DeviceSlot:
        window = set(self.prefetcher.window(next(iter(keep)))) if self.prefetcher is not None else set()
        candidates = [s for s in self.slots if not s.in_use]
        for pref in (lambda s: s.unit is None, lambda s: s.unit not in keep | window, lambda s: s.unit not in keep):
            for s in candidates:
                if pref(s):
                    if s.lent_host is not None:
                        # Overwriting an ahead-copy: the new copy is queued behind it on the same stream,
                        # and what the old one still reads is discarded, so no host sync is needed.
                        assert self.prefetcher is not None
                        self.prefetcher.release(s.lent_host)
                        s.lent_host = None
                    return s
        raise OffloadError(f"all {len(self.slots)} device slots are held by units still executing: raise prefetch=")

    def _slot_of(self, index: int) -> _DeviceSlot | None:
        for s in self.slots:
            if s.unit == index:
                return s
        return None

    def close(self) -> None:
        if self.slots:
            self.copy_stream.synchronize()
            for s in self.slots:
                if s.lent_host is not None and self.prefetcher is not None and not self.prefetcher.closed:
                    self.prefetcher.release(s.lent_host)
        self.slots = []
        self.resident = {}
