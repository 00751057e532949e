"""Where each expert's bytes are in the checkpoint, and where they go in its experts module's table
(``carve``: a block split into what streams as a unit and its experts modules, read on routing)."""
from __future__ import annotations

import collections
import dataclasses
import os

import torch
from torch import nn

from .._fileio import PAGE
from ..plan import StreamedTensor, UnitPlan
from ..ranges import SourceTensor, page_down, page_reads, page_up, plan_unit
from ..staging import HUGE_PAGE
from ..store import Extent, Store, TensorRecord, UnitRecord
from .find import experts_modules


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
