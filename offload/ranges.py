"""Where a unit's bytes are in a checkpoint's own safetensors shards, and how to read them in place.

A unit read in place is a list of *extents* (``store.Extent``): byte ranges of the shard files,
widened to the O_DIRECT alignment (a page) so they can be read straight into a page-aligned buffer,
and coalesced when they touch or nearly touch, so a block saved by ``save_pretrained`` (its tensors
side by side in one shard) is one request, or two when it straddles a shard. Each tensor is then a
view into the buffer at ``into + (its offset - extent offset)``: no copy. A tensor made of several
source tensors (per-expert weights that the model holds fused) lists its *pieces*, copied into an
assembly area after the reads.

Widening costs bytes: a unit whose ranges are scattered would read more than it needs. Beyond
``MAX_OVERREAD`` of its own bytes (plus a page at each end of each extent, which tiny units cannot
avoid), ``plan_unit`` says no and the caller copies that checkpoint into a store instead.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ._fileio import PAGE
from .manifest import Extent, TensorRecord, UnitRecord

GAP_BYTES = 2 * PAGE  # a hole this small is cheaper to read than to skip with another request
MAX_OVERREAD = 1.25  # read at most this many times a unit's own bytes (else copy the checkpoint)
ASSEMBLY_ALIGN = 256  # fused tensors start at this alignment in the assembly area (as in a store)


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """One tensor as the model wants it, and where its bytes are: one piece, or several in order."""
    name: str  # relative to the unit
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    pieces: tuple[tuple[str, int, int], ...]  # (file relative to the checkpoint, absolute offset, nbytes)
    resident: bool = False  # a buffer of a block (a router's bias): loaded once with the resident part

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.pieces)


def page_down(n: int) -> int:
    return n // PAGE * PAGE


def page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def page_reads(file: str, start: int, end: int, size: int, into: int) -> list[Extent]:
    """Read the page-aligned range ``[start, end)`` of ``file`` to ``into`` (page aligned too), clipped at
    the file's ``size``: the whole pages as one O_DIRECT read, and a file's partial last page (which
    O_DIRECT cannot read) as a separate, buffered one right after it."""
    end = min(end, size)
    aligned_end = max(start, page_down(end))
    out = [Extent(file, start, aligned_end - start, into)] if aligned_end > start else []
    if end > aligned_end:
        out.append(Extent(file, aligned_end, end - aligned_end, into + aligned_end - start))
    return out


def plan_extents(ranges: Sequence[tuple[str, int, int]], file_sizes: dict[str, int]) -> list[Extent]:
    """Page-widened, coalesced reads covering ``ranges`` (file, offset, nbytes), placed one after another
    in a buffer at page-aligned ``into`` offsets (``page_reads``)."""
    merged: list[list] = []  # [file, start, end]
    for file, off, n in sorted(ranges):
        start, end = page_down(off), page_up(off + n)
        if merged and merged[-1][0] == file and start <= merged[-1][2] + GAP_BYTES:
            merged[-1][2] = max(merged[-1][2], end)
        else:
            merged.append([file, start, end])
    out: list[Extent] = []
    into = 0
    for file, start, end in merged:
        out += page_reads(file, start, end, file_sizes[file], into)
        into += page_up(min(end, file_sizes[file]) - start)
    return out


def plan_unit(name: str, tensors: Sequence[SourceTensor], file_sizes: dict[str, int],
              streamed: bool = True) -> UnitRecord | None:
    """The record of a unit read in place from ``tensors``' pieces, or None when a ``streamed`` unit (read
    every pass) would read more than ``MAX_OVERREAD`` times its bytes (scattered tensors: copy instead).
    The resident part is read once, so its small scattered tensors (norms, a router's bias) are fine."""
    ranges = [p for t in tensors for p in t.pieces]
    extents = plan_extents(ranges, file_sizes)
    own = sum(t.nbytes for t in tensors)
    read = sum(e.length for e in extents)
    if streamed and read > MAX_OVERREAD * own + 2 * PAGE * len(extents):
        return None

    def where(file: str, off: int) -> int:
        for e in extents:
            if e.file == file and e.offset <= off < e.offset + e.length:
                return e.into + off - e.offset
        raise AssertionError(f"{file}@{off} is not covered by the extents of unit {name}")

    read_area = page_up(max((e.into + e.length for e in extents), default=0))
    assembled = read_area
    records = []
    for t in tensors:
        if len(t.pieces) == 1:
            file, off, n = t.pieces[0]
            records.append(TensorRecord(t.name, t.dtype, t.shape, where(file, off) if n else 0, n))
            continue
        assembled = -(-assembled // ASSEMBLY_ALIGN) * ASSEMBLY_ALIGN
        pieces = tuple((where(f, o), n) for f, o, n in t.pieces)
        records.append(TensorRecord(t.name, t.dtype, t.shape, assembled, t.nbytes, pieces))
        assembled += t.nbytes
    first = extents[0].file if extents else ""
    return UnitRecord(name, first, 0, 0, page_up(assembled), None, tuple(records), None, (), tuple(extents))  # type: ignore[arg-type]
