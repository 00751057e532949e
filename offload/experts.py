"""Routed experts: read only the experts a mixture-of-experts layer's router picks.

A Transformers 5 experts module holds every expert's weights as 3-D tensors (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I], GPT-OSS's biases [E, ...]) and receives the router's choice
before it computes: ``experts(hidden_states, top_k_index, top_k_weights)``. Its forward only indexes
the experts in ``top_k_index``. So, generically (no per-architecture code):

* the block's unit streams without the experts' tensors (``carve``: the unit's extents recomputed for
  what is left, ``ranges.plan_extents``);
* each experts module gets a *table*: one zero-filled anonymous mapping holding its tensors at full
  shape, of which only the experts read so far are backed by memory. Expert ``e`` of a tensor is the
  slice ``[e]``, one range of the store's unit file or the checkpoint's fused tensor, or the pieces of
  the checkpoint's per-expert tensors (read in place), read straight into the table. A slice of whole
  pages gets a region of its own (``Slab``: the module sees a strided ``[E, ...]`` view), so no page
  is shared with a neighbour and big slices sit on huge pages;
* a forward pre-hook reads the routed experts that are not in the table (all at once, on the
  prefetcher's reader threads, ahead of queued prefetches), then binds the tables; the experts the
  forward does not route to are never read, and it never reads them (their pages stay unbacked);
* ``ExpertCache`` keeps read experts within a byte budget (pages given back with ``MADV_DONTNEED``);
  a policy (``POLICIES``: LRU, LFU, aged LFU with history, LRU-2) says which go first; with a budget
  of 0 a forward's experts are dropped after it.

Each expert is read through the prefetcher as a small unit of its own (``UnitRecord`` with extents),
so its checksum is recorded on the first read and checked on later ones, and its bytes count in
``stats().bytes_read``. Prefill reads each routed expert once per forward whatever the prompt length.
On a GPU the routed experts are then copied from the host tables to one device table (``DeviceTable``)
that the experts modules use in turn. A module this cannot serve (quantized units) streams with its
block, with one log line saying why.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._fileio import PAGE
from .hooks import Binding, UnitHook
from .plan import StreamedTensor, UnitPlan
from .ranges import SourceTensor, page_down, page_reads, page_up, plan_unit
from .staging import HUGE_PAGE, HostBuffer
from .store import Extent, Store, TensorRecord, UnitRecord

log = logging.getLogger("offload")


def experts_modules(block: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name in the block, module, number of experts)`` of every routed experts module in ``block``:
    a module with ``num_experts``, a forward taking the router's indices right after the hidden states,
    and parameters that all lead with the expert dimension."""
    out = []
    for name, m in block.named_modules():
        e = getattr(m, "num_experts", None)
        params = list(m.named_parameters(recurse=False))
        if not isinstance(e, int) or e < 2 or not params or any(p.dim() < 2 or p.shape[0] != e for _, p in params):
            continue
        try:
            names = list(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError):
            continue
        if len(names) >= 2 and ("index" in names[1] or "indices" in names[1]):
            out.append((name, m, e))
    return out


def _file_ranges(unit: UnitRecord, t: TensorRecord, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """The file ranges of bytes ``[lo, hi)`` of tensor ``t`` of ``unit`` (through its pieces and extents)."""
    out = []
    pos = 0
    for at, n in t.pieces or ((t.offset, t.nbytes),):
        a, b = max(lo, pos), min(hi, pos + n)
        buf, left = at + a - pos, b - a
        while left > 0:  # a tensor may run on from one read into the next (a shard's partial last page)
            e = next(e for e in unit.reads if e.into <= buf < e.into + e.length)
            k = min(left, e.into + e.length - buf)
            out.append((e.file, e.offset + buf - e.into, k))
            buf, left = buf + k, left - k
        pos += n
    return out


def _merged(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Adjacent file ranges joined (a tensor split only by a shard's partial-last-page read)."""
    out: list[tuple[str, int, int]] = []
    for f, o, n in ranges:
        if out and out[-1][0] == f and out[-1][1] + out[-1][2] == o:
            out[-1] = (f, out[-1][1], out[-1][2] + n)
        else:
            out.append((f, o, n))
    return out


def _extents(unit: UnitRecord, t: TensorRecord, lo: int, hi: int, into: int) -> list[Extent]:
    """Bytes ``[lo, hi)`` of tensor ``t`` read exactly (no widening: pieces, buffered) to ``into`` onwards."""
    out = []
    for f, o, k in _file_ranges(unit, t, lo, hi):
        out.append(Extent(f, o, k, into))
        into += k
    return out


def _widened(file: str, offset: int, n: int, into: int, size: int) -> list[Extent]:
    """Read ``n`` bytes at ``offset`` into ``into`` as whole pages (O_DIRECT, ``ranges.page_reads``): the
    page before and after land in the bytes around ``into``, which hold the same file bytes (a
    neighbouring expert) or room left for them. ``into`` and ``offset`` share their offset within a page."""
    start = page_down(offset)
    return page_reads(file, start, page_up(offset + n), size, into - (offset - start))


@dataclasses.dataclass(frozen=True)
class Slab:
    """Where one experts tensor lives in its table: expert ``e``'s slice is ``n`` bytes at
    ``base + e * stride``.

    When each slice is a whole number of pages in one range of a file (``own`` > 0), every expert has a
    region of its own, ``own`` bytes from ``base - lead`` (``lead``: the file offset's place within its
    page, so the O_DIRECT read of whole pages starts exactly at the region), with room after it up to
    ``stride``: no page is shared with a neighbour, so an evicted expert's pages all go back, and a
    region of 2 MiB or more starts on a 2 MiB boundary, its whole 2 MiB pages advised as huge pages.
    Over 4 KiB pages an O_DIRECT read faults in and pins 512 pages per 2 MiB; over a huge page one:
    reading 6 MiB experts at random this VM gave 1.0-1.1 GB/s into fresh 4 KiB pages and 1.6-1.7 into
    huge pages (``own == 0``: the slices are packed, ``stride == n``, as in the checkpoint)."""
    base: int
    stride: int
    n: int
    lead: int = 0
    own: int = 0

    def region(self, e: int) -> tuple[int, int]:
        """Expert ``e``'s own bytes ``[a, b)`` (``own`` > 0), else the whole pages inside its slice."""
        if self.own:
            a = self.base - self.lead + e * self.stride
            return a, a + self.own
        return page_up(self.base + e * self.n), page_down(self.base + (e + 1) * self.n)


@dataclasses.dataclass
class ExpertsGroup:
    """One experts module: its table, the record of all its experts (a stray use reads them all) and
    one record per expert (what a routed read reads)."""
    name: str
    module: nn.Module
    count: int
    tensors: list[StreamedTensor]
    table: UnitRecord  # the tensors packed, as in the checkpoint; extents: every expert (restore, stray uses)
    experts: list[UnitRecord]  # expert e's slices of every tensor, read into the table buffer (``slabs``)
    slabs: list[Slab]  # per tensor: where its experts live in the table buffer
    buffer_bytes: int  # the table buffer's size
    router: torch.Tensor | None = None  # a resident copy of the block's router weight [E, H], for prediction

    @property
    def expert_bytes(self) -> int:
        return sum(s.n for s in self.slabs)


def carve(store: Store, plan: UnitPlan, rec: UnitRecord) -> tuple[UnitPlan, UnitRecord, list[ExpertsGroup]]:
    """Split a block into what streams as a unit and its experts modules, read on routing."""
    found = experts_modules(plan.module)
    if not found or rec.quantized:
        return plan, rec, []
    by_name = {t.name: t for t in rec.tensors}
    owners = {id(m): (name, m, e) for name, m, e in found}
    groups: dict[int, list[StreamedTensor]] = collections.defaultdict(list)
    rest: list[StreamedTensor] = []
    for t in plan.tensors:
        (groups[id(t.owner)] if id(t.owner) in owners and t.is_param else rest).append(t)
    sizes = {e.file: os.path.getsize(store.path_of(rec, e.file)) for e in rec.reads}
    out: list[ExpertsGroup] = []
    for key, tensors in groups.items():
        name, module, count = owners[key]
        layout, at, whole = [], 0, []
        for t in tensors:  # the packed table (disable's restore, stray uses, a GPU's device table)
            r = by_name[t.rel]
            ranges = _merged(_file_ranges(rec, r, 0, r.nbytes))
            # each tensor on a page of its own: aligned for any kernel (grouped_mm on CUDA needs 16 bytes);
            # read exactly, and where the file offset is not page aligned the reader bounces it (O_DIRECT)
            at = page_up(at)
            layout.append(TensorRecord(r.name, r.dtype, r.shape, at, r.nbytes))
            whole.append(ranges[0] if len(ranges) == 1 else None)
            at += r.nbytes
        table_reads = [x for r in layout for x in _extents(rec, by_name[r.name], 0, r.nbytes, r.offset)]
        slabs, end = [], 0
        for r, one in zip(layout, whole):  # the routed table: each expert in a region of its own
            n = r.nbytes // count
            if one is not None and n % PAGE == 0:
                lead = one[1] % PAGE
                own = page_up(lead + n)
                stride = -(-own // HUGE_PAGE) * HUGE_PAGE if own >= HUGE_PAGE else own
                start = -(-end // HUGE_PAGE) * HUGE_PAGE if own >= HUGE_PAGE else page_up(end)
                slabs.append(Slab(start + lead, stride, n, lead, own))
                end = start + count * stride
            else:  # pieces, or slices that are not whole pages: packed as in the file
                start = page_up(end) + PAGE + (one[1] % PAGE if one is not None else 0)
                slabs.append(Slab(start, n, n))
                end = start + r.nbytes + PAGE
        experts = []
        for e in range(count):
            reads = []
            for r, slab, one in zip(layout, slabs, whole):
                into = slab.base + e * slab.stride
                if one is not None:
                    reads += _widened(one[0], one[1] + e * slab.n, slab.n, into, sizes[one[0]])
                else:
                    reads += _extents(rec, by_name[r.name], e * slab.n, (e + 1) * slab.n, into)
            experts.append(UnitRecord(f"{plan.name}.{name}[{e}]", reads[0].file, 0, 0, end, None, (), None, (),
                                      tuple(reads)))  # type: ignore[arg-type]
        table = UnitRecord(f"{plan.name}.{name}", table_reads[0].file, 0, 0, at, None, tuple(layout), None, (),
                           tuple(table_reads))  # type: ignore[arg-type]
        router = next((by_name[t.rel] for t in plan.tensors if t.is_param and id(t.owner) != key
                       and len(t.shape) == 2 and t.shape[0] == count and t.rel in by_name), None)
        weight = store.read_tensor(rec, router.name) if router is not None else None
        out.append(ExpertsGroup(f"{plan.name}.{name}", module, count, tensors, table, experts, slabs, end, weight))
    left = {t.rel for t in rest}
    kept = [SourceTensor(r.name, r.dtype, r.shape, tuple(_file_ranges(rec, r, 0, r.nbytes)))
            for r in rec.tensors if r.name in left]
    dense = plan_unit(rec.name, kept, sizes, streamed=False)
    assert dense is not None
    return dataclasses.replace(plan, tensors=rest), dense, out


Key = tuple[int, int]  # (experts group, expert)


class _Policy:
    """Which cached expert goes first. ``hit``: a routed expert found cached; ``insert``: one just read;
    ``remove``: one evicted; ``order()``: the cached keys, the first to evict first. Every call is made
    under the cache's lock; ``order`` is asked only when the cache is over its budget."""

    name = ""

    def __init__(self) -> None:
        self.tick = 0  # accesses so far (hits and inserts): the clock of the recency rules

    def hit(self, key: Key) -> None:
        self.tick += 1

    def insert(self, key: Key) -> None:
        self.tick += 1

    def remove(self, key: Key) -> None:
        raise NotImplementedError

    def order(self) -> list[Key]:
        raise NotImplementedError


class _LRU(_Policy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.keys: collections.OrderedDict[Key, None] = collections.OrderedDict()

    def hit(self, key: Key) -> None:
        super().hit(key)
        self.keys.move_to_end(key)

    def insert(self, key: Key) -> None:
        super().insert(key)
        self.keys[key] = None
        self.keys.move_to_end(key)

    def remove(self, key: Key) -> None:
        del self.keys[key]

    def order(self) -> list[Key]:
        return list(self.keys)


class _LFU(_Policy):
    """Least frequently used first, counting uses while cached (an evicted expert starts again at 1);
    among equal counts the least recently used first."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}
        self.last: dict[Key, int] = {}

    def hit(self, key: Key) -> None:
        super().hit(key)
        self.count[key] += 1
        self.last[key] = self.tick

    def insert(self, key: Key) -> None:
        super().insert(key)
        self.count[key] = 1
        self.last[key] = self.tick

    def remove(self, key: Key) -> None:
        del self.count[key], self.last[key]

    def order(self) -> list[Key]:
        return sorted(self.count, key=lambda k: (self.count[k], self.last[k]))


class _WithHistory(_Policy):
    """A policy that remembers every expert ever used (evicted ones too: at most the model's experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.cached: set[Key] = set()

    def _use(self, key: Key) -> None:
        raise NotImplementedError

    def hit(self, key: Key) -> None:
        super().hit(key)
        self._use(key)

    def insert(self, key: Key) -> None:
        super().insert(key)
        self.cached.add(key)
        self._use(key)

    def remove(self, key: Key) -> None:
        self.cached.discard(key)


class _LFUAged(_WithHistory):
    """Frequency with history and aging: every expert ever routed keeps a score (evicted ones too),
    +1 per use, all scores halved every ``period`` uses, so popularity that has passed fades; the
    cached expert of lowest score goes first, the least recently used among equals. ``period`` 0:
    ``4 x`` the number of experts the cache holds at its first eviction."""

    name = "lfu-aged"

    def __init__(self, period: int = 0) -> None:
        super().__init__()
        self.period = period
        self.score: dict[Key, float] = {}
        self.last: dict[Key, int] = {}

    def _use(self, key: Key) -> None:
        self.score[key] = self.score.get(key, 0.0) + 1.0
        self.last[key] = self.tick
        if self.period and self.tick % self.period == 0:
            for k in self.score:
                self.score[k] /= 2

    def order(self) -> list[Key]:
        if not self.period:
            self.period = 4 * max(1, len(self.cached))
        return sorted(self.cached, key=lambda k: (self.score[k], self.last[k]))


class _LRU2(_WithHistory):
    """LRU-2 (LRU-K, K=2; O'Neil et al. 1993): the expert whose second-to-last use is oldest goes first,
    so one use is not enough to displace experts used twice; experts used once (cached or not, the
    history is kept for every expert) go first among themselves by their last use."""

    name = "lru2"

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[Key, tuple[int, int]] = {}  # (second-to-last use or -1, last use)

    def _use(self, key: Key) -> None:
        self.uses[key] = (self.uses.get(key, (-1, -1))[1], self.tick)

    def order(self) -> list[Key]:
        return sorted(self.cached, key=lambda k: self.uses[k])


POLICIES: dict[str, type[_Policy]] = {p.name: p for p in (_LRU, _LFU, _LFUAged, _LRU2)}
# The policy a new ExpertCache uses, chosen by measurement (README, Mixtures of experts: hit rate against cache
# size on recorded and synthetic routing traces, benchmarks/plot_moe_cache.py): aged LFU was best or within
# 0.015 of the best at every size of every trace, 6-8 points above LRU at 0.5 GiB on the recorded traces;
# plain LFU was worst.
# Private knob for benchmarks: set it before enable().
_POLICY = "lfu-aged"
# Huge pages inside each expert's own bytes in its table (ExpertsTable._advise_huge); off: 4 KiB pages only.
_HUGE_PAGES = True


class ExpertCache:
    """Which experts are in the tables, within ``budget`` bytes; ``policy`` (``POLICIES``, default
    ``_POLICY``) says which go first.

    Experts a forward is using are held (``in_use``) until its ``done``. Eviction gives the pages back
    (``MADV_DONTNEED`` on the whole pages of each slice), so resident memory follows the budget.
    """

    def __init__(self, budget: int, policy: str | None = None):
        self.budget = budget
        self.policy = POLICIES[policy or _POLICY]()
        self.sizes: dict[Key, int] = {}  # cached (group, e) -> bytes
        self.used = 0
        self.hits = self.misses = 0
        self.bytes_read = 0
        self.evictions = 0
        self.read_seconds = 0.0  # wall time of the routed (demand) reads, batch by batch (first start to last end)
        self.read_bytes = 0  # the bytes those reads brought in
        self.predicted_bytes = 0  # read ahead for the next layer (its router on this layer's hidden state)
        self.predicted_used_bytes = 0  # of those, the experts the next layer did route to
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Counters back to 0 (``Handle.reset_stats``); what the cache holds stays."""
        self.hits = self.misses = self.bytes_read = self.predicted_bytes = self.predicted_used_bytes = 0
        self.evictions = self.read_bytes = 0
        self.read_seconds = 0.0

    def hit(self, key: Key) -> None:
        """A routed expert found cached (call under ``lock``)."""
        self.hits += 1
        self.policy.hit(key)

    def admit(self, key: Key, nbytes: int) -> None:
        """An expert now in its table (call under ``lock``)."""
        if key in self.sizes:
            self.policy.hit(key)
            return
        self.sizes[key] = nbytes
        self.used += nbytes
        self.policy.insert(key)

    def evict(self, tables: dict[int, Any], in_use: set[Key]) -> list[Key]:
        """Drop unpinned experts in the policy's order until the cache is within its budget; returns them."""
        out: list[Key] = []
        with self.lock:
            if self.used <= self.budget:
                return out
            for key in self.policy.order():
                if self.used <= self.budget:
                    break
                if key in in_use:
                    continue
                self.used -= self.sizes.pop(key)
                self.policy.remove(key)
                tables[key[0]].drop(key[1])
                out.append(key)
            self.evictions += len(out)
        return out


def replay(trace: Sequence[tuple[int, Sequence[int]]], budget: int, expert_bytes: int | dict[int, int],
           policy: str | None = None) -> tuple[int, int, list[Key]]:
    """Hits, misses and the evicted keys in order of an ``ExpertCache`` of ``budget`` bytes and ``policy``
    over a routing trace (``(group, routed experts)`` per experts forward, in forward order), as
    ``ExpertsStager.want`` and ``done`` drive it without prediction: the routed experts found cached are
    hits, the others are read and admitted, then, the forward done (its experts no longer in use), the
    cache evicts down to its budget. Fast and deterministic: for comparing policies on recorded traces."""
    cache = ExpertCache(budget, policy)
    size = (lambda k: expert_bytes) if isinstance(expert_bytes, int) else expert_bytes.__getitem__

    class _NoTable:
        def drop(self, e: int) -> None:
            pass
    tables: dict[int, Any] = collections.defaultdict(_NoTable)
    evicted: list[Key] = []
    for k, routed in trace:
        routed = list(dict.fromkeys(routed))
        with cache.lock:
            missing = []
            for e in routed:
                if (k, e) in cache.sizes:
                    cache.hit((k, e))
                else:
                    missing.append(e)
            cache.misses += len(missing)
            for e in missing:
                cache.admit((k, e), size(k))
        evicted += cache.evict(tables, set())
    return cache.hits, cache.misses, evicted


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
        self.huge_bytes = self._advise_huge()

    def _madvise(self, advice: int, a: int, b: int) -> None:
        assert self.buffer._mm is not None
        self.buffer._mm.madvise(advice, self.buffer._pad + a, b - a)

    def _advise_huge(self) -> int:
        """Advise transparent huge pages on every 2 MiB page that lies wholly inside one expert's own bytes
        (``Slab.region``), and nowhere else: a huge page is backed only when that expert is read and freed
        whole when it is evicted, so resident memory stays what the cache counts; a region's tail (and,
        for packed slabs, the edges a neighbour's widened read shares) stays on 4 KiB pages. Returns the
        bytes advised."""
        if self.buffer._mm is None or not hasattr(mmap, "MADV_HUGEPAGE") or not self.buffer.huge:
            return 0
        ranges = []
        for slab in self.group.slabs:
            for e in range(self.group.count):
                lo, hi = slab.region(e)
                a, b = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
                if b > a:
                    ranges.append((a, b))
        try:
            # HostBuffer advised the whole table; pages shared by experts must not be huge (an eviction
            # would split them), so off everywhere first, then on per region
            self._madvise(mmap.MADV_NOHUGEPAGE, 0, self.buffer.nbytes // HUGE_PAGE * HUGE_PAGE)
            # each advised range is a mapping of its own: past the kernel's limit on a process's mappings
            # (vm.max_map_count) every later mmap (malloc's large blocks, torch's) fails, so stay well under
            if not _HUGE_PAGES or not _mappings_allow(2 * len(ranges)):
                return 0
            done = 0
            for a, b in ranges:
                self._madvise(mmap.MADV_HUGEPAGE, a, b)
                done += b - a
            return done
        except OSError:  # THP compiled out: 4 KiB pages still work
            return 0

    def drop(self, e: int) -> None:
        """Give expert ``e``'s pages back: its whole region (or the whole pages inside a packed slice, whose
        edges a neighbour shares)."""
        self.present.discard(e)
        if self.buffer._mm is None:
            return
        for slab in self.group.slabs:
            a, b = slab.region(e)
            if b > a:
                self._madvise(mmap.MADV_DONTNEED, a, b)


class ExpertBinding(Binding):
    """An experts tensor bound to its table: ``[E, ...]`` with expert ``e`` at ``base + e * stride``
    (``Slab``), a strided view; ``offset``/``nbytes`` stay the packed table's (disable's restore)."""

    slab: Slab

    @classmethod
    def of(cls, b: Binding, slab: Slab) -> ExpertBinding:
        out = cls(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.init})
        out.slab = slab
        return out

    def view_in(self, data: torch.Tensor, keep: bool) -> torch.Tensor:
        key = data.data_ptr()
        view = self.views.get(key) if keep else None
        if view is None:
            size = self.dtype.itemsize
            slab = self.slab
            assert slab.base % size == 0 and slab.stride % size == 0, (slab, self.dtype)
            inner = [1]
            for d in reversed(self.shape[1:]):
                inner.insert(0, inner[0] * d)
            typed = data.view(self.dtype)
            view = typed.as_strided(self.shape, (slab.stride // size, *inner[1:]),
                                    typed.storage_offset() + slab.base // size)
            if keep:
                self.views[key] = view
        return view


class DeviceTable:
    """On a GPU, the routed experts of the experts module computing now: one table on the device in the
    packed layout (the largest module's size), which every experts module there uses in turn.

    The host tables stay what they are on the CPU (read on routing, the expert cache); a forward copies
    only its routed experts' slices into this table on a copy stream, after the previous user's kernels
    are done with it (``free``, recorded on the compute stream), and the compute stream waits for the
    copies (``ready``): the same ordering as the device slot ring (``transfer.CudaStager``). The experts
    that are not routed hold stale bytes that the forward never reads (it indexes only routed experts; a
    grouped kernel multiplies no row by them). Its bytes count against ``gpu_memory`` (``placement``).
    Each tensor sits on a page of its own (``carve``), aligned as ``grouped_mm`` on CUDA requires."""

    def __init__(self, backend: Any, nbytes: int):
        self.backend = backend
        self.data = backend.empty(nbytes)
        self.stream = backend.stream()
        self.free: Any = None  # recorded on the compute stream after the last forward that read ``data``
        self.ready: Any = None  # recorded on the copy stream after the last forward's copies
        self.bytes_copied = 0

    def fill(self, table: ExpertsTable, experts: Sequence[int]) -> torch.Tensor:
        b = self.backend
        if self.free is not None:
            self.stream.wait_event(self.free)
        host = table.buffer.tensor
        for r, slab in zip(table.group.table.tensors, table.group.slabs):
            for e in experts:
                src = slab.base + e * slab.stride
                b.copy(self.stream, self.data[r.offset + e * slab.n:r.offset + (e + 1) * slab.n], host[src:src + slab.n])
        self.bytes_copied += len(experts) * table.group.expert_bytes
        self.ready = b.event()
        self.ready.record(self.stream)
        b.current_stream().wait_event(self.ready)
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


class ExpertsStager:
    """``stage``/``done`` for experts modules, like a unit's stager: the routed experts read, the table bound
    (on a GPU: copied to the ``DeviceTable`` and that bound)."""

    host_buffers_only = True  # the tables (and the device table) live as long as the handle

    def __init__(self, prefetcher: Any, groups: Sequence[ExpertsGroup], cache: ExpertCache,
                 device: DeviceTable | None = None):
        self.prefetcher, self.cache, self.device = prefetcher, cache, device
        self.tables = {k: ExpertsTable(g) for k, g in enumerate(groups)}
        self.in_use: set[tuple[int, int]] = set()
        self.inflight: dict[tuple[int, int], Any] = {}  # predicted reads not yet wanted
        self.routed: dict[int, list[int]] = {}  # per group, the experts its current forward routes to
        self.predict_ahead = True

    def want(self, k: int, experts: Sequence[int]) -> None:
        """Experts ``experts`` of group ``k`` in its table: cached, predicted (wait for that read), or read now."""
        table = self.tables[k]
        eb = table.group.expert_bytes
        self.routed[k] = list(experts)
        missing, waits = [], []
        with self.cache.lock:
            for e in experts:
                self.in_use.add((k, e))
                if e in table.present:
                    self.cache.hit((k, e))
                elif (k, e) in self.inflight:
                    waits.append(e)
                    self.cache.hits += 1
                    self.cache.predicted_used_bytes += eb
                else:
                    missing.append(e)
            self.cache.misses += len(missing)
        loads = [self.inflight.pop((k, e)) for e in waits]
        demand = self.prefetcher.start_reads([(table.group.experts[e], table.buffer) for e in missing])
        self.prefetcher.finish_reads(loads + demand)
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
        todo = [e for e in guess if e not in table.present and (k, e) not in self.inflight]
        if not todo:
            return
        for e, load in zip(todo, self.prefetcher.start_reads([(table.group.experts[e], table.buffer) for e in todo],
                                                            urgent=False)):
            self.inflight[(k, e)] = load
        with self.cache.lock:
            self.cache.predicted_bytes += len(todo) * table.group.expert_bytes
            self.cache.bytes_read += len(todo) * table.group.expert_bytes

    def stage(self, k: int) -> torch.Tensor:
        if self.device is not None:
            return self.device.fill(self.tables[k], self.routed.get(k, range(self.tables[k].group.count)))
        return self.tables[k].buffer.tensor

    def done(self, k: int) -> None:
        if self.device is not None:
            self.device.done()
        self.in_use = {p for p in self.in_use if p[0] != k}
        self.cache.evict(self.tables, self.in_use)

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
        for t in self.tables.values():
            t.buffer.close()


class ExpertsHook(UnitHook):
    """A unit hook for an experts module: before binding, read the experts this forward routes to."""

    def __init__(self, index: int, group: ExpertsGroup, bindings: list[Binding], stager: ExpertsStager):
        super().__init__(index, group.module, group.table, bindings, stager)
        self.group = group

    def register(self) -> None:
        self.handles = [self.module.register_forward_pre_hook(self.pre_routed, with_kwargs=True),
                        self.module.register_forward_hook(self.post, always_call=True)]

    def pre_routed(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not self.depth:
            index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
            routed = [int(e) for e in torch.unique(index).tolist() if 0 <= int(e) < self.group.count]
            self.stager.want(self.index, routed)  # type: ignore[attr-defined]
            if self.stager.predict_ahead:  # type: ignore[attr-defined]
                hidden = args[0] if args else kwargs.get("hidden_states")
                if isinstance(hidden, torch.Tensor):
                    self.stager.predict(self.index + 1, hidden, index.shape[-1])  # type: ignore[attr-defined]
        self.pre(module, args)


@dataclasses.dataclass(frozen=True)
class RoutedPlan:
    """A model's experts as a plan sees them, from its meta model (no data): per unit, the bytes of all its
    experts; per token, how many experts of each layer a token routes to."""
    unit_expert_bytes: list[int]  # per unit (store order): the bytes of its experts modules' tensors
    expert_bytes: list[int]  # per unit: the bytes of one expert (0: no experts)
    top_k: int  # experts a token routes to per layer (the config's num_experts_per_tok)

    def routed_per_token(self) -> int:
        """Upper bound of the expert bytes one decode token reads with no expert cached."""
        return sum(self.top_k * b for b in self.expert_bytes)


def routed_plan(model: nn.Module, unit_names: Sequence[str]) -> RoutedPlan | None:
    """``RoutedPlan`` of a model built on meta, or None when it has no routed experts."""
    modules = dict(model.named_modules())
    whole, one = [], []
    for name in unit_names:
        found = experts_modules(modules[name]) if name in modules else []
        whole.append(sum(p.numel() * p.element_size() for _, m, _ in found for p in m.parameters(recurse=False)))
        one.append(sum(p.numel() * p.element_size() // e for _, m, e in found for p in m.parameters(recurse=False)))
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if not any(whole) or not isinstance(k, int):
        return None
    return RoutedPlan(whole, one, k)
