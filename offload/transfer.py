"""Stagers: turn a leased host buffer into the bytes a unit computes from, on its device.

One protocol, two implementations::

    stage(i) -> uint8 tensor   # unit i's bytes where it computes, valid until done(i)
    done(i)                    # unit i's forward has been issued (CPU: finished)

* ``CpuStager``: the host buffer *is* the compute buffer. ``stage`` leases it, ``done`` releases it.
* ``CudaStager``: a ring of ``prefetch + 1`` device slots (plus a GPU tier of units kept on the
  device) fed by one copy stream, ordered by events, never by host syncs::

      copy stream:    wait(free[slot]) → copy host lease(i) → slot → record ready[slot]
                      lease.release(after=ready[slot])       # the host slot waits for the copy
      compute stream: wait(ready[slot]) → unit i's forward → record free[slot]

  Besides unit i it copies the units the schedule expects next whose reads have finished
  (``Prefetcher.try_acquire``), so the copy of unit i+1 overlaps unit i's compute. A host buffer
  goes back to the ring only through its lease, fenced by the copy's event: whoever needs that host
  slot waits for the copy (bounded), so a GPU running behind the CPU slows the host, never errors.

Streams, events and device memory come from a backend: ``CudaBackend`` (torch.cuda) in production,
a simulated one in the tests (``tests/simgpu.py``: same ordering rules, worker threads, injectable
delays), so every ordering rule here runs on a CPU-only CI.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .errors import OffloadError
from .prefetch import Prefetcher
from .staging import HostBuffer, Lease
from .store import UnitRecord
from .trace import COPY_TRACK, DEVICE_COMPUTE_TRACK, Tracer


class Stager(Protocol):
    def stage(self, unit: int) -> torch.Tensor: ...
    def done(self, unit: int) -> None: ...
    def close(self) -> None: ...


class CpuStager:
    """On the CPU the host buffer is the compute buffer: parameters are views into the leased slot."""

    def __init__(self, prefetcher: Prefetcher):
        self.prefetcher = prefetcher
        self._leases: dict[int, Lease] = {}

    def stage(self, unit: int) -> torch.Tensor:
        lease = self.prefetcher.acquire(unit)
        self._leases[unit] = lease
        return lease.tensor

    def done(self, unit: int) -> None:
        lease = self._leases.pop(unit, None)
        if lease is not None:
            lease.release()

    def close(self) -> None:
        for lease in self._leases.values():
            lease.release()
        self._leases = {}


# ------------------------------------------------------------------------------ CUDA


def register_host_buffer(buf: HostBuffer) -> None:
    """Page-lock an existing page-aligned buffer in place (no copy, same address for the readers)."""
    if buf.registered or not torch.cuda.is_available():
        return
    rc = torch.cuda.cudart().cudaHostRegister(buf.address, buf.nbytes, 1)  # 1: portable (every GPU)
    err = int(getattr(rc, "value", rc))
    if err != 0:
        raise OffloadError(f"cudaHostRegister of a {buf.nbytes}-byte staging buffer failed (cudaError {err}): "
                           f"the system may limit locked memory (ulimit -l); lower prefetch= or cpu_memory=")
    buf.registered = True
    buf.on_close.append(_unregister)


def _unregister(buf: HostBuffer) -> None:
    if buf.registered:
        torch.cuda.cudart().cudaHostUnregister(buf.address)
        buf.registered = False


class CudaBackend:
    """What ``CudaStager`` needs from a device: streams, events, memory and an async copy."""

    def __init__(self, device: torch.device):
        if not torch.cuda.is_available():
            raise OffloadError(f"units are to execute on {device} but CUDA is not available")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def event(self, timing: bool = False) -> Any:
        return torch.cuda.Event(enable_timing=timing)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def register(self, buf: HostBuffer) -> None:
        register_host_buffer(buf)

    def free_bytes(self) -> int:
        return int(torch.cuda.mem_get_info(self.device)[0])


@dataclasses.dataclass
class _DeviceSlot:
    tensor: torch.Tensor
    ready: Any  # recorded on the copy stream after the copy into this slot
    free: Any  # recorded on the compute stream after the forward that used this slot
    unit: int | None = None
    in_use: bool = False


class CudaStager:
    """A ring of ``prefetch + 1`` device slots (plus a GPU tier) fed by one copy stream."""

    def __init__(self, backend: Any, prefetcher: Prefetcher, records: Sequence[UnitRecord], indices: Sequence[int],
                 gpu_resident: Sequence[int] = (), tracer: Tracer | None = None):
        self.backend = backend
        self.tracer = tracer
        self.device = backend.device
        self.prefetcher = prefetcher
        self.records = list(records)
        self.indices = set(indices)
        self.gpu_resident = set(gpu_resident)
        streamed = [self.records[i].data_bytes for i in indices if i not in self.gpu_resident]
        self.slot_bytes = max(streamed, default=0)
        n = min(prefetcher.config.prefetch + 1, len(streamed))
        self.copy_stream = backend.stream()
        self.slots = [_DeviceSlot(backend.empty(self.slot_bytes), backend.event(), backend.event()) for _ in range(n)]
        self.resident: dict[int, torch.Tensor] = {}
        for buf in prefetcher.host_buffers():
            backend.register(buf)  # DMA straight from the buffers the readers fill
        self._started: dict[int, Any] = {}  # unit -> timing event at the start of its forward (tracing)
        if tracer is not None:  # device spans are placed relative to one event synchronised now
            origin = backend.event(timing=True)
            origin.record(backend.current_stream())
            origin.synchronize()
            tracer.set_device_origin(origin, tracer.now())

    def load_gpu_tier(self) -> None:
        """Read the GPU-tier units from disk once and copy them to the device (enable time, synchronous)."""
        for i in sorted(self.gpu_resident):
            n = self.records[i].data_bytes
            buf = HostBuffer(n)
            try:
                self.prefetcher.read_into({i: buf})
                t = self.backend.empty(n)
                self.backend.copy(self.copy_stream, t, buf.tensor[:n])
                self.copy_stream.synchronize()
            finally:
                buf.close()
            self.resident[i] = t

    # ------------------------------------------------------------------ per unit

    def stage(self, unit: int) -> torch.Tensor:
        if unit in self.resident:
            self.prefetcher.advance(unit)
            return self.resident[unit]
        slot = self._slot_of(unit)
        if slot is None:
            slot = self._claim(unit)  # before the lease: a refusal here must not strand a host buffer
            self._copy(slot, unit, self.prefetcher.acquire(unit))  # the acquire waits for the disk, if it must
        else:
            self.prefetcher.advance(unit)  # copied ahead: only the schedule needs to hear of it
        slot.in_use = True
        compute = self.backend.current_stream()
        compute.wait_event(slot.ready)
        if self.tracer is not None:
            self._started[unit] = self._mark(compute)
        self._copy_ahead(unit)
        return slot.tensor[:self.records[unit].data_bytes]

    def done(self, unit: int) -> None:
        if unit in self.resident:
            return
        slot = self._slot_of(unit)
        if slot is not None and slot.in_use:
            compute = self.backend.current_stream()
            slot.free.record(compute)
            slot.in_use = False
            start = self._started.pop(unit, None)
            if start is not None and self.tracer is not None:
                self.tracer.device_span(DEVICE_COMPUTE_TRACK, f"forward {self.records[unit].name}", "forward",
                                        start, self._mark(compute))

    # ------------------------------------------------------------------ internals

    def _copy(self, slot: _DeviceSlot, unit: int, lease: Lease) -> None:
        n = self.records[unit].data_bytes
        try:
            self.copy_stream.wait_event(slot.free)  # the slot's previous unit has finished computing
            start = self._mark(self.copy_stream) if self.tracer is not None else None
            self.backend.copy(self.copy_stream, slot.tensor[:n], lease.tensor[:n])
            slot.ready.record(self.copy_stream)
        except BaseException:
            slot.unit = None
            with contextlib.suppress(Exception):
                self.copy_stream.synchronize()  # error path only: nothing enqueued may still read the buffer
            lease.release()
            raise
        if start is not None and self.tracer is not None:
            self.tracer.device_span(COPY_TRACK, f"copy {self.records[unit].name}", "copy", start,
                                    self._mark(self.copy_stream), bytes=n)
        slot.unit = unit
        lease.release(after=slot.ready)

    def _mark(self, stream: Any) -> Any:
        event = self.backend.event(timing=True)
        event.record(stream)
        return event

    def _copy_ahead(self, unit: int) -> None:
        window = [j for j in self.prefetcher.window(unit, include_resident=True)
                  if j not in self.resident and j in self.indices]
        keep = set(window) | {unit}
        for j in window:
            if self._slot_of(j) is not None:
                continue
            free = [s for s in self.slots if not s.in_use and (s.unit is None or s.unit not in keep)]
            if not free:
                return
            lease = self.prefetcher.try_acquire(j)
            if lease is None:
                return  # not read from disk yet; its own stage() will copy it
            self._copy(min(free, key=lambda s: s.unit is not None), j, lease)

    def _claim(self, unit: int) -> _DeviceSlot:
        window = self.prefetcher.window(unit, include_resident=True)
        candidates = [s for s in self.slots if not s.in_use]
        if not candidates:
            raise OffloadError(f"unit {self.records[unit].name} needs a device slot but all {len(self.slots)} are "
                               f"held by units still executing (units that call each other): raise prefetch=")

        def need(s: _DeviceSlot) -> tuple[int, int]:  # overwriting an ahead-copy is ordered on the copy stream
            if s.unit is None:
                return (0, 0)
            if s.unit not in window:
                return (1, 0)
            return (2, -window.index(s.unit))
        return min(candidates, key=need)

    def _slot_of(self, unit: int) -> _DeviceSlot | None:
        for s in self.slots:
            if s.unit == unit:
                return s
        return None

    def close(self) -> None:
        """Wait for every copy (host buffers may be freed right after), then drop the device memory."""
        if self.slots or self.resident:
            self.copy_stream.synchronize()
        self.slots = []
        self.resident = {}
