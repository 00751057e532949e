"""Routed experts: read only the experts a mixture-of-experts layer's router picks.

A Transformers 5 experts module holds every expert's weights as 3-D tensors (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I], GPT-OSS's biases [E, ...]) and receives the router's choice
before it computes: ``experts(hidden_states, top_k_index, top_k_weights)``. Its forward only indexes
the experts in ``top_k_index``. So, generically (no per-architecture code):

* the block's unit streams without the experts' tensors (``carve``: the unit's extents recomputed for
  what is left, ``ranges.plan_extents``);
* each experts module gets a *table*: one zero-filled anonymous mapping holding its tensors at full
  shape, of which only the experts read so far are backed by memory. Expert ``e`` of a tensor is the
  contiguous slice ``[e]``, so its bytes are one range of the store's unit file, or the pieces of the
  checkpoint's per-expert tensors (read in place), read straight into that slice;
* a forward pre-hook reads the routed experts that are not in the table (all at once, on the
  prefetcher's reader threads, ahead of queued prefetches), then binds the tables; the experts the
  forward does not route to are never read, and it never reads them (their pages stay unbacked);
* ``ExpertCache`` keeps read experts within a byte budget, least recently used evicted first (pages
  given back with ``MADV_DONTNEED``); with a budget of 0 a forward's experts are dropped after it.

Each expert is read through the prefetcher as a small unit of its own (``UnitRecord`` with extents),
so its checksum is recorded on the first read and checked on later ones, and its bytes count in
``stats().bytes_read``. Prefill reads each routed expert once per forward whatever the prompt length.
A module this cannot serve (quantized units, CUDA devices for now) streams with its block, with one
log line saying why.
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
from .staging import HostBuffer
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


def _widened(file: str, offset: int, n: int, into: int, size: int) -> list[Extent]:
    """Read ``n`` bytes at ``offset`` into ``into`` as whole pages (O_DIRECT, ``ranges.page_reads``): the
    page before and after land in the bytes around ``into``, which hold the same file bytes (a
    neighbouring expert) or room left for them. ``into`` and ``offset`` share their offset within a page."""
    start = page_down(offset)
    return page_reads(file, start, page_up(offset + n), size, into - (offset - start))


@dataclasses.dataclass
class ExpertsGroup:
    """One experts module: its table, the record of all its experts (a stray use reads them all) and
    one record per expert (what a routed read reads)."""
    name: str
    module: nn.Module
    count: int
    tensors: list[StreamedTensor]
    table: UnitRecord  # tensors at their table offsets; extents: every expert (disable's restore, stray uses)
    experts: list[UnitRecord]  # expert e's slices of every tensor, read into the table
    slices: list[tuple[int, int]]  # per tensor: (table offset, bytes of one expert)
    router: torch.Tensor | None = None  # a resident copy of the block's router weight [E, H], for prediction

    @property
    def expert_bytes(self) -> int:
        return sum(n for _, n in self.slices)


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
        layout, at, per_expert, whole = [], 0, [], []
        for t in tensors:
            r = by_name[t.rel]
            ranges = _merged(_file_ranges(rec, r, 0, r.nbytes))
            # One range in the file: place the tensor in the table at the file's offset within a page, with
            # a page of room each side, so each expert's slice is read O_DIRECT, widened to whole pages.
            at = page_up(at) + PAGE + (ranges[0][1] % PAGE if len(ranges) == 1 else 0)
            layout.append(TensorRecord(r.name, r.dtype, r.shape, at, r.nbytes))
            per_expert.append((at, r.nbytes // count))
            whole.append(ranges[0] if len(ranges) == 1 else None)
            at += r.nbytes + PAGE
        experts = []
        for e in range(count):
            reads = []
            for t, (offset, n), one in zip(tensors, per_expert, whole):
                into = offset + e * n
                if one is not None:
                    reads += _widened(one[0], one[1] + e * n, n, into, sizes[one[0]])
                    continue
                for f, o, k in _file_ranges(rec, by_name[t.rel], e * n, (e + 1) * n):
                    reads.append(Extent(f, o, k, into))
                    into += k
            experts.append(UnitRecord(f"{plan.name}.{name}[{e}]", reads[0].file, 0, 0, at, None, (), None, (),
                                      tuple(reads)))  # type: ignore[arg-type]
        table = UnitRecord(f"{plan.name}.{name}", experts[0].file, 0, 0, at, None, tuple(layout), None, (),
                           tuple(x for ex in experts for x in ex.extents))  # type: ignore[arg-type]
        router = next((by_name[t.rel] for t in plan.tensors if t.is_param and id(t.owner) != key
                       and len(t.shape) == 2 and t.shape[0] == count and t.rel in by_name), None)
        weight = store.read_tensor(rec, router.name) if router is not None else None
        out.append(ExpertsGroup(f"{plan.name}.{name}", module, count, tensors, table, experts, per_expert, weight))
    left = {t.rel for t in rest}
    kept = [SourceTensor(r.name, r.dtype, r.shape, tuple(_file_ranges(rec, r, 0, r.nbytes)))
            for r in rec.tensors if r.name in left]
    dense = plan_unit(rec.name, kept, sizes, streamed=False)
    assert dense is not None
    return dataclasses.replace(plan, tensors=rest), dense, out


class ExpertCache:
    """Which experts are in the tables, within ``budget`` bytes; the least recently used go first.

    Experts a forward is using are pinned until its ``done``. Eviction gives the pages back
    (``MADV_DONTNEED`` on the whole pages of each slice), so resident memory follows the budget.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.lru: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()  # (group, e) -> bytes
        self.used = 0
        self.hits = self.misses = 0
        self.bytes_read = 0
        self.predicted_bytes = 0  # read ahead for the next layer (its router on this layer's hidden state)
        self.predicted_used_bytes = 0  # of those, the experts the next layer did route to
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Counters back to 0 (``Handle.reset_stats``); what the cache holds stays."""
        self.hits = self.misses = self.bytes_read = self.predicted_bytes = self.predicted_used_bytes = 0

    def evict(self, tables: dict[int, ExpertsTable], pinned: set[tuple[int, int]]) -> None:
        with self.lock:
            for key in [k for k in self.lru if k not in pinned]:
                if self.used <= self.budget:
                    break
                self.used -= self.lru.pop(key)
                tables[key[0]].drop(key[1])


class ExpertsTable:
    """The table of one experts module and which experts it holds."""

    def __init__(self, group: ExpertsGroup):
        self.group = group
        self.buffer = HostBuffer(group.table.data_bytes, huge=False)
        self.present: set[int] = set()

    def drop(self, e: int) -> None:
        self.present.discard(e)
        mm = self.buffer._mm
        if mm is None:
            return
        for offset, n in self.group.slices:  # whole pages inside the slice only (neighbours share the edges)
            a, b = page_up(offset + e * n), page_down(offset + (e + 1) * n)
            if b > a:
                mm.madvise(mmap.MADV_DONTNEED, self.buffer._pad + a, b - a)


class ExpertsStager:
    """``stage``/``done`` for experts modules, like a unit's stager: the routed experts read, the table bound."""

    host_buffers_only = True  # the tables live as long as the handle

    def __init__(self, prefetcher: Any, groups: Sequence[ExpertsGroup], cache: ExpertCache):
        self.prefetcher, self.cache = prefetcher, cache
        self.tables = {k: ExpertsTable(g) for k, g in enumerate(groups)}
        self.pinned: set[tuple[int, int]] = set()
        self.inflight: dict[tuple[int, int], Any] = {}  # predicted reads not yet wanted
        self.predict_ahead = True

    def want(self, k: int, experts: Sequence[int]) -> None:
        """Experts ``experts`` of group ``k`` in its table: cached, predicted (wait for that read), or read now."""
        table = self.tables[k]
        eb = table.group.expert_bytes
        missing, waits = [], []
        with self.cache.lock:
            for e in experts:
                self.pinned.add((k, e))
                if e in table.present:
                    self.cache.hits += 1
                    self.cache.lru.move_to_end((k, e))
                elif (k, e) in self.inflight:
                    waits.append(e)
                    self.cache.hits += 1
                    self.cache.predicted_used_bytes += eb
                else:
                    missing.append(e)
            self.cache.misses += len(missing)
        loads = [self.inflight.pop((k, e)) for e in waits]
        loads += self.prefetcher.start_reads([(table.group.experts[e], table.buffer) for e in missing])
        self.prefetcher.finish_reads(loads)
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
                self.cache.lru[(k, e)] = eb
                self.cache.used += eb
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
        return self.tables[k].buffer.tensor

    def done(self, k: int) -> None:
        self.pinned = {p for p in self.pinned if p[0] != k}
        self.cache.evict(self.tables, self.pinned)

    def close(self) -> None:
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
