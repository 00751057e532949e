"""The schedule: keep units i+1..i+N reading into the ring while unit i computes.

Per unit, from its stager (``transfer.py``)::

    lease = acquire(i)     # wait for i's read (or read it now: a miss); start reads of i+1 .. i+N
    ... unit i computes, or its bytes are copied to the GPU ...
    lease.release()        # or release(after=copy_done_event)

"i+1" is the learned successor of i: every ``acquire``/``advance`` records ``succ[previous] = i``,
so the wrap from the last block to the first, an encoder handing over to a decoder, skipped blocks
and early exits are all followed once seen (before that, store order is assumed). The look-ahead
window is the next ``prefetch`` streamed units along that chain.

Which slot a read goes into
  * a prefetch takes an idle slot (no lease, no read, no copy, not reserved) whose unit is outside the
    window; it never evicts a unit the window still wants, and cancels reads nobody expects any more;
  * a demand read (the unit being called is not staged) may take any slot without a lease, nearest
    need last: empty, then not expected, then the farthest-ahead. If that slot's previous read or copy
    is still running, the slot is *reserved* for the demand and the caller waits for exactly that
    read or copy. Each wait is on something already in progress, so every pass of the loop either
    returns or waits; none can spin. Only when every slot is leased by a forward still running (more
    re-entrant units than ``prefetch + 1``) is there nothing to wait for, and that is an error.

A read that fails stores its exception on the load; the ``acquire`` that needs the unit raises
``UnitReadError`` naming the unit and the file, and forgets the read so the next call tries again.
With ``verify``, a unit's checksum is checked on the reader thread the first time it is read
(CRC-32C in hardware, ``crc32c``: 6 GiB/s here, GIL released; zlib's CRC-32 for stores without
one), so a damaged file is a named error, not garbage.

Threads: ``io_threads`` named reader threads, started here and stopped only by ``close`` (the
shutdown order is in ``handle.Handle.disable``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .config import StagingConfig
from .errors import ChecksumError, OffloadError, UnitReadError
from .integrity import check_chunks, damaged_fix
from .io import Reader
from .manifest import UnitRecord
from .staging import Fence, HostBuffer, HostRing, Lease, Slot, wait_fence
from .store import Store, assemble
from .trace import COMPUTE_TRACK, Tracer

log = logging.getLogger("offload")

_POLL_S = 0.1  # how often a blocked wait re-checks that the prefetcher is still open
_ids = itertools.count()
_MAX_OPEN = 256  # files a prefetcher keeps open for its life (the rest are opened per read)
# With routed experts, reads a whole-unit reader would make whole are cut into tasks of this size: a forward's
# expert batch, queued ahead of them, then waits behind at most one slice per reader thread, not whole units.
_SLICE_BYTES = 8 << 20
# Private knob for benchmarks: False never holds prefetches for an expert batch (Prefetcher.hold_for).
_HOLD_FOR_EXPERTS = True


def _fd_of(handle: Any) -> int | None:
    """The descriptor behind a reader's handle (native/Python: ``.fd``; mmap: ``(map, fd, path)``)."""
    fd = getattr(handle, "fd", None)
    if fd is None and isinstance(handle, tuple) and len(handle) > 1 and isinstance(handle[1], int):
        fd = handle[1]
    return fd if isinstance(fd, int) else None


class _Task:
    """One read of part of a unit: ``length`` bytes at ``offset`` of one of its files into the buffer at
    ``into``. ``run`` or ``abandon`` is called exactly once."""

    __slots__ = ("load", "file", "offset", "into", "length")

    def __init__(self, load: _Load, file: str, offset: int, into: int, length: int):
        self.load, self.file, self.offset, self.into, self.length = load, file, offset, into, length

    def run(self) -> None:
        load = self.load
        if load.cancelled or load.error is not None:
            load.task_done(None)
            return
        t0 = time.perf_counter()
        try:
            if load.t_start == 0.0:
                load.t_start = t0
            load.reader.read(load.handles[self.file], self.offset, load.buffer.view(self.into, self.length))
        except BaseException as e:  # noqa: BLE001 - carried to the waiter, re-raised there
            load.task_done(e, failed=load.paths.get(self.file))
            return
        if load.tracer is not None:
            load.tracer.span(threading.current_thread().name, f"read {load.unit.name}", "read", t0,
                             time.perf_counter(), bytes=self.length, offset=self.offset)
        load.task_done(None, self.length)

    def abandon(self) -> None:
        self.load.task_done(OffloadError("prefetcher closed before this read ran"))


class _Load:
    """One unit being read into one buffer. Completes exactly once, error included."""

    def __init__(self, unit: UnitRecord, paths: dict[str, str], buffer: HostBuffer, reader: Reader,
                 on_finish: Callable[[_Load], None], tracer: Tracer | None,
                 opener: Callable[[str], tuple[Any, bool]], task_bytes: int | None):
        self.unit, self.paths, self.buffer, self.reader = unit, paths, buffer, reader
        self.task_bytes = task_bytes  # each read cut into tasks of this size (None: one task per extent)
        self.opener = opener  # path -> (handle, whether this load owns it: Prefetcher._open)
        self.path = next(iter(paths.values()))  # named in errors: the file whose read failed, once one has
        self.on_finish, self.tracer = on_finish, tracer
        self.bytes_done = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False
        self.urgent = False  # a forward waits for it (else a prefetch, which _Workers.hold may hold)
        self.t_start = 0.0
        self.t_end = 0.0
        self.handles: dict[str, Any] = {}
        self._owned: list[Any] = []  # handles this load opened itself (the prefetcher's are shared)
        self._lock = threading.Lock()
        self._pending = 0

    def open(self) -> None:
        """Open every file the unit reads (one for a store's unit; the shards it spans, read in place)."""
        for file, path in self.paths.items():
            h, owned = self.opener(path)
            self.handles[file] = h
            if owned:
                self._owned.append(h)

    def tasks(self) -> list[_Task]:
        out = []
        for e in self.unit.reads:
            step = max(self.task_bytes or e.length, 1)
            out += [_Task(self, e.file, e.offset + off, e.into + off, min(step, e.length - off))
                    for off in range(0, e.length, step)]
        if not out:  # an empty unit still gets one (empty) task, so the load completes like any other
            out = [_Task(self, next(iter(self.paths)), 0, 0, 0)]
        self._pending = len(out)
        return out

    def read_views(self) -> list[memoryview]:
        """The bytes the reads brought in, in order: what a unit's checksum covers."""
        return [self.buffer.view(e.into, e.length) for e in self.unit.reads]

    def close_files(self) -> None:
        for h in self._owned:
            with contextlib.suppress(Exception):  # the bytes are in: a failed close is no failed read
                self.reader.close(h)
        self._owned = []
        self.handles = {}

    def task_done(self, error: BaseException | None, nbytes: int = 0, failed: str | None = None) -> None:
        """A task ended; ``failed``: the file whose read raised ``error`` (a unit read in place spans shards)."""
        with self._lock:
            self.bytes_done += nbytes
            if error is not None and self.error is None:
                self.error = error
                self.path = failed or self.path
            self._pending -= 1
            finished = self._pending == 0
            if finished and self.cancelled and self.error is None:
                # A cancelled load skipped some of its reads: to anyone still waiting on it, that is a
                # failure, never a buffer that looks ready (a close() racing a waiting forward).
                self.error = OffloadError(f"the read of unit {self.unit.name} was cancelled (offload was "
                                          f"disabled, or the unit was no longer expected)")
        if finished:
            self.t_end = time.perf_counter()
            try:
                self.close_files()
                self.on_finish(self)  # checks the CRC, counts, may re-plan; before waiters wake
            except BaseException as e:  # noqa: BLE001 - e.g. a CUDA error from an event's query() while re-planning
                if self.error is None:
                    self.error = e
            finally:
                self.done.set()  # whatever happened, the waiter wakes (and raises the error): never a hang

    def fail_now(self, error: BaseException) -> None:
        self.error = error
        self.t_start = self.t_end = time.perf_counter()
        self.done.set()


def _raise_failed(load: _Load) -> None:
    """A failed read, as the forward that needed it sees it: a checksum error as it is, else named."""
    err = load.error
    assert err is not None
    if isinstance(err, ChecksumError):
        raise err
    raise UnitReadError(f"reading unit {load.unit.name} from {load.path} failed: {err}") from err


class _Workers:
    """A fixed set of named reader threads for the prefetcher's life, fed from one deque.

    ``urgent`` tasks (a forward waits for them) go ahead of the others. ``hold()`` keeps the others that
    are submitted from then on (a block's prefetches) from starting until ``resume()``: a block about to
    read its routed experts holds what it schedules, so its batch has the disk to itself (see
    ``Prefetcher.hold_for``); what was queued before, and urgent work, still runs.

    ``close()`` sets ``closed``, wakes every thread and joins them: a thread finishes the task it is
    running, then exits; tasks still queued are ``abandon()``-ed, which completes their load with an
    error, so no waiter can block on a read that will never run.
    """

    def __init__(self, count: int, name: str):
        self.closed = False
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[_Task, int | None]] = collections.deque()  # (task, seq; None: urgent)
        self._seq = 0  # numbers the non-urgent submits, in queue order
        self._hold_from: int | None = None  # non-urgent tasks numbered from here wait for resume()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{k}", daemon=True) for k in range(count)]
        for t in self._threads:
            t.start()

    def submit(self, tasks: Sequence[_Task], urgent: bool = False) -> None:
        with self._cv:
            if not self.closed:
                if urgent:
                    self._queue.extendleft((t, None) for t in reversed(tasks))
                else:
                    self._queue.extend((t, self._seq) for t in tasks)
                    self._seq += 1
                self._cv.notify(len(tasks))
                return
        for t in tasks:
            t.abandon()

    def hold(self) -> None:
        with self._cv:
            self._hold_from = self._seq

    def resume(self) -> None:
        with self._cv:
            if self._hold_from is not None:
                self._hold_from = None
                self._cv.notify_all()

    def promote(self, loads: Sequence[_Load]) -> None:
        """The queued tasks of ``loads`` become urgent (a forward waits for them), held or not; the rest stay."""
        wanted = {id(x) for x in loads}
        with self._cv:
            mine = [t for t, _ in self._queue if id(t.load) in wanted]
            if mine:
                self._queue = collections.deque(x for x in self._queue if id(x[0].load) not in wanted)
                self._queue.extendleft((t, None) for t in reversed(mine))
                self._cv.notify(len(mine))

    def _runnable(self) -> bool:
        seq = self._queue[0][1]
        return seq is None or self._hold_from is None or seq < self._hold_from

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.closed and not (self._queue and self._runnable()):
                    self._cv.wait()
                if self.closed:
                    return
                task, _ = self._queue.popleft()
            try:
                task.run()
            except BaseException:  # noqa: BLE001 - run() carries a read's failure to its waiter; anything else
                # escaping it must not end this thread (its queue would never drain: a forward waiting forever)
                log.exception("offload: a reader thread's task failed outside its read; the thread goes on")

    def close(self) -> None:
        with self._cv:
            self.closed = True
            abandoned = [t for t, _ in self._queue]
            self._queue.clear()
            self._cv.notify_all()
        for t in abandoned:
            t.abandon()
        for t in self._threads:
            t.join()  # a read in progress finishes; after this no thread writes into a buffer

    def alive(self) -> list[threading.Thread]:
        return [t for t in self._threads if t.is_alive()]


@dataclasses.dataclass
class PrefetchStats:
    """Counters since ``enable`` (or the last ``reset``)."""
    bytes_read: int = 0  # bytes read from disk for streamed units
    read_seconds: float = 0.0  # sum over unit loads of first-byte-to-last-byte time
    wait_seconds: float = 0.0  # time forwards spent blocked waiting for a unit
    units_loaded: int = 0  # completed unit reads
    hits: int = 0  # a forward found its unit staged or already being read
    misses: int = 0  # a forward found its unit not requested: read on demand
    ram_tier_hits: int = 0  # forwards served from the RAM tier
    units_in_flight: int = 0  # reads in progress now
    verified_units: int = 0  # units whose CRC32 was checked after their first read
    verify_seconds: float = 0.0  # reader-thread time spent on those checks


class Prefetcher:
    """Stage streamed units into the host ring ahead of their forward; the RAM tier is read once."""

    def __init__(self, store: Store, units: Sequence[UnitRecord], reader: Reader, config: StagingConfig,
                 ram_tier: dict[int, HostBuffer] | None = None, elsewhere: set[int] | None = None,
                 verify: bool = False, tracer: Tracer | None = None, batches: bool = False):
        """``batches``: ``start_reads`` will be given many ranges at once (a layer's routed experts), so
        every one of ``config.io_threads`` reader threads is started, not one per ring slot."""
        self.store = store
        self.tracer = tracer
        self.units = list(units)
        self.reader = reader
        self.config = config
        self.depth = config.prefetch
        self.ram_tier = dict(ram_tier or {})
        self._tier_leases: dict[int, Lease] = {}  # a RAM-tier lease has nothing to give back: one per unit, reused
        self.elsewhere = set(elsewhere or ())  # units kept by another tier (GPU memory): never read here
        self.verify = verify
        self._verified: set[int] = set()
        n = len(self.units)
        self._succ = {i: (i + 1) % n for i in range(n)}
        self._last: int | None = None
        self.ring = HostRing(config.ring_slots, config.slot_bytes)
        self._lock = self.ring.lock
        self._stats_lock = threading.Lock()
        self.closed = False
        self._stats = PrefetchStats()
        # Reads are cut into tasks: the Python reader's own chunks, or with routed experts a whole-unit reader's
        # reads in _SLICE_BYTES slices. Tasks keep every reader thread busy; a whole-unit (native) reader keeps
        # its own queue full within one unit, so it needs only a thread per read the ring allows. A batch of
        # routed experts is many small reads at once (3-6 MiB each): with four threads it read at half the
        # disk's rate.
        self._task_bytes = reader.task_bytes or (_SLICE_BYTES if batches else None)
        threads = config.io_threads if self._task_bytes else min(config.io_threads, config.ring_slots + 1)
        # Every file the units read, opened once for the handle's life: a cached store swapped out by a rebuild
        # in another process (renamed, then removed) stays readable through these descriptors, so this handle
        # keeps reading the bytes its manifest describes, never a new store's files under the old layout.
        self._files: dict[str, Any] = {}
        self._files_lock = threading.Lock()
        # and the store's folder, for the files past _MAX_OPEN, opened per read: through it (not by path) once
        # a rebuild swapped another folder in at the store's path (Store.openable)
        try:
            self._folder = os.open(store.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            store.pin_folder(self._folder)
        except OSError:
            self._folder = None
        for unit in self.units:
            for e in unit.reads:
                with contextlib.suppress(OSError):  # a missing file fails the load that needs it, named there
                    self._open(self.store.path_of(unit, e.file))
        self._workers = _Workers(max(1, threads), f"offload-io-{next(_ids)}")
        # Units whose forward reads routed experts (set by enable): acquiring one holds the prefetches it
        # schedules until its expert batch is read (``resume_prefetch``), so they read during the experts'
        # compute instead of beside the batch. A wait on a held read promotes it: nothing waits on held work.
        self.hold_for: set[int] = set()

    # ------------------------------------------------------------------ the schedule

    def acquire(self, i: int) -> Lease:
        """Unit i's bytes, once read, leased to the caller; then keep i+1..i+N requested."""
        unit = self.units[i]
        if i in self.ram_tier:
            with self._lock:
                self._check_open()
                self._visit(i)
                self._stats.ram_tier_hits += 1
            return self._tier_lease(i)
        while True:
            with self._lock:
                self._check_open()
                self._visit(i)
                slot = self.ring.find(i)
                if slot is not None:
                    self._stats.hits += 1
                    blocker = None
                else:
                    slot, blocker = self._claim_for_demand(i)
                    if slot is not None:
                        self._stats.misses += 1
                        self._start(i, slot, urgent=True)
                if slot is not None:
                    lease = self.ring.lease(slot, unit.data_bytes)
                    load = slot.load
                    self._hold_if_routed(i)
                    self._schedule(i)
                    break
            try:
                self._wait(blocker, f"unit {unit.name} waiting for a staging buffer")
            except BaseException:
                with self._lock:  # interrupted: give the reserved slot back to the schedule
                    for s in self.ring.slots:
                        if s.reserved_for == i:
                            s.reserved_for = None
                raise
        t0 = time.perf_counter()
        try:
            self._wait(load, f"unit {unit.name}")
        except BaseException:  # interrupted (Ctrl-C) or closed while waiting: the caller never gets the lease
            lease.release()
            raise
        t1 = time.perf_counter()
        if self.tracer is not None and t1 - t0 > 20e-6:  # a wait worth drawing
            self.tracer.span(COMPUTE_TRACK, f"wait {unit.name}", "wait", t0, t1)
        with self._lock:
            self._stats.wait_seconds += t1 - t0
            if load.error is not None and slot.load is load:
                slot.unit = slot.load = None  # forget the failed read so the next call tries again
            closed = self.closed
        if closed:
            lease.release()
            raise OffloadError(f"offload was disabled while unit {unit.name} was being read")
        if load.error is not None:
            lease.release()
            _raise_failed(load)
        return lease

    def _tier_lease(self, i: int) -> Lease:
        lease = self._tier_leases.get(i)
        if lease is None:
            lease = self._tier_leases[i] = Lease.outside_ring(i, self.ram_tier[i].tensor[:self.units[i].data_bytes])
        return lease

    def try_acquire(self, i: int) -> Lease | None:
        """Unit i's bytes if its read already finished cleanly; never blocks, never reads (CUDA copy-ahead)."""
        with self._lock:
            if self.closed:
                return None
            if i in self.ram_tier:
                return self._tier_lease(i)
            slot = self.ring.find(i)
            if slot is None or slot.load is None or slot.reading() or slot.load.error is not None:
                return None
            return self.ring.lease(slot, self.units[i].data_bytes)

    def advance(self, i: int) -> None:
        """Unit i is running without needing its bytes from here (the GPU already has them): follow it."""
        with self._lock:
            self._check_open()
            self._visit(i)
            if i in self.ram_tier or i in self.elsewhere:
                self._stats.ram_tier_hits += 1
            self._hold_if_routed(i)
            self._schedule(i)

    def _hold_if_routed(self, i: int) -> None:
        """Before ``_schedule(i)``: hold what it starts until unit i's expert batch is read (``hold_for``)."""
        if not self.hold_for:  # no routed experts: nothing is ever held
            return
        if i in self.hold_for and _HOLD_FOR_EXPERTS:
            self._workers.hold()
        else:
            self._workers.resume()

    def window(self, i: int, include_ram_tier: bool = False) -> list[int]:
        """The streamed units expected after i, nearest first, at most ``prefetch`` of them.

        ``include_ram_tier`` also counts RAM-tier units (the CUDA stager copies those ahead too).
        """
        out: list[int] = []
        j = i
        for _ in range(len(self.units)):
            j = self._succ[j]
            if j == i:
                break
            if (include_ram_tier or j not in self.ram_tier) and j not in self.elsewhere and j not in out:
                out.append(j)
                if len(out) == self.depth:
                    break
        return out

    def _visit(self, i: int) -> None:
        if self._last is not None and self._last != i:
            self._succ[self._last] = i
        self._last = i

    def _schedule(self, i: int) -> None:
        """Start reads for the window after i into idle slots; cancel reads nobody expects any more."""
        wanted = self.window(i)
        keep = set(wanted) | {i}
        for j in wanted:
            if self.ring.find(j) is not None:
                continue
            free = [s for s in self.ring.slots if s.idle() and (s.unit is None or s.unit not in keep)]
            if not free:
                for s in self.ring.slots:  # a stale read holds a buffer: stop it; its completion re-plans
                    if s.holders == 0 and s.unit is not None and s.unit not in keep and s.reading():
                        s.load.cancelled = True
                        s.unit = None
                return
            self._start(j, min(free, key=lambda s: s.unit is not None), urgent=False)

    def _claim_for_demand(self, i: int) -> tuple[Slot | None, _Load | Fence | None]:
        """A slot for unit i now, or what to wait for before that slot is free (see the module NOTE)."""
        candidates = [s for s in self.ring.slots if s.holders == 0 and s.reserved_for in (None, i)]
        if not candidates:
            raise OffloadError(
                f"unit {self.units[i].name} needs a staging buffer but all {len(self.ring.slots)} are leased by "
                f"units whose forward is still running (units that call each other, more than prefetch+1 deep): "
                f"raise prefetch= or choose units that do not nest")
        window = self.window(i)

        def need(s: Slot) -> tuple[int, int]:  # smaller = give up first
            if s.reserved_for == i:
                return (0, 0)
            if s.unit is None:
                return (1, 0)
            if s.unit not in window:
                return (2, 0)
            return (3, -window.index(s.unit))  # the farthest-ahead unit is needed last

        victim = min(candidates, key=need)
        if victim.reading():
            victim.load.cancelled = True
        victim.unit = None
        if victim.reading():
            victim.reserved_for = i
            return None, victim.load
        if victim.fenced():
            victim.reserved_for = i
            return None, victim.fences[0]
        victim.reserved_for = None
        return victim, None

    def _open(self, path: str) -> tuple[Any, bool]:
        """The shared handle of ``path`` (opened now if need be), or a load's own past ``_MAX_OPEN`` files."""
        with self._files_lock:
            h = self._files.get(path)
            if h is None and len(self._files) < _MAX_OPEN and not self.closed:
                h = self._files[path] = self.reader.open(path)
                self.store.pin(path, _fd_of(h))
        return (h, False) if h is not None else (self.reader.open(self.store.openable(path)), True)

    def close_files(self) -> None:
        """Close the files kept open (after ``close``, once nothing reads off the prefetcher either: the
        handle's restore reads through them, ``Store.pin``)."""
        with self._files_lock:
            files, self._files = dict(self._files), {}
        for path, h in files.items():
            self.store.pin(path, None)
            with contextlib.suppress(OSError):
                self.reader.close(h)
        if self._folder is not None:
            self.store.pin_folder(None)
            os.close(self._folder)
            self._folder = None

    def _new_load(self, unit: UnitRecord, buffer: HostBuffer) -> _Load:
        paths = {e.file: self.store.path_of(unit, e.file) for e in unit.reads}
        return _Load(unit, paths, buffer, self.reader, self._finished, self.tracer, self._open, self._task_bytes)

    def _start(self, i: int, slot: Slot, urgent: bool) -> None:
        load = self._new_load(self.units[i], slot.buffer)
        load.urgent = urgent
        slot.unit, slot.load, slot.reserved_for = i, load, None
        try:
            load.open()
        except BaseException as e:  # noqa: BLE001 - surfaces in the forward that needs the unit
            load.close_files()
            load.fail_now(e)
            return
        self._workers.submit(load.tasks(), urgent=urgent)

    def _wait(self, what: _Load | Fence | None, context: str) -> None:
        if what is None:
            return
        if isinstance(what, _Load):
            self._promote([what])  # it may be held: a wait never waits on held work
            while not what.done.wait(_POLL_S):
                if self.closed:
                    raise OffloadError(f"offload was disabled while {context} was being read")
            return
        wait_fence(what, self.config.fence_timeout_s, context)

    def _promote(self, loads: Sequence[_Load]) -> None:
        """Loads a forward is about to wait for, submitted as prefetches and not done: urgent from now on."""
        waiting = [x for x in loads if not x.urgent and not x.done.is_set()]
        for x in waiting:
            x.urgent = True
        if waiting:
            self._workers.promote(waiting)

    def _check_open(self) -> None:
        if self.closed:
            raise OffloadError("this offload handle is closed (offload.disable was called): enable it again")

    # ------------------------------------------------------------------ reads finishing, RAM tier

    def _finished(self, load: _Load) -> None:
        """A read completed (on a reader thread): verify it once, count it, re-plan if it was cancelled."""
        if load.error is None and not load.cancelled and load.unit.extents:
            assemble(load.unit, load.buffer.tensor)  # fused tensors from their pieces (read in place)
        if load.error is None and not load.cancelled and self.verify and load.unit.name not in self._verified:
            t0 = time.perf_counter()
            unit = self.store.checksum_of(load.unit)
            if unit.crc32 is None:  # read in place for the first time: this read's checksum is the reference
                self.store.record_checksum(unit, load.read_views())
                ok, detail = True, ""
            else:
                ok, detail = check_chunks(unit, load.read_views())
            with self._stats_lock:
                self._stats.verified_units += 1
                self._stats.verify_seconds += time.perf_counter() - t0
            if not ok and load.unit.extents:  # read in place: the checkpoint itself changed under us
                files = ", ".join(sorted(load.paths.values()))
                load.error = ChecksumError(
                    f"{files}: unit {load.unit.name} is damaged: its bytes differ from its first read ({detail}) "
                    f"although size, mtime and header did not change. Restore the checkpoint file; if you changed "
                    f"it on purpose, rebuild the index (`offload run ... --rebuild`, offload.load(..., rebuild=True))")
            elif not ok:
                    load.error = ChecksumError(f"{load.path}: unit {load.unit.name} is damaged ({detail}): "
                                           f"{damaged_fix(self.store.path)}")
            else:
                self._verified.add(load.unit.name)
        with self._stats_lock:
            self._stats.bytes_read += load.bytes_done
            if load.t_start:
                self._stats.read_seconds += load.t_end - load.t_start
            if load.error is None and not load.cancelled:
                self._stats.units_loaded += 1
        if load.cancelled:
            with self._lock:
                if not self.closed and self._last is not None:
                    load.done.set()  # so the slot counts as idle while re-planning
                    self._schedule(self._last)

    def read_into(self, buffers: dict[int, HostBuffer], progress: Callable[[int], None] | None = None) -> None:
        """Read the given units into the given buffers, in parallel, and wait (enable-time work)."""
        for load in self.start_reads([(self.units[i], buf) for i, buf in buffers.items()], urgent=False):
            self._wait(load, f"unit {load.unit.name}")
            if load.error is not None:
                _raise_failed(load)
            if progress:
                progress(load.unit.data_bytes)

    def start_reads(self, reads: Sequence[tuple[UnitRecord, HostBuffer]], urgent: bool = True) -> list[_Load]:
        """Start reading units into their buffers (each unit's extents say where in it): ``urgent`` ahead of
        queued prefetches (a forward waits for them: routed experts), else behind them (the RAM tier at
        enable, experts predicted for a later layer). A file that cannot be opened fails its load, which
        the waiter raises."""
        self._check_open()
        loads = []
        for unit, buffer in reads:
            load = self._new_load(unit, buffer)
            load.urgent = urgent
            try:
                load.open()
            except OSError as e:
                load.close_files()
                load.fail_now(e)
            else:
                self._workers.submit(load.tasks(), urgent=urgent)
            loads.append(load)
        return loads

    def resume_prefetch(self) -> None:
        """A forward's expert batch is read: held prefetches may start (``hold_for``)."""
        self._workers.resume()

    def finish_reads(self, loads: Sequence[_Load]) -> None:
        """Wait for reads ``start_reads`` began; a failure is raised here, naming the unit and its file."""
        t0 = time.perf_counter()
        self._promote(loads)  # all at once: one by one, each would start only after the one before finished
        for load in loads:
            self._wait(load, f"unit {load.unit.name}")
        with self._stats_lock:
            self._stats.wait_seconds += time.perf_counter() - t0
        for load in loads:
            if load.error is not None:
                _raise_failed(load)

    def load_ram_tier(self, progress: Callable[[int], None] | None = None) -> None:
        """Read every RAM-tier unit once, in parallel, on the same reader threads."""
        self.read_into(self.ram_tier, progress)

    # ------------------------------------------------------------------ stats, shutdown

    def waited(self) -> float:
        """Seconds forwards have spent waiting for reads so far (a float read: no lock). A unit's hook takes
        the waits inside its forward (its routed experts') out of its compute time."""
        return self._stats.wait_seconds

    def stats(self) -> PrefetchStats:
        with self._lock, self._stats_lock:
            s = dataclasses.replace(self._stats)
            s.units_in_flight = sum(1 for sl in self.ring.slots if sl.reading())
        return s

    def wait_idle(self) -> None:
        """Block until no read is in flight (so counters are final); used by tests and benchmarks."""
        while True:
            with self._lock:
                pending = [s.load for s in self.ring.slots if s.reading()]
            if not pending:
                return
            for load in pending:
                self._wait(load, f"unit {load.unit.name}")

    def reset_stats(self) -> None:
        with self._lock, self._stats_lock:
            self._stats = PrefetchStats()

    def host_buffers(self) -> list[HostBuffer]:
        """Every host buffer this prefetcher reads into (ring and RAM tier), e.g. to register with CUDA."""
        return self.ring.buffers() + list(self.ram_tier.values())

    def close(self, keep_files: bool = False) -> None:
        """Stop the reader threads (joined: no write into a buffer after this), then free the buffers;
        ``keep_files``: the files stay open (and pinned) until ``close_files``."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for s in self.ring.slots:
                if s.load is not None:
                    s.load.cancelled = True
        self._workers.close()
        if not keep_files:
            self.close_files()
        self.ring.close()
        self._tier_leases = {}  # their views would keep the RAM tier's memory for as long as the handle lives
        for b in self.ram_tier.values():
            b.close()
        self.ram_tier = {}
