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
import functools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ._memory import format_bytes, parse_bytes
from .errors import OffloadError
from .prefetch import Prefetcher
from .staging import HostBuffer, Lease, Slot
from .manifest import UnitRecord
from .trace import COPY_TRACK, DEVICE_COMPUTE_TRACK, Tracer


class Stager(Protocol):
    def stage(self, unit: int) -> torch.Tensor: ...
    def done(self, unit: int) -> None: ...
    def close(self) -> None: ...


class CpuStager:
    """On the CPU the host buffer is the compute buffer: parameters are views into the leased slot."""

    host_buffers_only = True  # what stage() returns lives as long as the handle (bindings keep its views)

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


log = logging.getLogger("offload")

# Host memory page-locked for the copy engine, besides the host ring: RAM-tier buffers are registered
# while the total stays under this fraction of physical memory (locked pages cannot be swapped or
# reclaimed: registering a whole RAM tier invites the OOM killer and makes enable slow). The rest of
# the RAM tier is copied from pageable memory (CUDA stages it through its own pinned buffer).
PIN_FRACTION = 0.25
_CUDA_ERRORS = {1: "invalid value", 2: "out of memory (locked-memory limit, ulimit -l?)",
                712: "already registered", 713: "not registered", 801: "operation not supported on this system"}


class RegistrationError(OffloadError):
    """cudaHostRegister refused a buffer; the buffer is still usable, unpinned."""


def _error_name(cudart: Any, err: int) -> str:
    name = _CUDA_ERRORS.get(err)
    if name is None:
        with contextlib.suppress(Exception):
            name = str(cudart.cudaGetErrorString(err))
    return f"cudaError {err}" + (f": {name}" if name else "")


def clear_cuda_error(cudart: Any = None) -> None:
    """Reset the CUDA runtime's per-thread last error (``cudaGetLastError``). A refused cudaHostRegister
    leaves its error there, and PyTorch's next kernel-launch check would raise it as its own."""
    import ctypes
    if cudart is not None and hasattr(cudart, "cudaGetLastError"):
        cudart.cudaGetLastError()
        return
    major = (torch.version.cuda or "12").split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).cudaGetLastError()  # the copy already loaded by torch (same soname)
            return


def register_host_buffer(buf: HostBuffer, cudart: Any = None) -> None:
    """Page-lock an existing page-aligned buffer in place (no copy, same address for the readers).

    A refusal raises ``RegistrationError`` naming CUDA's reason, after clearing CUDA's last error."""
    if buf.registered or (cudart is None and not torch.cuda.is_available()):
        return
    cudart = cudart or torch.cuda.cudart()
    rc = cudart.cudaHostRegister(buf.address, buf.nbytes, 1)  # 1: portable (every GPU)
    err = int(getattr(rc, "value", rc))
    if err != 0:
        clear_cuda_error(cudart)
        hint = " (raise the locked-memory limit, ulimit -l, or lower prefetch=)" if err == 2 else ""
        raise RegistrationError(f"cudaHostRegister of a {buf.nbytes}-byte host buffer failed "
                                f"({_error_name(cudart, err)}){hint}")
    buf.registered = True
    buf.on_close.append(functools.partial(_unregister, cudart=cudart))


def _unregister(buf: HostBuffer, cudart: Any = None) -> None:
    if not buf.registered:
        return
    buf.registered = False
    cudart = cudart or torch.cuda.cudart()
    rc = cudart.cudaHostUnregister(buf.address)
    err = int(getattr(rc, "value", rc))
    if err != 0:
        clear_cuda_error(cudart)
        log.warning("offload: cudaHostUnregister of a %d-byte host buffer failed (%s)", buf.nbytes,
                    _error_name(cudart, err))


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
        with torch.inference_mode(False):  # slots made during a forward under inference mode serve every later one
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def register(self, buf: HostBuffer) -> None:
        register_host_buffer(buf)

    def free_bytes(self) -> int:
        """Memory a new allocation can get: the driver's free memory plus PyTorch's cached, unused blocks."""
        free = int(torch.cuda.mem_get_info(self.device)[0])
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def release_cached(self) -> None:
        torch.cuda.empty_cache()

    def capturing(self) -> bool:
        return bool(torch.cuda.is_current_stream_capturing())


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
                 gpu_tier_units: Sequence[int] = (), tracer: Tracer | None = None):
        self.backend = backend
        self.tracer = tracer
        self.device = backend.device
        self.prefetcher = prefetcher
        self.records = list(records)
        self.indices = set(indices)
        self.gpu_tier_units = set(gpu_tier_units)
        streamed = [self.records[i].data_bytes for i in indices if i not in self.gpu_tier_units]
        self.slot_bytes = max(streamed, default=0)
        n = min(prefetcher.config.prefetch + 1, len(streamed))
        self.copy_stream = backend.stream()
        self.slots = [_DeviceSlot(backend.empty(self.slot_bytes), backend.event(), backend.event()) for _ in range(n)]
        self.gpu_tier: dict[int, torch.Tensor] = {}
        self.pinned_bytes = self._register(prefetcher)
        self._static: int | None = None  # device bytes allocated once the GPU tier is loaded (before any forward)
        self._done_calls = 0
        self.gave_back: list[int] = []  # GPU-tier units given back to streaming (out of memory)
        # given back first when a forward is short of memory: ``give_back(nbytes) -> bytes freed`` of other
        # GPU memory the runtime holds by choice (the routed experts' GPU tier, experts.DeviceTier)
        self.spills: list[Callable[[int], int]] = []
        self._oom_seen = 0  # id() of the out-of-memory error last acted on
        self._started: dict[int, Any] = {}  # unit -> timing event at the start of its forward (tracing)
        if tracer is not None:  # device spans are placed relative to one event synchronised now
            origin = backend.event(timing=True)
            origin.record(backend.current_stream())
            origin.synchronize()
            tracer.set_device_origin(origin, tracer.now())

    def _register(self, prefetcher: Prefetcher) -> int:
        """Page-lock the host ring (DMA straight from the buffers the readers fill) and the RAM tier while
        the total stays under ``PIN_FRACTION`` of physical memory. A refusal is one log line: that buffer
        is copied from pageable memory. Returns the bytes registered."""
        import psutil
        ring, tier = prefetcher.ring.buffers(), list(prefetcher.ram_tier.values())
        cap = max(sum(b.nbytes for b in ring), int(PIN_FRACTION * psutil.virtual_memory().total))
        pinned, refused, skipped = 0, [], 0
        for k, buf in enumerate(ring + tier):
            if k >= len(ring) and pinned + buf.nbytes > cap:
                skipped += 1
                continue
            try:
                self.backend.register(buf)
                pinned += buf.nbytes
            except RegistrationError as e:
                refused.append(str(e))
        if refused:
            log.warning("offload: %d of %d host buffers stay pageable (copies from them are slower): %s",
                        len(refused), len(ring) + len(tier) - skipped, refused[0])
        if skipped:
            log.info("offload: %d RAM-tier units not page-locked (%.0f%% of RAM is the cap); copied from pageable "
                     "memory", skipped, 100 * PIN_FRACTION)
        return pinned

    def load_gpu_tier(self) -> None:
        """Read the GPU-tier units from disk once and copy them to the device (enable time).

        Two page-locked staging buffers alternate: unit k+1 is read from disk while unit k crosses PCIe
        (a buffer is reused only after its copy's event), so the fill costs max(disk, PCIe), not the sum."""
        order = sorted(self.gpu_tier_units)
        if order:
            n_max = max(self.records[i].data_bytes for i in order)
            bufs = [HostBuffer(n_max) for _ in range(min(2, len(order)))]
            fences: list[Any] = [None] * len(bufs)
            try:
                for buf in bufs:
                    with contextlib.suppress(RegistrationError):
                        self.backend.register(buf)
                for k, i in enumerate(order):
                    b = k % len(bufs)
                    if fences[b] is not None:
                        fences[b].synchronize()  # the copy out of this buffer has finished
                    n = self.records[i].data_bytes
                    self.prefetcher.read_into({i: bufs[b]})  # overlaps the copy of the previous unit
                    t = self.backend.empty(n)
                    self.backend.copy(self.copy_stream, t, bufs[b].tensor[:n])
                    fences[b] = self.backend.event()
                    fences[b].record(self.copy_stream)
                    self.gpu_tier[i] = t
            finally:
                with contextlib.suppress(Exception):
                    self.copy_stream.synchronize()  # nothing may still read the buffers closed below
                for buf in bufs:
                    buf.close()
        self._static = self.backend.allocated() if hasattr(self.backend, "allocated") else None

    # ------------------------------------------------------------------ memory

    def _watch_memory(self) -> None:
        """Once per pass: the memory a forward took (its peak above what enable left allocated) must still be
        free for the next one; when it is not (the KV cache grew, another process allocated), give back
        GPU-tier units."""
        self._done_calls += 1
        if self._static is None or self._done_calls % max(1, len(self.indices)) or not (self.gpu_tier or self.spills):
            return
        need = max(0, self.backend.peak() - self._static)
        short = need - self.backend.free_bytes()
        if short > 0:
            self._give_back(short, f"a forward needs {format_bytes(need)} and "
                                   f"{format_bytes(self.backend.free_bytes())} is free")

    def _on_error(self, unit: int) -> None:
        """An exception is leaving unit ``unit``'s forward: out of memory gives GPU-tier units back, so the
        call succeeds when repeated."""
        self.on_oom(f"out of memory in {self.records[unit].name}")

    def on_oom(self, where: str) -> None:
        """If the exception being handled is CUDA's out of memory (and not acted on yet): give back what
        ``spills`` hold, then GPU-tier units. Called from a unit's forward, and from the model's (an error
        outside every unit: the head's logits of a long prompt)."""
        err = sys.exc_info()[1]
        if err is None or not (self.gpu_tier or self.spills) or id(err) == self._oom_seen or not _is_oom(err):
            return
        self._oom_seen = id(err)  # once per error: a forward run inside the caller's `except` sees it too
        m = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B)", str(err))
        tried = parse_bytes(m.group(1).replace(" ", "")) if m else 0
        # what the failed allocation lacked, with a quarter more; unknown: half the tier
        want = (max(0, tried - self.backend.free_bytes()) * 5 // 4 if tried
                else sum(self.records[i].data_bytes for i in self.gpu_tier) // 2)
        self._give_back(max(1, want), where)

    def _give_back(self, nbytes: int, why: str) -> None:
        """Free ``nbytes``: first what ``spills`` hold, then move GPU-tier units (the last in order first) to
        streaming; one log line each."""
        for spill in self.spills:
            got = spill(nbytes)
            if got:
                nbytes -= got
                self.backend.release_cached()
                log.warning("offload: %s: gave back %s of routed experts kept on the GPU", why, format_bytes(got))
        if nbytes <= 0 or not self.gpu_tier:
            return
        ring = self.prefetcher.ring
        if self.slots and ring.slots:  # the rings exist: units that fit their slots can stream
            movable = [i for i in sorted(self.gpu_tier, reverse=True)
                       if self.records[i].data_bytes <= min(self.slot_bytes, ring.slot_bytes)]
            new_ring = 0
        else:  # every unit was kept: streaming needs both rings, sized for the largest unit
            movable = sorted(self.gpu_tier, reverse=True)
            new_ring = (self.prefetcher.config.prefetch + 1) * max(self.records[i].data_bytes for i in movable)
        freed, moved = 0, []
        for i in movable:
            if freed >= nbytes + new_ring:
                break
            with self.prefetcher.ring.lock:
                self.prefetcher.elsewhere.discard(i)
            self.gpu_tier_units.discard(i)
            del self.gpu_tier[i]
            freed += self.records[i].data_bytes
            moved.append(i)
        if not moved:
            log.warning("offload: %s; no GPU-tier unit can be given back (none left, or larger than the slots)", why)
            return
        self.gave_back += moved
        self.backend.release_cached()
        if new_ring:
            self._make_rings(max(self.records[i].data_bytes for i in moved))
        log.warning("offload: %s: gave back %d GPU-tier units (%s) to streaming; the GPU tier is now %d units (%s)",
                    why, len(moved), format_bytes(freed), len(self.gpu_tier),
                    format_bytes(sum(self.records[i].data_bytes for i in self.gpu_tier)))

    def _make_rings(self, size: int) -> None:
        """The host ring and the device slots, made when units first have to stream (all were kept)."""
        n = self.prefetcher.config.prefetch + 1
        ring = self.prefetcher.ring
        with ring.lock:
            if not ring.slots:
                ring.slot_bytes = size
                ring.slots = [Slot(k, HostBuffer(size)) for k in range(n)]
                for s in ring.slots:
                    with contextlib.suppress(RegistrationError):
                        self.backend.register(s.buffer)
        if not self.slots:
            self.slot_bytes = size
            self.slots = [_DeviceSlot(self.backend.empty(size), self.backend.event(), self.backend.event())
                          for _ in range(n)]

    # ------------------------------------------------------------------ per unit

    def stage(self, unit: int) -> torch.Tensor:
        if self.backend.capturing():
            raise OffloadError(
                f"unit {self.records[unit].name} is streamed, and the current CUDA stream is capturing a graph "
                f"(CUDA graphs, torch.compile(mode='reduce-overhead'), a static-cache generate): a replay would "
                f"reuse device slots that later copies overwrite. Run streamed models without graph capture")
        if unit in self.gpu_tier:
            self.prefetcher.advance(unit)
            return self.gpu_tier[unit]
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
        self._on_error(unit)
        self._watch_memory()
        if unit in self.gpu_tier:
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
        window = [j for j in self.prefetcher.window(unit, include_ram_tier=True)
                  if j not in self.gpu_tier and j in self.indices]
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
        window = self.prefetcher.window(unit, include_ram_tier=True)
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
        """Wait for every copy (host buffers may be freed right after) and every forward (kernels may still read
        the slots), then drop the device memory."""
        if self.slots or self.gpu_tier:
            self.copy_stream.synchronize()
            self.backend.current_stream().synchronize()
        self.slots = []
        self.gpu_tier = {}


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()
