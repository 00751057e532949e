"""``plan_memory()``: which units live in the GPU tier, which in the RAM tier, which stream, and the
staging rings that the streamed ones need — decided in one place for ``enable``, ``load`` and the
CLI's plan table, so the plan a user is shown is what gets allocated.

The rings and the tiers depend on each other: a ring's slots hold the largest unit that streams
through it, and a tier gets what the budget leaves after the ring. Sizing the ring first, for every
unit, reserves slots for units the tier then keeps (seen: 3 x 4.2 MB slots for streamed units of
69 KB). ``split_tier`` settles both together.

Budgets are *rooms*: the bytes a tier and its ring may share, after the caller subtracted what is
not negotiable (resident weights, a speculative draft). The caller knows those from the live model
(``enable``) or from checkpoint metadata (the CLI); the split is the same.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .config import ring_bytes
from .plan import choose_resident


def _ring(prefetch: int, sizes: Sequence[int]) -> tuple[int, int]:
    """(slots, slot bytes) of the ring that streams ``sizes``: ``prefetch + 1`` slots of the largest."""
    if not sizes:
        return 0, 0
    return min(prefetch + 1, len(sizes)), max(sizes)


def split_tier(sizes: Sequence[int], prefetch: int, room: int) -> set[int]:
    """The units to keep in a tier so that the tier plus the ring the other units need fits ``room``,
    streaming as few bytes per pass as possible.

    The ring's slot is the largest streamed unit, so each candidate slot size ``s`` (each distinct unit
    size, or no ring at all) forces every larger unit into the tier; what the ring and those leave goes
    to the others (``choose_resident``, spread through the order). The candidate streaming the fewest
    bytes wins. Units are mostly of one or two sizes, so this is a handful of tries.
    """
    n = len(sizes)
    best: set[int] = set()
    best_streamed = sum(sizes) + 1
    for s in [0, *sorted(set(sizes))]:
        forced = {i for i in range(n) if sizes[i] > s}
        rest = [i for i in range(n) if sizes[i] <= s]
        ring = ring_bytes(prefetch, s, len(rest)) if rest else 0
        left = room - ring - sum(sizes[i] for i in forced)
        if left < 0:
            continue
        kept = forced | {rest[k] for k in choose_resident([sizes[i] for i in rest], left)}
        streamed = sum(sizes) - sum(sizes[i] for i in kept)
        if streamed < best_streamed:
            best, best_streamed = kept, streamed
    return best


def min_room(sizes: Sequence[int], prefetch: int) -> int:
    """The smallest room any split fits in: a ring of the smallest slot size that works, with every larger
    unit in the tier (usually: the ring of the largest unit, or every unit kept when that is less)."""
    n = len(sizes)
    best = sum(sizes)
    for s in sorted(set(sizes)):
        rest = sum(1 for b in sizes if b <= s)
        best = min(best, ring_bytes(prefetch, s, rest) + sum(b for b in sizes if b > s))
    return best if n else 0


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Where each unit (by index) lives, and the rings. Units in neither tier stream from disk."""
    unit_bytes: tuple[int, ...]
    prefetch: int
    gpu_tier: frozenset[int]
    ram_tier: frozenset[int]

    @property
    def streamed(self) -> list[int]:
        return [i for i in range(len(self.unit_bytes)) if i not in self.gpu_tier and i not in self.ram_tier]

    @property
    def host_ring(self) -> tuple[int, int]:
        """(slots, slot bytes) of the host staging ring: the units read from disk per pass."""
        return _ring(self.prefetch, [self.unit_bytes[i] for i in self.streamed])

    @property
    def device_ring(self) -> tuple[int, int]:
        """(slots, slot bytes) of a CUDA device's slot ring: every unit not in the GPU tier passes it."""
        return _ring(self.prefetch, [b for i, b in enumerate(self.unit_bytes) if i not in self.gpu_tier])

    def bytes_of(self, units: frozenset[int] | Sequence[int]) -> int:
        return sum(self.unit_bytes[i] for i in units)


def plan_memory(unit_bytes: Sequence[int], prefetch: int, *, ram_room: int | None = None,
                ram_tier: int | None = None, gpu_room: int | None = None, gpu_tier: int | None = None,
                gpu_units: Sequence[int] | None = None, on_gpu: frozenset[int] | None = None,
                ram_reserve: int = 0) -> MemoryPlan:
    """Decide the tiers for units of ``unit_bytes``.

    Args:
        ram_room: bytes for the RAM tier + the host ring together (``cpu_memory`` minus resident
            weights, or free memory minus a margin); or ``ram_tier``: the RAM tier's own size, the
            ring on top (``ram_tier=0`` streams every unit).
        gpu_room / gpu_tier: the same for the GPU tier and the device slot ring (neither: no GPU).
        gpu_units: the units that compute on that GPU (default: all).
        on_gpu: the GPU tiers already chosen (several devices: one ``plan_memory`` each), for the RAM side.
        ram_reserve: of ``ram_room``, what the RAM tier leaves before it takes units (one token's routed
            expert reads: a budget just above the minimum otherwise went to the tier, and every decode
            step was split expert by expert), where a split leaves it; where none does (units of
            different sizes near the minimum), the budget comes first and the reserve goes.
    """
    sizes = list(unit_bytes)
    gpu: set[int] = set(on_gpu or ())
    if on_gpu is None and (gpu_room is not None or gpu_tier is not None):
        idx = list(range(len(sizes))) if gpu_units is None else list(gpu_units)
        on = [sizes[i] for i in idx]
        picked = choose_resident(on, gpu_tier) if gpu_tier is not None else split_tier(on, prefetch, max(0, gpu_room or 0))
        gpu = {idx[k] for k in picked}
    host = [i for i in range(len(sizes)) if i not in gpu]
    hs = [sizes[i] for i in host]
    if ram_tier is not None:
        return MemoryPlan(tuple(sizes), prefetch, frozenset(gpu), frozenset(host[k] for k in choose_resident(hs, ram_tier)))
    room = max(0, ram_room or 0)
    mp = MemoryPlan(tuple(sizes), prefetch, frozenset(gpu),
                    frozenset(host[k] for k in split_tier(hs, prefetch, max(0, room - ram_reserve))))
    slots, slot_bytes = mp.host_ring
    if ram_reserve and mp.bytes_of(mp.ram_tier) + slots * slot_bytes > room:
        mp = MemoryPlan(tuple(sizes), prefetch, frozenset(gpu), frozenset(host[k] for k in split_tier(hs, prefetch, room)))
    return mp
