"""The experts' tables in memory, reading the routed experts into them on routing, binding them to the
experts modules (and, on a GPU, copying the routed ones to a device table)."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import mmap
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._memory import format_bytes
from ..errors import OffloadError
from ..hooks import Binding, BoundUnits, UnitHook, _compiling, eagerly
from ..staging import HUGE_PAGE, HostBuffer
from .cache import ExpertCache, split
from .layout import ExpertsGroup, Slab
from .pages import PagePool

log = logging.getLogger("offload")

# Huge pages inside each expert's own bytes in its table (ExpertsTable._advise_huge); off: 4 KiB pages only.
_HUGE_PAGES = True


def _mappings_allow(more: int) -> bool:
    """Whether this process may split its memory into ``more`` further mappings and stay under half the
    kernel's limit (``vm.max_map_count``, 65530 by default): a DeepSeek-V3-sized model's expert tables
    advised per expert would take ~59k. Past it, the tables stay on 4 KiB pages (one log line)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            now = sum(1 for _ in f)
    except (OSError, ValueError):
        return False
    if now + more <= limit // 2:
        return True
    if not _said_mappings:
        _said_mappings.append(True)
        log.info("offload: expert tables stay on 4 KiB pages from here on: huge pages per expert would take %d more "
                 "memory mappings, over half of vm.max_map_count (%d; %d in use)", more, limit, now)
    return False


_said_mappings: list[bool] = []


class ExpertsTable:
    """The table of one experts module and which experts it holds."""

    def __init__(self, group: ExpertsGroup):
        self.group = group
        # 2 MiB-aligned (HostBuffer's huge placement) so each slab's regions fall on huge-page boundaries;
        # which pages are huge is then chosen per expert (_advise_huge), never the whole table
        self.buffer = HostBuffer(group.buffer_bytes, huge=True)
        self.present: set[int] = set()
        self.huge: list[list[tuple[int, int]]] = []  # per expert, its advised huge-page ranges (``_advise_huge``)
        self.huge_bytes = self._advise_huge()
        self.pool: PagePool | None = None  # where evicted experts' huge pages wait for the next read (ExpertsStager)

    def _advise_huge(self) -> int:
        """Advise transparent huge pages on every 2 MiB page that lies wholly inside one expert's own bytes
        (``Slab.region``), and nowhere else: a huge page is backed only when that expert is read and freed
        whole when it is evicted, so resident memory stays what the cache counts; a region's tail (and,
        for packed slabs, the edges a neighbour's widened read shares) stays on 4 KiB pages. Returns the
        bytes advised."""
        if self.buffer.closed or not hasattr(mmap, "MADV_HUGEPAGE") or not self.buffer.huge:
            return 0
        per_expert: list[list[tuple[int, int]]] = [[] for _ in range(self.group.count)]
        for slab in self.group.slabs:
            for e in range(self.group.count):
                lo, hi = slab.region(e)
                a, b = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
                if b > a:
                    per_expert[e].append((a, b))
        ranges = [r for rs in per_expert for r in rs]
        try:
            # HostBuffer advised the whole table; pages shared by experts must not be huge (an eviction
            # would split them), so off everywhere first, then on per region
            self.buffer.advise(mmap.MADV_NOHUGEPAGE, 0, self.buffer.nbytes // HUGE_PAGE * HUGE_PAGE)
            # each advised range is a mapping of its own: past the kernel's limit on a process's mappings
            # (vm.max_map_count) every later mmap (malloc's large blocks, torch's) fails, so stay well under
            if not _HUGE_PAGES or not _mappings_allow(2 * len(ranges)):
                return 0
            done = 0
            for a, b in ranges:
                self.buffer.advise(mmap.MADV_HUGEPAGE, a, b - a)
                done += b - a
            self.huge = per_expert
            return done
        except OSError:  # THP compiled out: 4 KiB pages still work
            return 0

    def address(self, offset: int) -> int:
        return self.buffer.address + offset

    def give_back(self, a: int, b: int) -> None:
        if not self.buffer.closed:
            self.buffer.advise(mmap.MADV_DONTNEED, a, b - a)

    def back(self, e: int) -> None:
        """Before expert ``e`` is read: move evicted experts' huge pages under its huge-page ranges (``pages``),
        so the read lands in memory already backed; the ranges the pool has nothing for fault in as usual."""
        if self.pool is not None and self.huge:
            for a, b in self.huge[e]:
                self.pool.take(self, a, b)

    def drop(self, e: int) -> None:
        """Give expert ``e``'s pages back: its whole region (or the whole pages inside a packed slice, whose
        edges a neighbour shares); its huge pages to the pool when it has room (``pages``)."""
        self.present.discard(e)
        if self.buffer.closed:
            return
        pooled = [r for r in (self.huge[e] if self.huge and self.pool is not None else ()) if self.pool.give(self, *r)]
        for slab in self.group.slabs:
            a, b = slab.region(e)
            for x, y in sorted(r for r in pooled if a <= r[0] < b):  # the gaps between the pooled ranges
                if x > a:
                    self.buffer.advise(mmap.MADV_DONTNEED, a, x - a)
                a = max(a, y)
            if b > a:
                self.buffer.advise(mmap.MADV_DONTNEED, a, b - a)


class ExpertBinding(Binding):
    """An experts tensor bound to its table: ``[E, ...]`` with expert ``e`` at ``base + e * stride``
    (``Slab``), a strided view; ``offset``/``nbytes`` stay the packed table's (disable's restore)."""

    slab: Slab

    @classmethod
    def of(cls, b: Binding, slab: Slab) -> ExpertBinding:
        out = cls(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.init})
        out.slab = slab
        return out

    def _view(self, data: torch.Tensor) -> torch.Tensor:
        size = self.dtype.itemsize
        slab = self.slab
        assert slab.base % size == 0 and slab.stride % size == 0, (slab, self.dtype)
        typed = data.view(self.dtype)
        strides = (slab.stride // size, *torch.empty(self.shape, device="meta").stride()[1:])  # [e]: contiguous
        return typed.as_strided(self.shape, strides, typed.storage_offset() + slab.base // size)


def slot_layout(group: ExpertsGroup) -> tuple[list[int], int]:
    """Where expert ``e``'s slice of each tensor of ``group`` sits in a slot of the GPU tier (``DeviceTier``),
    each 256-byte aligned (as the caching allocator aligns), and the slot's size."""
    offsets, at = [], 0
    for slab in group.slabs:
        offsets.append(at)
        at += -(-slab.n // 256) * 256
    return offsets, at


class _SlotsOf:
    """``ExpertCache.evict``'s view of one group in the GPU tier: ``drop(e)`` frees expert ``e``'s slot."""

    def __init__(self, tier: DeviceTier, k: int):
        self.tier, self.k = tier, k

    def drop(self, e: int) -> None:
        slot = self.tier.slot.pop((self.k, e), None)
        if slot is not None:
            self.tier.free.append(slot)


class DeviceTier:
    """The routed experts' GPU tier: experts kept on the device across forwards, in fixed slots (one expert's
    slices of every tensor each), within what ``gpu_memory`` (or ``gpu_tier``) leaves after the units' GPU
    tier and the device ring.

    Without it every forward copies each routed expert from host memory over PCIe (~50 GB/s); an expert
    held here is copied device to device into the device table instead (~40x faster) and is neither
    read from disk nor needs a place in the host tables. Which experts stay is the same ``ExpertCache``
    (policy, hits, misses) as the RAM side's, counting slots. Every write and read of a slot is on the
    device table's copy stream, in the order the host enqueues them, so a slot is reused only after the
    copies out of it that were enqueued before.

    The slots are allocated in chunks of about ``CHUNK_BYTES`` so that a forward short of memory (a longer
    prompt, another process) gets them back a chunk at a time (``give_back``, called by the units'
    ``CudaStager`` before it gives back GPU-tier units)."""

    CHUNK_BYTES = 256 << 20

    def __init__(self, backend: Any, groups: Sequence[ExpertsGroup], nbytes: int, policy: str | None = None):
        self.layouts = [slot_layout(g) for g in groups]
        self.slot_bytes = max((size for _, size in self.layouts), default=0)
        total = sum(g.count for g in groups)
        n = min(total, nbytes // self.slot_bytes) if self.slot_bytes else 0
        self.per_chunk = max(1, self.CHUNK_BYTES // self.slot_bytes) if self.slot_bytes else 1
        self.chunks = [backend.empty(min(self.per_chunk, n - a) * self.slot_bytes) for a in range(0, n, self.per_chunk)]
        self.free = list(range(n - 1, -1, -1))
        self.slot: dict[tuple[int, int], int] = {}
        self.cache = ExpertCache(n * self.slot_bytes, policy)
        self.groups = {k: _SlotsOf(self, k) for k in range(len(groups))}
        self.sync: Any = None  # waits for the copies in flight (the device table's stream), before a chunk goes

    @property
    def slots(self) -> int:
        return len(self.free) + len(self.slot)

    def holds(self, k: int, e: int) -> bool:
        return (k, e) in self.slot

    def view(self, k: int, e: int, i: int, n: int) -> torch.Tensor:
        """Tensor ``i``'s ``n`` bytes of expert ``e`` of group ``k`` in its slot."""
        c, s = divmod(self.slot[(k, e)], self.per_chunk)
        at = s * self.slot_bytes + self.layouts[k][0][i]
        return self.chunks[c][at:at + n]

    def keep(self, k: int, held: Sequence[int], copied: Sequence[int]) -> list[int]:
        """After a forward's fill: the held experts were used, the copied ones are candidates; evicts down to
        the slots there are (never a held one) and returns the copied experts that got a slot (the caller
        copies them in, after their copies into the device table, on the same stream)."""
        if not self.chunks:
            return []
        with self.cache.lock:
            for e in held:
                self.cache.hit((k, e))
            self.cache.misses += len(copied)
            for e in copied:
                self.cache.admit((k, e), self.slot_bytes)
        self.cache.evict(self.groups, {(k, e) for e in held})
        got = [e for e in copied if (k, e) in self.cache.sizes]
        for e in got:
            self.slot[(k, e)] = self.free.pop()
        return got

    def forget(self, k: int, experts: Sequence[int]) -> None:
        """Experts given a slot whose bytes were never copied in (an exception between ``keep`` and the
        copies): not held, their slots free again."""
        with self.cache.lock:
            for e in experts:
                self.cache.discard((k, e))
                self.groups[k].drop(e)

    def give_back(self, nbytes: int) -> int:
        """Free the last chunks until ``nbytes`` are freed (their experts evicted, the budget lowered), after
        the copies in flight; returns the bytes freed. Between forwards, or from a forward's error."""
        freed = 0
        while self.chunks and freed < nbytes:
            if self.sync is not None:
                self.sync()
            gone = set(range((len(self.chunks) - 1) * self.per_chunk, self.slots))
            with self.cache.lock:
                for key in [key for key, s in self.slot.items() if s in gone]:
                    self.cache.discard(key)
                    del self.slot[key]
                self.free = [s for s in self.free if s not in gone]
                self.cache.budget -= len(gone) * self.slot_bytes
            freed += self.chunks.pop().numel()
        return freed

    def close(self) -> None:
        with self.cache.lock:
            self.chunks, self.free, self.slot = [], [], {}
            self.cache.sizes, self.cache.used = {}, 0


class DeviceTable:
    """On a GPU, the routed experts of the experts module computing now: one table on the device in the
    packed layout (the largest module's size), which every experts module there uses in turn.

    The host tables stay what they are on the CPU (read on routing, the expert cache); a forward copies
    only its routed experts' slices into this table on a copy stream, from the GPU tier (``DeviceTier``)
    where it holds them, else from the host tables, after the previous user's kernels are done with it
    (``free``, recorded on the compute stream), and the compute stream waits for the copies (``ready``):
    the same ordering as the device slot ring (``transfer.CudaStager``). The experts that are not routed
    hold stale bytes that the forward never reads (it indexes only routed experts; a grouped kernel
    multiplies no row by them). Its bytes count against ``gpu_memory`` (``placement``). Each tensor sits
    on a page of its own (``carve``), aligned as ``grouped_mm`` on CUDA requires."""

    def __init__(self, backend: Any, nbytes: int, tier: DeviceTier | None = None):
        self.backend = backend
        self.data = backend.empty(nbytes)
        self.tier = tier
        self.stream = backend.stream()
        self.free: Any = None  # recorded on the compute stream after the last forward that read ``data``
        self.ready: Any = None  # recorded on the copy stream after the last forward's copies
        self.bytes_copied = 0  # host to device
        if tier is not None:
            tier.sync = self.stream.synchronize

    def fill(self, k: int, table: ExpertsTable, experts: Sequence[int]) -> torch.Tensor:
        b, tier = self.backend, self.tier
        if self.free is not None:
            self.stream.wait_event(self.free)
        host = table.buffer.tensor
        held = [e for e in experts if tier is not None and tier.holds(k, e)]
        copied = [e for e in experts if tier is None or not tier.holds(k, e)]
        tensors = list(zip(table.group.table.tensors, table.group.slabs))
        for i, (r, slab) in enumerate(tensors):
            for e in held:
                assert tier is not None
                b.copy(self.stream, self.data[r.offset + e * slab.n:r.offset + (e + 1) * slab.n], tier.view(k, e, i, slab.n))
            for e in copied:
                src = slab.base + e * slab.stride
                b.copy(self.stream, self.data[r.offset + e * slab.n:r.offset + (e + 1) * slab.n], host[src:src + slab.n])
        self.bytes_copied += len(copied) * table.group.expert_bytes
        self.ready = b.event()
        self.ready.record(self.stream)
        b.current_stream().wait_event(self.ready)  # the forward waits for its copies, not for the tier's below
        if tier is not None:
            got = tier.keep(k, held, copied)
            try:
                for e in got:  # after this forward's copies into the table, on the same stream
                    for i, (r, slab) in enumerate(tensors):
                        b.copy(self.stream, tier.view(k, e, i, slab.n),
                               self.data[r.offset + e * slab.n:r.offset + (e + 1) * slab.n])
            except BaseException:  # a slot whose copy was never issued holds nothing (Ctrl-C, a copy error)
                tier.forget(k, got)
                raise
        return self.data

    def done(self) -> None:
        """After the forward: the next fill waits for its kernels; and the copies have read their source
        before the cache may give its pages back (from pageable memory CUDA may or may not have staged
        them when the copy call returned: not promised, so waited for; a no-op when it did)."""
        self.free = self.backend.event()
        self.free.record(self.backend.current_stream())
        if self.ready is not None:
            self.ready.synchronize()

    def close(self) -> None:
        try:
            self.stream.synchronize()
            if self.free is not None:  # the last forward's kernels no longer read the table
                self.free.synchronize()
        finally:
            self.data = None
            if self.tier is not None:
                self.tier.close()


class ExpertsStager:
    """``stage``/``done`` for experts modules, like a unit's stager: the routed experts read, the table bound
    (on a GPU: copied to the ``DeviceTable`` and that bound)."""

    host_buffers_only = True  # the tables (and the device table) live as long as the handle

    def __init__(self, prefetcher: Any, groups: Sequence[ExpertsGroup], cache: ExpertCache,
                 device: DeviceTable | None = None, read_room: int | None = None):
        self.prefetcher, self.cache, self.device = prefetcher, cache, device
        # Under a memory budget, what is kept out of the cache's budget for the experts a forward reads
        # (``reads_per_forward``): the cache and one forward's reads stay within ``room``. A forward reading
        # more makes room first, and one routing more than ``room`` is split (``ExpertsHook``). None: no
        # budget (``ram_tier=`` sizes the cache alone), a forward reads what it routes.
        self.read_room = read_room
        self.said_unsplit = False  # the one log line for a forward that cannot be split
        self.tables = {k: ExpertsTable(g) for k, g in enumerate(groups)}
        # evicted experts' huge pages, and spare ones faulted in ahead, moved under the next reads; the spare
        # pages' address space covers the most the pool may hold: the read room, else a layer's table
        most = read_room if read_room is not None else max((t.buffer.nbytes for t in self.tables.values()), default=0)
        self.pool = PagePool(spare_pages=most // HUGE_PAGE)
        if read_room is not None:  # under a budget the pool holds what the read room leaves between forwards
            self.pool.resize(read_room)
        for t in self.tables.values():
            t.pool = self.pool
        self.in_use: set[tuple[int, int]] = set()
        self.inflight: dict[tuple[int, int], Any] = {}  # predicted reads not yet wanted
        self.routed: dict[int, list[int]] = {}  # per group, the experts its current forward routes to
        self.predict_ahead = True

    def want(self, k: int, experts: Sequence[int]) -> None:
        """Experts ``experts`` of group ``k`` in its table: cached, predicted (wait for that read), or read now.
        The layer's other predicted reads are cached (in a split forward, one routed in a later group is a hit
        there if the cache still holds it then)."""
        table = self.tables[k]
        eb = table.group.expert_bytes
        self.routed[k] = list(experts)
        missing, waits = [], []
        tier = self.device.tier if self.device is not None else None
        with self.cache.lock:
            for e in experts:
                if tier is not None and tier.holds(k, e):  # on the GPU: neither read nor copied from the host
                    continue
                self.in_use.add((k, e))
                if e in table.present:
                    self.cache.hit((k, e))
                elif (k, e) in self.inflight:  # counted a hit once its read is in (below)
                    waits.append(e)
                else:
                    missing.append(e)
            self.cache.misses += len(missing)
        loads = [self.inflight.pop((k, e)) for e in waits]
        if self.read_room is not None and (missing or self.inflight):  # a batch larger than the read room (a
            # prefill, a batch of requests) makes room first, for it and the predicted reads not yet admitted
            room = len(missing) * eb + self._inflight_bytes() - self.read_room
            self.cache.evict(self.tables, self.in_use, room=room)
        for e in missing:
            table.back(e)
        if table.huge and self.read_room is None:  # these reads take this much memory anyway: the pool may keep
            self.pool.resize(sum(b - a for e in missing for a, b in table.huge[e]))  # as much for the next ones
        elif table.huge:  # while these reads fill the read room, the pool keeps what they leave of it
            self.pool.resize(self._pool_room(len(missing) * eb))
        try:
            demand = self.prefetcher.start_reads([(table.group.experts[e], table.buffer) for e in missing])
            self.prefetcher.finish_reads(loads + demand)
        finally:
            self.prefetcher.resume_prefetch()  # the batch is in (or failed): prefetches held for it may read
        with self.cache.lock:  # predicted and routed: hits, and used prediction if predicted since the last reset
            self.cache.hits += len(waits)
            self.cache.predicted_used_bytes += eb * len(self.cache.predicted.intersection((k, e) for e in waits))
            self.cache.predicted.difference_update((k, e) for e in waits)
        if demand:  # the reader's own timing of this batch: its first read's start to its last read's end
            span = max(x.t_end for x in demand) - min(x.t_start for x in demand)
            with self.cache.lock:
                self.cache.read_seconds += span
                self.cache.read_bytes += sum(x.bytes_done for x in demand)
        wrong = [e for (kk, e) in self.inflight if kk == k]  # predicted, not routed: still valid experts
        for e in wrong:
            try:
                self.prefetcher.finish_reads([self.inflight.pop((k, e))])
            except Exception:  # noqa: BLE001 - a read nobody needs; a later need reads it again
                continue
            waits.append(e)
        with self.cache.lock:
            for e in missing + waits:
                table.present.add(e)
                self.cache.admit((k, e), eb)
            self.cache.bytes_read += len(missing) * eb

    def _pool_room(self, reading: int) -> int:
        """Under a budget, what the read room leaves the page pool beside ``reading`` bytes of reads a forward
        waits for and the predicted reads in flight."""
        assert self.read_room is not None
        return max(0, self.read_room - reading - self._inflight_bytes())

    def _inflight_bytes(self) -> int:
        """Predicted experts being read, not admitted to the cache yet: memory they take already."""
        return sum(self.tables[k].group.expert_bytes for k, _ in self.inflight)

    @property
    def room(self) -> int | None:
        """The most bytes of experts in memory: the cache's budget and one forward's reads (None: no bound)."""
        return None if self.read_room is None else self.cache.budget + self.read_room

    def release(self, k: int, experts: Sequence[int]) -> None:
        """A split forward is done with these experts of group ``k``: back to the cache, within its budget."""
        self.in_use.difference_update((k, e) for e in experts)
        self.cache.evict(self.tables, self.in_use)

    def predict(self, k: int, hidden: torch.Tensor, per_token: int) -> None:
        """Start reading the experts group ``k``'s router would pick for ``hidden`` (the previous layer's
        input to its experts), behind queued prefetches, so the reads overlap this layer's compute."""
        if k not in self.tables or self.tables[k].group.router is None:
            return
        table = self.tables[k]
        router = table.group.router
        if hidden.shape[-1] != router.shape[-1]:
            return
        if router.device != hidden.device:  # on a GPU: the router's copy moves there once
            router = table.group.router = router.to(hidden.device)
        with torch.no_grad():
            scores = hidden.reshape(-1, hidden.shape[-1]).to(router.dtype) @ router.T
            guess = torch.unique(scores.topk(min(per_token, router.shape[0]), dim=-1).indices).tolist()
        tier = self.device.tier if self.device is not None else None
        todo = [e for e in guess if e not in table.present and (k, e) not in self.inflight
                and not (tier is not None and tier.holds(k, e))]
        if self.room is not None:  # under a memory bound: what fits now, beside the cache and the reads in flight,
            # and within the cache's budget, which the next layer's ``want`` can evict down to make room for its reads
            ahead = self._inflight_bytes()
            free = min(self.room - self.cache.used, self.cache.budget) - ahead
            todo = todo[:max(0, free // table.group.expert_bytes)]
        if not todo:
            return
        for e in todo:
            table.back(e)
        for e, load in zip(todo, self.prefetcher.start_reads([(table.group.experts[e], table.buffer) for e in todo],
                                                            urgent=False)):
            self.inflight[(k, e)] = load
        if self.read_room is not None:  # these reads take read room the pool held
            self.pool.resize(self._pool_room(0))
        with self.cache.lock:
            self.cache.predicted_bytes += len(todo) * table.group.expert_bytes
            self.cache.predicted.update((k, e) for e in todo)
            self.cache.bytes_read += len(todo) * table.group.expert_bytes

    def stage(self, k: int) -> torch.Tensor:
        if self.device is not None:
            return self.device.fill(k, self.tables[k], self.routed.get(k, range(self.tables[k].group.count)))
        return self.tables[k].buffer.tensor

    def done(self, k: int) -> None:
        if self.device is not None:
            self.device.done()
        self.in_use = {p for p in self.in_use if p[0] != k}
        self.cache.evict(self.tables, self.in_use)  # evicted experts' pages to the pool first
        if self.tables[k].huge:
            if self.read_room is not None:  # the forward's reads are cached now: the read room is free again
                self.pool.resize(self._pool_room(0))
            self.pool.refill()  # spare pages faulted in while the next units compute, not in the next reads

    def close(self) -> None:
        try:
            if self.device is not None:
                self.device.close()
        finally:
            self._close_tables()

    def _close_tables(self) -> None:
        for load in self.inflight.values():  # the prefetcher is closed first: these completed or were abandoned
            load.done.wait(1)
        self.inflight = {}
        self.pool.close()
        for t in self.tables.values():
            self.pool.forget(t)
            t.buffer.close()


def eager_forward(module: nn.Module) -> Any:
    """The experts module's own per-expert loop (Transformers' "eager" experts code, under any wrapper such
    as ``use_experts_implementation``'s dispatch), if a forward can be split into groups of experts with
    the same result bit for bit; else None.

    That needs the three things the split relies on, checked in its source: the output starts as
    ``torch.zeros_like(hidden_states)`` (``_StartFrom`` hands the groups before instead), each routed
    expert's contribution is added with ``index_add_`` in ascending expert order, and the index
    ``num_experts`` means no expert (``one_hot(..., num_classes=self.num_experts + 1)``), which is what the
    routing of the other groups' experts becomes. Transformers 5's eager experts (Mixtral, Qwen2/3-MoE,
    OLMoE, DeepSeek-V2/V3, ...) are written so; GPT-OSS's is not."""
    fn = inspect.unwrap(type(module).forward)
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    needed = ("zeros_like(hidden_states)", "index_add_", "num_experts + 1")
    return fn if all(x in src for x in needed) else None


class _StartFrom(TorchFunctionMode):
    """Within one group's forward: ``torch.zeros_like(hidden)`` returns ``acc`` (the groups before, summed),
    so this group's contributions are added onto them as one unsplit forward would add them."""

    def __init__(self, hidden: torch.Tensor, acc: torch.Tensor | None):
        super().__init__()
        self.hidden, self.acc, self.hits = hidden, acc, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.zeros_like and args and args[0] is self.hidden and not kwargs:
            self.hits += 1
            if self.acc is not None:
                return self.acc
        return func(*args, **kwargs)


class _Forward:
    """An experts module's ``forward`` while offload is enabled: the hook's ``_split_forward`` while installed,
    else a pass-through to what was there before. It holds the hook weakly, so a wrapper put over it after
    ``enable`` (Accelerate's) keeps neither the hook nor the stager and its tables alive after ``disable``."""

    def __init__(self, hook: ExpertsHook, module: nn.Module):
        functools.update_wrapper(self, module.forward)  # its signature: ``experts_modules`` finds the module by it
        self.hook = weakref.ref(hook)
        self.module = module
        self.before: Any = None  # the module's own ``forward`` attribute before ours (Accelerate's), if any
        self.installed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hook = self.hook()
        if hook is None or not self.installed:
            return self.passed_on(*args, **kwargs)
        return hook._split_forward(*args, **kwargs)

    def passed_on(self, *args: Any, **kwargs: Any) -> Any:
        if self.before is not None:
            return self.before(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class ExpertsHook(UnitHook):
    """A unit hook for an experts module: before binding, read the experts this forward routes to.

    A forward routing more experts than the experts' memory holds (``ExpertsStager.room``: a long prefill
    or a batch of requests under a small ``cpu_memory``) is split: the module's forward is wrapped (an
    instance attribute, taken out by ``remove``) and computes its experts group by group in ascending
    order with the module's own eager code (``eager_forward``), reading each group once the one before is
    done with, so memory stays within ``cpu_memory``. With the eager experts code the result is the
    unsplit forward's bit for bit; a module configured with another (Transformers' ``grouped_mm``, the
    default on the CPU) gets the eager code's result for those forwards, equal up to rounding. On a GPU,
    and where the experts code cannot be split, such a forward holds all its experts at once (one log line).
    """

    def __init__(self, index: int, group: ExpertsGroup, bindings: list[Binding], stager: ExpertsStager,
                 bound_units: BoundUnits | None = None):
        # experts modules run inside their block's unit: their own BoundUnits, so checking it costs a dict
        # test (the block's unit is always bound around them)
        super().__init__(index, group.module, group.table, bindings, stager, bound_units=bound_units)
        self.group = group
        self.eager = eager_forward(group.module) if stager.device is None else None
        self.groups: list[list[int]] | None = None  # this forward's experts in groups (None: not split)
        self._forward = _Forward(self, group.module)  # what ``register`` installs as the module's ``forward``

    def register(self) -> None:
        self.handles = [self.module.register_forward_pre_hook(self.pre_routed, with_kwargs=True),
                        self.module.register_forward_hook(self.post, always_call=True), *self._state_dict_hooks()]
        if self.eager is not None:
            self._forward.before = self.module.__dict__.get("forward")
            self.module.forward = self._forward
            self._forward.installed = True

    def remove(self) -> None:
        super().remove()
        self.groups = None
        if self._forward.installed and self.module.__dict__.get("forward") is self._forward:
            if self._forward.before is None:
                del self.module.forward
            else:
                self.module.forward = self._forward.before
        self._forward.installed = False  # left in someone's wrapper chain, it only passes calls on

    def _reachable(self) -> bool:
        """Whether a call of the module runs ``_split_forward``: the module's ``forward`` is ours, or wraps ours
        (``__wrapped__``: Accelerate's ``add_hook_to_module``); a wrapper put back without it bypasses us."""
        f, depth = self.module.__dict__.get("forward"), 0
        while f is not None and depth < 16:
            if f is self._forward:
                return self._forward.installed
            f, depth = getattr(f, "__wrapped__", None), depth + 1
        return False

    def pre_routed(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if _compiling():  # torch.compile: run as uncompiled (hooks.eagerly)
            return eagerly(ExpertsHook.pre_routed, self, module, args, kwargs)
        if self.depth and self.bound_units.threads.get(self) == threading.get_ident() and not self.reentered(module):
            self.reset()  # left bound by a forward of this thread interrupted in it: this call reads its own
        if not self.depth:
            hidden, index, _ = self._routing(args, kwargs)
            routed = [int(e) for e in torch.unique(index).tolist() if 0 <= int(e) < self.group.count]
            groups = self._split(routed)
            self.stager.want(self.index, groups[0] if groups else routed)  # type: ignore[attr-defined]
            if self.stager.predict_ahead and groups is None:  # type: ignore[attr-defined]
                if isinstance(hidden, torch.Tensor):
                    self.stager.predict(self.index + 1, hidden, index.shape[-1])  # type: ignore[attr-defined]
            self.groups = groups
        self.pre(module, args)

    def _split(self, routed: list[int]) -> list[list[int]] | None:
        """``routed`` in groups that fit the experts' memory, or None when they fit at once (or cannot split)."""
        stager: ExpertsStager = self.stager  # type: ignore[assignment]
        eb, room = self.group.expert_bytes, stager.room
        if room is None or len(routed) * eb <= room:
            return None
        if self.eager is None or not self._reachable():
            if not stager.said_unsplit:
                stager.said_unsplit = True
                log.info("offload: a forward of %s routes %d experts (%s), more than the %s of experts cpu_memory "
                         "leaves; %s, so it holds them all at once, past cpu_memory", self.group.name, len(routed),
                         format_bytes(len(routed) * eb), format_bytes(room),
                         "on a GPU the forward is not split" if stager.device is not None else
                         "its experts code cannot be split exactly (experts.tables.eager_forward)")
            return None
        with stager.cache.lock:
            stager.cache.split_forwards += 1
        return split(routed, eb, room)

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        groups = None
        if self.depth <= 1:  # the outermost call (or a failed pre-hook): its groups end with it
            groups, self.groups = self.groups, None
        super().post(module, args, output)
        if groups is not None and output is not None:  # split, but computed unsplit: from experts never read
            raise OffloadError(f"offload: {self.group.name}'s forward was to be split into groups of experts, but "
                               f"its forward ran without offload's wrapper (was the module's forward replaced while "
                               f"offload was enabled?); its output is wrong. Disable, then enable again")

    def _split_forward(self, *args: Any, **kwargs: Any) -> Any:
        groups, self.groups = self.groups, None
        if groups is None:
            return self._forward.passed_on(*args, **kwargs)
        hidden, index, weights = self._routing(args, kwargs)
        stager: ExpertsStager = self.stager  # type: ignore[assignment]
        acc: torch.Tensor | None = None
        for i, group in enumerate(groups):
            if i:  # the group before is done with: its experts may go, this group's come in
                stager.release(self.index, groups[i - 1])
                stager.want(self.index, group)
            mine = torch.isin(index, torch.tensor(group, dtype=index.dtype, device=index.device))
            with _StartFrom(hidden, acc) as start:
                out = self.eager(self.module, hidden, torch.where(mine, index, self.group.count), weights)
            if start.hits != 1 or (acc is not None and out is not acc):
                raise OffloadError(f"offload: the experts code of {self.group.name} ({type(self.module).__name__}) "
                                   f"did not add its groups up as expected: a forward routing more experts than "
                                   f"cpu_memory holds cannot be split for it. Give more cpu_memory")
            acc = out
        return acc

    @staticmethod
    def _routing(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor, Any]:
        """(hidden states, the router's indices, its weights) of an experts forward, as passed
        (``Experts.forward(hidden_states, top_k_index, top_k_weights)``, by position or keyword)."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
        weights = args[2] if len(args) > 2 else next((v for k, v in kwargs.items() if "weight" in k), None)
        return hidden, index, weights
