"""The prefetcher: keep units i+1..i+N reading into a fixed ring while unit i computes.

The whole schedule, per unit, is::

    acquire(i):  wait for load(i) (or read it now: a miss);  start load(i+1 .. i+N)
    compute(i)   # the module's own forward, in the caller's thread
    release(i)

"i+1" means the learned successor of i: every ``acquire`` records ``succ[previous] = current``,
so the wrap from the last block to the first, and an encoder handing over to a decoder, are
followed after they have been seen once (before that, store order is assumed).

Memory is fixed before the first token: ``depth + 1`` host buffers, each the size of the largest
streamed unit, plus one buffer per RAM-tier unit. A slot is reused only when its unit is outside
the look-ahead window, is not executing, and its read has finished.

A read that fails stores its exception on the load; the ``acquire`` that needs that unit raises
``UnitReadError`` naming the unit and the file. Every wait has a timeout and checks ``closed``,
so nothing can hang on a dead worker.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import OffloadError, UnitReadError
from .io import HostBuffer, Reader
from .store import Store, UnitRecord

_POLL_S = 0.1  # how often a blocked wait re-checks that the prefetcher is still open
_IDLE_EXIT_S = 0.5  # an idle worker thread exits after this long; it is restarted on demand
_ids = itertools.count()
_NOTHING = torch.empty(0, dtype=torch.uint8)  # what acquire returns for a unit held on the GPU


class _Task:
    """One read of part of a unit. ``run`` or ``abandon`` is called exactly once."""

    __slots__ = ("load", "offset", "length")

    def __init__(self, load: _Load, offset: int, length: int):
        self.load, self.offset, self.length = load, offset, length

    def run(self) -> None:
        load = self.load
        if load.cancelled or load.error is not None:
            load.task_done(None)
            return
        try:
            if load.t_start == 0.0:
                load.t_start = time.perf_counter()
            load.reader.read(load.handle, load.unit.data_offset + self.offset, load.buffer.view(self.offset, self.length))
        except BaseException as e:  # noqa: BLE001 - carried to the waiter, re-raised there
            load.task_done(e)
            return
        load.task_done(None, self.length)

    def abandon(self) -> None:
        self.load.task_done(OffloadError("prefetcher closed before this read ran"))


class _Load:
    """One unit being read into one buffer. Completes exactly once, error included."""

    def __init__(self, unit: UnitRecord, path: str, buffer: HostBuffer, reader: Reader,
                 on_finish: Callable[[_Load], None] | None = None):
        self.unit, self.path, self.buffer, self.reader = unit, path, buffer, reader
        self.on_finish = on_finish
        self.bytes_done = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False
        self.t_start = 0.0
        self.t_end = 0.0
        self.handle: Any = None
        self._lock = threading.Lock()
        self._pending = 0

    def tasks(self) -> list[_Task]:
        step = self.reader.task_bytes or self.unit.data_bytes
        step = max(step, 1)
        out = [_Task(self, off, min(step, self.unit.data_bytes - off)) for off in range(0, self.unit.data_bytes, step)]
        self._pending = len(out)
        return out

    def task_done(self, error: BaseException | None, nbytes: int = 0) -> None:
        with self._lock:
            self.bytes_done += nbytes
            if error is not None and self.error is None:
                self.error = error
            self._pending -= 1
            finished = self._pending == 0
        if finished:
            self.t_end = time.perf_counter()
            if self.handle is not None:
                with contextlib.suppress(OSError):
                    self.reader.close(self.handle)
                self.handle = None
            if self.on_finish is not None:
                self.on_finish(self)
            self.done.set()

    def fail_now(self, error: BaseException) -> None:
        self.error = error
        self.t_start = self.t_end = time.perf_counter()
        self.done.set()


class _Workers:
    """Named reader threads fed from one deque.

    NOTE (shutdown protocol): ``close()`` sets ``closed``, wakes every thread and joins them. A
    thread finishes the task it is running, then exits; tasks still queued are ``abandon()``-ed, which
    completes their load with an error, so no waiter can block on a read that will never run. An
    idle thread exits on its own after ``_IDLE_EXIT_S`` and ``submit`` starts a new one, so threads
    never outlive the work (an interrupted ``generate`` leaves no readers behind for long).
    """

    def __init__(self, count: int, name: str):
        self.count = max(1, count)
        self.name = name
        self.closed = False
        self._cv = threading.Condition()
        self._queue: collections.deque[_Task] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._serial = itertools.count()

    def submit(self, tasks: Sequence[_Task], urgent: bool = False) -> None:
        with self._cv:
            if self.closed:
                for t in tasks:
                    t.abandon()
                return
            if urgent:
                self._queue.extendleft(reversed(tasks))
            else:
                self._queue.extend(tasks)
            self._threads = [t for t in self._threads if t.is_alive()]
            want = min(self.count, len(self._queue)) - self._idle
            for _ in range(max(0, min(want, self.count - len(self._threads)))):
                t = threading.Thread(target=self._loop, name=f"{self.name}-{next(self._serial)}", daemon=True)
                self._threads.append(t)
                t.start()
            self._cv.notify(len(tasks))

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cv:
                while not self._queue and not self.closed:
                    if time.monotonic() - idle_since > _IDLE_EXIT_S:
                        return
                    self._idle += 1
                    self._cv.wait(_POLL_S)
                    self._idle -= 1
                if self.closed:
                    return
                task = self._queue.popleft()
            task.run()
            idle_since = time.monotonic()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            abandoned = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for t in abandoned:
            t.abandon()
        for t in self._threads:
            t.join()
        self._threads = []


@dataclasses.dataclass
class _Slot:
    buffer: HostBuffer
    unit: int | None = None
    load: _Load | None = None
    users: int = 0


@dataclasses.dataclass
class PrefetchStats:
    """Counters since ``enable`` (or the last ``reset``)."""
    bytes_read: int = 0  # bytes read from disk for streamed units
    read_seconds: float = 0.0  # sum over unit loads of first-byte-to-last-byte time
    wait_seconds: float = 0.0  # time forwards spent blocked waiting for a unit
    units_loaded: int = 0  # completed unit reads
    hits: int = 0  # a forward found its unit staged or already being read
    misses: int = 0  # a forward found its unit not requested: read on demand
    resident_hits: int = 0  # forwards served from the RAM tier
    units_in_flight: int = 0  # reads in progress now


class Prefetcher:
    """Stage streamed units into a ring of ``depth + 1`` host buffers ahead of their forward."""

    def __init__(self, store: Store, units: Sequence[UnitRecord], reader: Reader, depth: int,
                 resident: dict[int, HostBuffer] | None = None, io_threads: int = 8,
                 elsewhere: set[int] | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.store = store
        self.units = list(units)
        self.reader = reader
        self.depth = depth
        self.resident = dict(resident or {})
        self.elsewhere = set(elsewhere or ())  # units kept by another tier (GPU memory): never read here
        n = len(self.units)
        self._succ = {i: (i + 1) % n for i in range(n)}
        self._last: int | None = None
        # Re-entrant: a read can complete (and re-plan) on a thread that already holds it (shutdown).
        self._lock = threading.RLock()
        self._stats_lock = threading.Lock()
        self.closed = False
        self._stats = PrefetchStats()
        streamed = [u for i, u in enumerate(self.units) if i not in self.resident and i not in self.elsewhere]
        self.slot_bytes = max((u.data_bytes for u in streamed), default=0)
        ring = min(depth + 1, len(streamed))
        self._slots = [_Slot(HostBuffer(self.slot_bytes)) for _ in range(ring)]
        self._workers = _Workers(io_threads if reader.task_bytes else min(io_threads, depth + 1), f"offload-io-{next(_ids)}")

    # ------------------------------------------------------------------ the schedule

    def acquire(self, i: int) -> torch.Tensor:
        """Return unit i's bytes (a uint8 tensor), waiting for its read; then keep i+1..i+N requested."""
        unit = self.units[i]
        while True:
            wait_for: _Load | None = None
            with self._lock:
                self._check_open()
                if self._last is not None and self._last != i:
                    self._succ[self._last] = i
                self._last = i
                if i in self.resident or i in self.elsewhere:
                    self._stats.resident_hits += 1
                    self._schedule(i)
                    return self.resident[i].tensor[:unit.data_bytes] if i in self.resident else _NOTHING
                slot = self._slot_of(i)
                if slot is None:
                    slot, wait_for = self._claim(i, demand=True)
                    if slot is not None:
                        self._stats.misses += 1
                        self._start(i, slot, urgent=True)
                else:
                    self._stats.hits += 1
                if slot is not None:
                    slot.users += 1
                    self._schedule(i)
                    load = slot.load
            if slot is not None:
                break
            assert wait_for is not None
            self._wait(wait_for)  # a cancelled prefetch must finish before its buffer is reused
        assert load is not None
        t0 = time.perf_counter()
        self._wait(load)
        waited = time.perf_counter() - t0
        with self._lock:
            self._stats.wait_seconds += waited
            if load.error is not None:
                slot.users -= 1
                if slot.load is load:  # forget the failed read so the next call tries again
                    slot.unit, slot.load = None, None
                err = load.error
        if load.error is not None:
            raise UnitReadError(f"reading unit {unit.name} from {self.store.file_path(unit)} failed: {err}") from err
        return slot.buffer.tensor[:unit.data_bytes]

    def peek(self, i: int) -> torch.Tensor | None:
        """Unit i's bytes if its read already finished cleanly, pinned until ``release(i)``; never blocks.

        The CUDA stager uses this to start host→device copies of units ahead of their forward.
        """
        with self._lock:
            if self.closed:
                return None
            if i in self.resident:
                return self.resident[i].tensor[:self.units[i].data_bytes]
            slot = self._slot_of(i)
            if slot is None or slot.load is None or not slot.load.done.is_set() or slot.load.error is not None:
                return None
            slot.users += 1
            return slot.buffer.tensor[:self.units[i].data_bytes]

    def release(self, i: int) -> None:
        """Unit i's forward is over: its buffer may be reused once it leaves the look-ahead window."""
        if i in self.resident or i in self.elsewhere:
            return
        with self._lock:
            slot = self._slot_of(i)
            if slot is not None and slot.users > 0:
                slot.users -= 1

    def window(self, i: int, include_resident: bool = False) -> list[int]:
        """The streamed units expected after i, nearest first, at most ``depth`` of them.

        ``include_resident`` also counts RAM-tier units (the CUDA stager copies those ahead too).
        """
        out: list[int] = []
        j = i
        for _ in range(len(self.units)):
            j = self._succ.get(j, (j + 1) % len(self.units))
            if j == i:
                break
            if (include_resident or j not in self.resident) and j not in self.elsewhere and j not in out:
                out.append(j)
                if len(out) == self.depth:
                    break
        return out

    def _schedule(self, i: int) -> None:
        wanted = self.window(i)
        keep = set(wanted) | {i}
        for j in wanted:
            if self._slot_of(j) is not None:
                continue
            slot, _ = self._claim(j, demand=False, keep=keep)
            if slot is None:
                return  # every buffer is busy; the next acquire will try again
            self._start(j, slot, urgent=False)

    def _claim(self, i: int, demand: bool, keep: set[int] | None = None) -> tuple[_Slot | None, _Load | None]:
        """A free or reusable slot for unit i; for a demand read, possibly a loading one to wait for."""
        keep = keep if keep is not None else set(self.window(i)) | {i}
        reusable = [s for s in self._slots if s.users == 0 and (s.unit is None or s.unit not in keep)]
        for s in sorted(reusable, key=lambda s: s.unit is not None):
            if s.load is None or s.load.done.is_set():
                s.unit, s.load = None, None
                return s, None
        if not demand:
            for s in reusable:  # a stale read holds the buffer: stop it; its completion re-plans
                assert s.load is not None
                s.load.cancelled = True
            return None, None
        if reusable:  # only in-flight prefetches of units no longer expected: cancel one and wait
            victim = reusable[0]
            assert victim.load is not None
            victim.load.cancelled = True
            return None, victim.load
        if all(s.users > 0 for s in self._slots):
            raise OffloadError(f"unit {self.units[i].name} needs a staging buffer but all {len(self._slots)} are held "
                               f"by units still executing: raise prefetch= or choose units that do not call each other")
        # The only candidates hold units inside the window that are still loading: take the farthest.
        window = self.window(i)
        loading = [s for s in self._slots if s.users == 0]
        victim = max(loading, key=lambda s: window.index(s.unit) if s.unit in window else len(window))
        assert victim.load is not None
        victim.load.cancelled = True
        return None, victim.load

    def _start(self, i: int, slot: _Slot, urgent: bool) -> None:
        unit = self.units[i]
        path = self.store.file_path(unit)
        load = _Load(unit, path, slot.buffer, self.reader, self._finished)
        slot.unit, slot.load = i, load
        try:
            load.handle = self.reader.open(path)
        except BaseException as e:  # noqa: BLE001 - surfaces in the forward that needs the unit
            load.fail_now(e)
            return
        self._workers.submit(load.tasks(), urgent=urgent)

    def _slot_of(self, i: int) -> _Slot | None:
        for s in self._slots:
            if s.unit == i:
                return s
        return None

    def _wait(self, load: _Load) -> None:
        while not load.done.wait(_POLL_S):
            if self.closed:
                raise OffloadError(f"offload was disabled while unit {load.unit.name} was being read")

    def _check_open(self) -> None:
        if self.closed:
            raise OffloadError("this offload handle is closed (offload.disable was called): enable it again")

    # ------------------------------------------------------------------ RAM tier, stats, shutdown

    def load_resident(self, progress: Callable[[int], None] | None = None) -> None:
        """Read every RAM-tier unit once, in parallel, on the same reader threads."""
        self.read_into(self.resident, progress)

    def read_into(self, buffers: dict[int, HostBuffer], progress: Callable[[int], None] | None = None) -> None:
        """Read the given units into the given buffers, in parallel, and wait (enable-time work)."""
        loads = []
        for i, buf in buffers.items():
            unit = self.units[i]
            load = _Load(unit, self.store.file_path(unit), buf, self.reader, self._finished)
            try:
                load.handle = self.reader.open(load.path)
            except OSError as e:
                raise UnitReadError(f"reading unit {unit.name} from {load.path} failed: {e}") from e
            self._workers.submit(load.tasks())
            loads.append(load)
        for load in loads:
            self._wait(load)
            if load.error is not None:
                raise UnitReadError(f"reading unit {load.unit.name} from {load.path} failed: {load.error}") from load.error
            if progress:
                progress(load.unit.data_bytes)

    def _finished(self, load: _Load) -> None:
        """A read completed (called on the worker thread): count it, and fill the buffer it may have freed."""
        with self._stats_lock:
            self._stats.bytes_read += load.bytes_done
            if load.t_start:
                self._stats.read_seconds += load.t_end - load.t_start
            if load.error is None and not load.cancelled:
                self._stats.units_loaded += 1
        if load.cancelled:
            with self._lock:
                if not self.closed and self._last is not None:
                    load.done.set()  # so _claim sees this buffer as reusable now
                    self._schedule(self._last)

    def stats(self) -> PrefetchStats:
        with self._lock, self._stats_lock:
            s = dataclasses.replace(self._stats)
            s.units_in_flight = sum(1 for sl in self._slots if sl.load is not None and not sl.load.done.is_set())
        return s

    def wait_idle(self) -> None:
        """Block until no read is in flight (so counters are final); used by tests and benchmarks."""
        while True:
            with self._lock:
                pending = [s.load for s in self._slots if s.load is not None and not s.load.done.is_set()]
            if not pending:
                return
            for load in pending:
                self._wait(load)

    def reset_stats(self) -> None:
        with self._lock, self._stats_lock:
            self._stats = PrefetchStats()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for s in self._slots:
                if s.load is not None:
                    s.load.cancelled = True
        self._workers.close()
        for s in self._slots:
            s.buffer.close()
        for b in self.resident.values():
            b.close()
        self._slots = []
        self.resident = {}

    def host_buffers(self) -> list[HostBuffer]:
        """Every host buffer this prefetcher reads into (ring and RAM tier), e.g. to register with CUDA."""
        return [s.buffer for s in self._slots] + list(self.resident.values())
