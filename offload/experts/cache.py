"""Which read experts stay in memory within a byte budget, and in which order they go (the policies), and
``replay``, which runs a policy over a recorded routing trace to compare them."""
from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any


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
        self.split_forwards = 0  # forwards that routed more than the experts' memory holds, computed in groups
        self.read_seconds = 0.0  # wall time of the routed (demand) reads, batch by batch (first start to last end)
        self.read_bytes = 0  # the bytes those reads brought in
        self.predicted_bytes = 0  # read ahead for the next layer (its router on this layer's hidden state)
        self.predicted_used_bytes = 0  # of those, the experts the next layer did route to
        self.predicted: set[Key] = set()  # predicted since the last reset, not routed yet (used bytes count these)
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Counters back to 0 (``Handle.reset_stats``); what the cache holds stays."""
        self.hits = self.misses = self.bytes_read = self.predicted_bytes = self.predicted_used_bytes = 0
        self.predicted = set()
        self.evictions = self.read_bytes = self.split_forwards = 0
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

    def discard(self, key: Key) -> None:
        """``key`` no longer cached, if it was (call under ``lock``); whoever holds its bytes frees them."""
        if key in self.sizes:
            self.used -= self.sizes.pop(key)
            self.policy.remove(key)

    def evict(self, tables: dict[int, Any], in_use: set[Key], room: int = 0) -> list[Key]:
        """Drop unpinned experts in the policy's order until the cache is within its budget less ``room``
        (bytes about to be read: ``ExpertsStager.want`` makes room before a large batch); returns them."""
        out: list[Key] = []
        with self.lock:
            if self.used + room <= self.budget:
                return out
            for key in self.policy.order():
                if self.used + room <= self.budget:
                    break
                if key in in_use:
                    continue
                self.discard(key)
                tables[key[0]].drop(key[1])
                out.append(key)
            self.evictions += len(out)
        return out


def split(experts: Sequence[int], expert_bytes: int, room: int) -> list[list[int]]:
    """``experts`` (one forward's routed experts, ascending) in consecutive groups of at most ``room`` bytes
    (at least one expert each); one group when they all fit. A forward that routes more than the experts'
    memory holds is computed group by group (``ExpertsHook``), each expert read once."""
    per = max(1, room // expert_bytes) if expert_bytes > 0 else len(experts)
    experts = list(experts)
    if len(experts) <= per:
        return [experts]
    return [experts[i:i + per] for i in range(0, len(experts), per)]


def replay(trace: Sequence[tuple[int, Sequence[int]]], budget: int, expert_bytes: int | dict[int, int],
           policy: str | None = None, read_room: int | None = None) -> tuple[int, int, list[Key]]:
    """Hits, misses and the evicted keys in order of an ``ExpertCache`` of ``budget`` bytes and ``policy``
    over a routing trace (``(group, routed experts)`` per experts forward, in forward order), as
    ``ExpertsStager.want`` and ``done`` drive it without prediction: the routed experts found cached are
    hits, the others are read and admitted, then, the forward done (its experts no longer in use), the
    cache evicts down to its budget. With ``read_room`` (the stager's), as the stager bounds memory too: a
    forward routing more than ``budget + read_room`` is taken in groups (``split``), and before a group
    reads more than ``read_room`` the cache makes room for it. Fast and deterministic: for comparing
    policies on recorded traces."""
    cache = ExpertCache(budget, policy)
    size = (lambda k: expert_bytes) if isinstance(expert_bytes, int) else expert_bytes.__getitem__

    class _NoTable:
        def drop(self, e: int) -> None:
            pass
    tables: dict[int, Any] = collections.defaultdict(_NoTable)
    evicted: list[Key] = []
    for k, routed in trace:
        routed = list(dict.fromkeys(routed))
        groups = [routed] if read_room is None else split(routed, size(k), budget + read_room)
        for group in groups:
            with cache.lock:
                missing = []
                for e in group:
                    if (k, e) in cache.sizes:
                        cache.hit((k, e))
                    else:
                        missing.append(e)
                cache.misses += len(missing)
            if read_room is not None:
                evicted += cache.evict(tables, {(k, e) for e in group}, room=len(missing) * size(k) - read_room)
            with cache.lock:
                for e in missing:
                    cache.admit((k, e), size(k))
            evicted += cache.evict(tables, set())
    return cache.hits, cache.misses, evicted
