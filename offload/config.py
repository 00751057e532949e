"""The staging settings, fixed at ``enable`` time and shared read-only by the ring, schedule and stagers.

The ring's size is derived here and nowhere else: ``ring_slots × slot_bytes`` on the host, and the
same on each CUDA device, is the whole staging memory, known before the first token.
"""
from __future__ import annotations

import dataclasses
import os

# How long a lease may wait on a staging buffer still read by an unfinished copy before the wait is
# reported as an error (a copy that never completes is a device fault, not a slow disk).
DEFAULT_FENCE_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class StagingConfig:
    """What sizes the staging memory: look-ahead depth and the largest streamed unit."""
    prefetch: int  # units read ahead of the one computing
    slot_bytes: int  # the largest streamed unit's data section: every slot can hold any unit
    streamed_units: int  # units that stream (not in the RAM or GPU tier)
    io_threads: int = 8
    fence_timeout_s: float = DEFAULT_FENCE_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or self.prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1, got {self.prefetch!r}")
        if not isinstance(self.io_threads, int) or isinstance(self.io_threads, bool) or self.io_threads < 1:
            raise ValueError(f"io_threads must be an integer >= 1, got {self.io_threads!r}")

    @property
    def ring_slots(self) -> int:
        """``prefetch + 1``: one slot computing, ``prefetch`` being read; never more than there are units."""
        return min(self.prefetch + 1, self.streamed_units)

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.slot_bytes


def ring_bytes(prefetch: int, largest_unit: int, streamed_units: int | None = None) -> int:
    """Staging memory for a plan not built yet (CLI budgets, plan tables): one formula, here."""
    return StagingConfig(prefetch, largest_unit, prefetch + 1 if streamed_units is None else streamed_units).ring_bytes


def cache_dir() -> str:
    root = os.environ.get("OFFLOAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "offload")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        from .errors import OffloadError
        raise OffloadError(f"cannot make the cache folder {root} ({e.strerror or e}): set OFFLOAD_CACHE to a "
                           f"writable folder") from None
    return root
