"""Where a live model's weights sit: the resident weights, the GPU tier, the RAM tier and the ring.

``place`` is the placement step of ``enable``: per device a copy engine (``_backend_for``), then at a
look-ahead depth the GPU tier (units kept on the device), the RAM tier (units read once) and the ring
the other units stream through, all decided by ``budget.plan_memory`` from what the budgets leave
after the resident weights. With ``prefetch="auto"`` each depth the budget allows is placed and its
pass predicted (``tune``); the shallowest near the best wins.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import measure as _measure
from . import tune as _tune
from .budget import MemoryPlan, _ring, min_room, plan_memory
from .config import StagingConfig
from .errors import OffloadError
from .hooks import Offloaded
from .io import Reader
from .manifest import UnitRecord
from .plan import UnitPlan, _numel
from .store import Store
from .transfer import CudaBackend
from ._memory import available_memory, format_bytes, parse_bytes

log = logging.getLogger("offload")

# Head-room left for activations, the KV cache and the allocator when the RAM tier is sized by default.
DEFAULT_MARGIN_BYTES = 1 << 30


def normalize_device(device: torch.device) -> torch.device:
    """``cuda`` as the current device's index, so units and devices compare equal."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _backend_for(device: torch.device) -> Any | None:
    """The copy engine for units computing on ``device``; None on the CPU (host buffers used in place).

    The tests replace this with a simulated GPU (``tests/simgpu.py``) to run ``CudaStager`` on a CPU.
    """
    return CudaBackend(device) if device.type == "cuda" else None


# Default GPU budget: free GPU memory minus this for activations, the KV cache, attention scores and the
# allocator. A forward that needs more gives GPU-tier units back (CudaStager: measured after each pass, and
# on an out-of-memory error inside a unit), so this is a starting point, not a promise.
GPU_MARGIN_BYTES = 2 << 30


def _gpu_tiers(model: nn.Module, plans: Sequence[UnitPlan], records: Sequence[UnitRecord], prefetch: int,
               gpu_memory: int | str | None, gpu_tier: int | str | None, backends: dict[torch.device, Any],
               kind: str, gpu_extra: int = 0) -> tuple[dict[torch.device, set[int]], dict[torch.device, int]]:
    """Per device with a copy engine, the units kept on it: what ``gpu_memory`` leaves after the resident
    weights computing there, the device slot ring and ``gpu_extra`` (the routed experts' device table)
    (too little for those is an error); and what is left beside them (the routed experts' GPU tier, as
    ``Placement.expert_room`` is on the host): ``gpu_tier`` minus the units it holds when that is given,
    else the room minus the units and the device ring; at most what free memory leaves (less the margin)."""
    tiers: dict[torch.device, set[int]] = {}
    left: dict[torch.device, int] = {}
    for dev, backend in backends.items():
        if backend is None:
            continue
        idx = [i for i, p in enumerate(plans) if p.device == dev]
        ring = min_room([records[i].data_bytes for i in idx], prefetch)
        there, coming = _resident_on(model, plans, dev, moving=kind == "module")
        free = _gpu_room(backend, None, there, coming) - gpu_extra  # free memory, read once (less a margin)
        room = free if gpu_tier is None else None
        if gpu_memory is not None:
            total = parse_bytes(gpu_memory)
            if total < there + coming + ring + gpu_extra:
                raise OffloadError(
                    f"gpu_memory={format_bytes(total)} cannot hold the resident weights on {dev} "
                    f"({format_bytes(there + coming)}) and the device slot ring ({format_bytes(ring)}"
                    + (f", with the routed experts' table {format_bytes(gpu_extra)}" if gpu_extra else "") + "): the minimum "
                    f"is {format_bytes(there + coming + ring + gpu_extra)} (or lower prefetch=)")
            room = _gpu_room(backend, gpu_memory, there, coming) - gpu_extra
        size = parse_bytes(gpu_tier) if gpu_tier is not None else None
        mp = plan_memory([r.data_bytes for r in records], prefetch, ram_tier=0, gpu_units=idx, gpu_room=room,
                         gpu_tier=size)
        tiers[dev] = set(mp.gpu_tier)
        slots, slot_bytes = _ring(prefetch, [records[i].data_bytes for i in idx if i not in mp.gpu_tier])
        taken = mp.bytes_of(mp.gpu_tier) + slots * slot_bytes
        asked = size - mp.bytes_of(mp.gpu_tier) if size is not None else (room or 0) - taken
        left[dev] = max(0, min(free - taken, asked))  # never past what is free
    return tiers, left


def blocks_fit_on_gpu(model: nn.Module, plans: Sequence[UnitPlan], records: Sequence[UnitRecord],
                      device: torch.device, kind: str, gpu_memory: int | str | None, gpu_tier: int | str | None) -> bool:
    """Whether every unit, whole, fits the GPU tier on ``device`` (a device with a copy engine): then a
    mixture of experts keeps its experts in its blocks on the GPU and reads nothing per token, where
    routed reads would copy the routed experts from host memory on every forward."""
    backend = _backend_for(device)
    if backend is None:
        return False
    blocks = sum(r.data_bytes for r in records)
    if gpu_tier is not None:
        return parse_bytes(gpu_tier) >= blocks
    there, coming = _resident_on(model, plans, device, moving=kind == "module")
    return _gpu_room(backend, gpu_memory, there, coming) >= blocks + min_room([r.data_bytes for r in records], 1)


def _gpu_room(backend: Any, gpu_memory: int | str | None, there: int, coming: int) -> int:
    """What the units may take on a device: ``gpu_memory`` minus the resident weights computing there, or
    (no budget given) its free memory minus what is still to move there and room for activations/KV cache."""
    if gpu_memory is not None:
        return parse_bytes(gpu_memory) - there - coming
    return backend.free_bytes() - coming - GPU_MARGIN_BYTES


def _resident_tensors(model: nn.Module, plans: Sequence[UnitPlan]) -> list[torch.Tensor]:
    """The model's weights that do not stream (parameters and buffers with storage), each once."""
    streamed = {id(t.owner._parameters.get(t.attr)) for p in plans for t in p.tensors if t.is_param}
    seen: set[int] = set()
    out = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in streamed or id(t) in seen or t.device.type == "meta" or isinstance(t, Offloaded):
            continue
        seen.add(id(t))
        out.append(t)
    return out


def _resident_on(model: nn.Module, plans: Sequence[UnitPlan], dev: torch.device, moving: bool) -> tuple[int, int]:
    """Bytes of the weights that are not streamed and compute on ``dev``: (already there, still to move).

    A plain module's resident weights all move to where its units compute; an Accelerate-dispatched
    model's stay where its device map put them."""
    there = coming = 0
    for t in _resident_tensors(model, plans):
        n = t.numel() * t.element_size()
        if t.device == dev:
            there += n
        elif moving:
            coming += n
    return there, coming


@dataclasses.dataclass
class Placement:
    """Where each unit's bytes live at the chosen depth, and what that depth was predicted to cost."""
    prefetch: int  # the look-ahead depth
    plan: MemoryPlan  # the RAM tier, the GPU tiers (``on_gpu``), what streams, the host ring
    config: StagingConfig  # the ring's size, from ``plan``
    backends: dict[torch.device, Any]  # the copy engine per device (None: host buffers used in place)
    gpu_tiers: dict[torch.device, set[int]]  # per device with a copy engine, the units kept there
    gpu_left: dict[torch.device, int]  # per such device, what its GPU tier and device ring leave (routed experts')
    elsewhere: set[int]  # the units in a GPU tier: never read into the host ring
    room: int | None  # what the RAM tier and the host ring share (None: the RAM tier's size was given)
    tier_size: int | None  # the RAM tier's size when given (``ram_tier=``)
    prediction: _tune.Prediction | None  # what a decode pass at batch 1 should cost (None: nothing to predict from)
    tuning: dict[str, Any]  # what a prediction at another batch size needs (``Handle.predict``)

    @property
    def expert_room(self) -> int:
        """What the RAM tier and the ring leave (the expert cache's budget; may be negative)."""
        tier = self.plan.bytes_of(self.plan.ram_tier)
        return (self.tier_size - tier if self.tier_size is not None else
                self.room - tier - self.config.ring_bytes if self.room is not None else 0)


def place(model: nn.Module, kind: str, st: Store, plans: Sequence[UnitPlan], records: Sequence[UnitRecord],
          streaming: Sequence[UnitPlan], devices: Sequence[torch.device], reader: Reader, prefetch: int | str, *,
          io_threads: int, cpu_memory: int | None, ram_tier: int | None, gpu_memory: int | str | None,
          gpu_tier: int | str | None, tune: bool, progress: bool, gpu_extra: int = 0, host_extra: int = 0
          ) -> Placement:
    """The tiers, the ring and its depth for the units ``plans`` (``records`` in the store ``st``);
    ``streaming`` is every plan whose weights are not resident (the units and the routed experts).
    ``cpu_memory`` and ``ram_tier`` are in bytes; ``gpu_memory`` and ``gpu_tier`` as ``enable`` takes them.
    ``host_extra``: what the RAM tier leaves for one forward's routed expert reads (``plan_memory``'s
    ``ram_reserve``)."""
    backends = {dev: _backend_for(dev) for dev in devices}
    sizes = [r.data_bytes for r in records]
    done: dict[int, tuple[dict[torch.device, set[int]], set[int], int | None, int | None, MemoryPlan]] = {}

    def placed(depth: int) -> tuple[dict[torch.device, set[int]], set[int], int | None, int | None, MemoryPlan,
                                    dict[torch.device, int]]:
        """The tiers at look-ahead ``depth``: GPU tier (per device with a copy engine: units kept on
        the device, read once), then the RAM tier (units read once; the streamed weights about to be
        freed count as free). A deeper ring leaves less for both. Each depth is placed once: the plan
        chosen is the plan that was evaluated (free memory is read once per depth, not again)."""
        if depth not in done:
            tiers, left = _gpu_tiers(model, plans, records, depth, gpu_memory, gpu_tier, backends, kind, gpu_extra)
            elsewhere = set().union(*tiers.values()) if tiers else set()
            room, tier_size = _ram_room(model, streaming, kind, depth, [sizes[i] for i in range(len(sizes))
                                                                        if i not in elsewhere], cpu_memory, ram_tier)
            done[depth] = tiers, elsewhere, room, tier_size, plan_memory(
                sizes, depth, ram_room=room, ram_tier=tier_size, on_gpu=frozenset(elsewhere),
                ram_reserve=host_extra), left
        return done[depth]

    # The shallowest ring that will be tried first: a budget too small for it is refused here, naming the
    # minimum at that depth; and if every unit fits the tiers there is no disk to plan for.
    streams = bool(placed(1 if prefetch == "auto" else prefetch)[4].streamed)
    tuning = _tuning_inputs(st, records, reader, devices, model, plans, measure=tune and prefetch == "auto" and streams,
                            progress=progress, streams=streams, routed=len(streaming) > len(plans))
    if prefetch == "auto":
        prefetch, prediction = _auto_depth(placed, tuning)
    else:
        prediction = None
    assert isinstance(prefetch, int)
    tiers, elsewhere, room, tier_size, mp, left = placed(prefetch)
    tuning.update(prefetch=prefetch, plan=mp)
    if prediction is None and tuning.get("disk") is not None:  # a depth given: predicted all the same
        prediction = _tune.predict_plan(tuning, 1, None)
    slots, slot_bytes = mp.host_ring
    config = StagingConfig(prefetch, slot_bytes, len(mp.streamed), io_threads)
    assert room is None or mp.bytes_of(mp.ram_tier) + config.ring_bytes <= room or not mp.ram_tier
    return Placement(prefetch, mp, config, backends, tiers, left, elsewhere, room, tier_size, prediction, tuning)


def _tuning_inputs(st: Store, records: Sequence[UnitRecord], reader: Reader, devices: Sequence[torch.device],
                   model: nn.Module, plans: Sequence[UnitPlan], *, measure: bool, progress: bool,
                   streams: bool = True, routed: bool = False) -> dict[str, Any]:
    """What ``tune`` needs to predict this model's passes: the disk profile (cached, or measured now when
    ``measure`` and the units stream enough bytes for it to matter), the units' byte ranges and sizes,
    the compute's kind and where it runs. ``streams``: whether any unit is read per pass at all (not
    when every unit fits the tiers); ``routed``: routed experts are read as routed besides."""
    reads = [[(st.path_of(r, e.file), e.offset, e.length) for e in r.reads] for r in records if r.reads]
    q = st.quantization
    kind = q["scheme"] if q else str(st.dtype or torch.float32).replace("torch.", "")
    resident = sum(t.numel() * t.element_size() for t in _resident_tensors(model, plans))
    out: dict[str, Any] = {"sizes": [r.data_bytes for r in records], "kind": kind, "resident_bytes": resident,
                           "device": devices[0].type, "store_id": _tune.store_id(st, records), "disk": None}
    _measure.use_profile(reader, None)  # direct unless this model's profile says so (the reader may come from another)
    if not reads or sum(out["sizes"]) < _tune.MIN_STREAMED_BYTES:
        out["why"] = (f"the units total {format_bytes(sum(out['sizes']))} (< {format_bytes(_tune.MIN_STREAMED_BYTES)}): "
                      f"too little for the depth to matter")
        return out
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else log.info  # noqa: E731
    try:
        out["disk"] = _measure.disk_profile(reads, reader, measure=measure, say=say)
    except OSError as e:  # measuring is an optimisation: a disk that cannot be measured plans as before
        log.warning("offload: could not measure the disk (%s); prefetch=%d", e, _tune.DEFAULT_PREFETCH)
        out["why"] = f"the disk could not be measured ({e})"
    if out["disk"] is None and "why" not in out and not streams:
        out["why"] = ("every block fits in memory under this budget (only the routed experts are read, as routed): "
                      "there is no depth to plan and the disk was not measured" if routed else
                      "every unit fits in memory under this budget: nothing is read per pass, so there is no depth "
                      "to plan and the disk was not measured")
    if out["disk"] is None and "why" not in out:
        out["why"] = ("this disk was never measured (`offload tune MODEL` measures it; prefetch='auto' does when "
                      "units stream)")
    if out["disk"] is not None and devices[0].type == "cuda":
        out["h2d_bps"] = _measure.h2d_rate(devices[0])
    return out


def _auto_depth(placed: Callable[[int], Any], tuning: dict[str, Any]) -> tuple[int, _tune.Prediction | None]:
    """The look-ahead depth for ``prefetch="auto"``: each depth the budget allows is placed (tiers and
    ring) and its pass predicted; ``tune.choose_prefetch`` takes the shallowest near the best. Depth 1
    was placed before this is called (it fits the budget, else that raised)."""
    def fits(depth: int) -> MemoryPlan | None:
        """The plan at ``depth``, or None when its ring is past the budget: an explicit ``cpu_memory`` too
        small raises in ``placed``; the default budget (free memory, a container's limit included) never
        does, so its room is checked here (depth 1 always goes: the least any run needs)."""
        try:
            _, _, room, _, mp, _ = placed(depth)
        except OffloadError:
            return None
        slots, slot_bytes = mp.host_ring
        return mp if depth == 1 or room is None or slots * slot_bytes <= room else None

    if tuning.get("disk") is None:  # nothing measured: the default depth, or the deepest below it the budget fits
        for depth in range(_tune.DEFAULT_PREFETCH, 1, -1):
            if fits(depth) is not None:
                return depth, None
        return 1, None
    candidates = []
    for depth in range(1, _tune.MAX_CONCURRENCY + 1):
        mp = fits(depth)
        if mp is None:  # this ring does not fit the budget: deeper ones will not either
            break
        candidates.append((depth, mp))
    best = _tune.choose_plan(tuning, candidates, batch=1)
    return best.prefetch, best


def _ram_room(model: nn.Module, plans: Sequence[UnitPlan], kind: str, prefetch: int, host_sizes: Sequence[int],
              total: int | None, tier: int | None) -> tuple[int | None, int | None]:
    """``(room, tier)`` for ``plan_memory``: the RAM tier's own size when given (``ram_tier=``), else the
    room the RAM tier and the host ring share: ``cpu_memory`` minus the resident weights, or free
    memory (the weights about to be freed count as free) minus a margin."""
    if tier is not None:
        return None, tier
    resident = sum(t.numel() * t.element_size() for t in _resident_tensors(model, plans) if t.device.type == "cpu")
    if total is not None:
        need = min_room(host_sizes, prefetch)
        if total < resident + need:
            raise OffloadError(
                f"cpu_memory={format_bytes(total)} cannot hold the resident weights ({format_bytes(resident)}) and "
                f"the staging ring ({min(prefetch + 1, len(host_sizes))} slots; with the units too large for its "
                f"slots in the RAM tier, {format_bytes(need)}): the minimum is {resident + need} bytes "
                f"({format_bytes(resident + need)}; or lower prefetch=)")
        return total - resident, None
    freed = sum(_numel(t.shape) * t.dtype.itemsize for p in plans for t in p.tensors
                if kind == "module" and t.is_param and t.owner._parameters[t.attr].device.type == "cpu")
    return max(0, available_memory() + freed - DEFAULT_MARGIN_BYTES), None


def move_resident(model: nn.Module, device: torch.device) -> None:
    """A plain module's weights that do not stream, moved to ``device`` (where its units compute)."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and not isinstance(p, Offloaded) and p.device.type != "meta" and p.device != device:
                p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None and not isinstance(b, Offloaded) and b.device.type != "meta" and b.device != device:
                m._buffers[name] = b.to(device)
