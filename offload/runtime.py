"""``offload.enable`` and ``offload.load``: wiring only.

enable, in named steps: plan the units (what streams, where it computes: ``plan``) → the store
(reused after checks, or written: ``model_store``) → the resident weights of a model built on meta,
loaded from the store, and tensors shared by units kept resident (``install``) → place the units in the GPU
tier, the RAM tier or the ring, at the chosen depth (``placement``) → build the prefetcher (ring, RAM
tier, reader threads), a stager per device (CPU in place, CUDA slots) and the hooks → point of no
return: free the streamed weights and install the hooks. A failure before that point undoes what was
built (``_Built.undo``); after it, ``Handle.disable`` (``handle.py``) undoes it all in the reverse
order and gives a plain module its weights back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import tune as _tune
from .config import StagingConfig
from .convert import quantization_of
from .errors import OffloadError, StoreError, StoreMismatchError
from .experts import (DeviceTable, DeviceTier, ExpertBinding, ExpertCache, ExpertsGroup, ExpertsHook, ExpertsStager,
                      carve, experts_modules, reads_per_forward)
from .handle import Handle
from .hooks import BoundUnits, Offloaded, UnitHook
from .install import bindings, load_resident_from_store, keep_shared, silence_inner_accelerate_hooks, unload_resident
from .io import Reader, get_reader
from .manifest import MANIFEST, UnitRecord
from .meta import build_on_meta
from .model_store import open_store, source_fingerprint, store_folder
from .placement import Placement, blocks_fit_on_gpu, move_resident, normalize_device, place
from .plan import UnitPlan, find_units, is_accelerate_offloaded, plan_accelerate, plan_plain
from .prefetch import Prefetcher
from .staging import HostBuffer
from .store import Store
from .trace import Tracer
from .transfer import CpuStager, CudaStager, Stager
from ._memory import format_bytes, parse_bytes

log = logging.getLogger("offload")

Replaced = list[tuple[nn.Module, str, bool, torch.Tensor]]  # (module, attribute, is a parameter, what it held)


def enable(model: nn.Module, prefetch: int | str = "auto", store: str | os.PathLike[str] | None = None,
           device: str | torch.device | None = None, *, cpu_memory: int | str | None = None,
           ram_tier: int | str | None = None, gpu_memory: int | str | None = None,
           gpu_tier: int | str | None = None, units: Sequence[str] | None = None, reader: str | Reader | None = None, io_threads: int = 8,
           verify: bool = True, trace: str | os.PathLike[str] | None = None, quantize: str | None = None,
           group_size: int | None = None, progress: bool = True, routed_experts: bool = True,
           predict_experts: bool = False, tune: bool = True) -> Handle:
    """Stream a model's blocks from disk, prefetching the next ``prefetch`` blocks while one computes.

    Args:
        model: a model dispatched by Accelerate/Transformers with blocks on ``"disk"`` (its offload
            hooks are taken over), any ``nn.Module`` (its repeated blocks are streamed), or a model
            built on the meta device (``init_empty_weights``) with ``store=``: its resident weights
            (embeddings, norms, head) are loaded from the store, its blocks streamed.
        prefetch: how many units are read ahead. Staging memory is ``(prefetch + 1) × largest unit``.
            ``"auto"`` (the default) picks the shallowest depth whose predicted seconds per pass are
            within 3% of the best the memory budget allows, from this disk's measured read rate
            (measured once per disk, reader and unit size, a few seconds, cached) and the units'
            compute (measured in earlier runs of this store, else estimated); a model streaming less
            than 64 MiB per pass gets 2 without measuring. ``handle.prediction`` says what it predicted.
        store: the folder of per-unit files. Default: ``offload-store`` inside Accelerate's offload
            folder, else a temporary folder removed by ``disable``. An existing store is validated
            against the model and reused; a mismatch is an error, never a silent rewrite.
        device: where the units compute (default: Accelerate's execution device, else the model's).
        cpu_memory: RAM for weights, bytes or ``"8GiB"``: resident weights + staging ring + RAM tier
            (the same meaning as ``offload run --cpu-memory``). What is left after the resident
            weights and the ring holds a RAM tier of units read once; the rest stream. Too small for
            resident + ring is an error naming the minimum.
        ram_tier: instead of ``cpu_memory``, the RAM tier's size itself; ``0`` streams every unit.
            Default (neither given): free memory (the container limit included) minus 1 GiB.
        gpu_memory: CUDA only: memory of each GPU for weights: the resident weights computing there +
            the device slot ring + a GPU tier of units copied once and kept (the same meaning as
            ``cpu_memory`` on the host). Too small for resident + ring is an error naming the minimum.
            Default: a GPU tier as large as free GPU memory minus 2 GiB allows.
        gpu_tier: instead of ``gpu_memory``, the GPU tier's size itself; ``0`` streams every unit
            through the device slot ring.
        units: names of the modules to stream (plain modules only; default: the repeated blocks).
        reader: ``"native"``, ``"python"``, ``"mmap"``, or a reader object (default: fastest available).
        io_threads: reader threads (the python reader's queue depth), alive until ``disable``.
        verify: check each unit's CRC32 the first time it is read (on the reader thread), so a
            damaged file is an error naming it rather than wrong outputs.
        trace: write a Chrome/Perfetto trace of reads, copies, forwards and waits to this file when
            the handle is disabled (``Handle.write_trace`` writes one at any time).
        quantize: ``"int8"`` or ``"int4"``: stream the units' linear weights quantized (``group_size``
            for int4: 32, 64 or 128; default 64). The store must hold that quantization (a new store
            is written so); a store of another kind is refused. ``offload.load`` takes it from the store.
        routed_experts: in a mixture-of-experts block, read only the experts its router picks, into an
            expert cache within ``cpu_memory`` (what the RAM tier and the ring leave); ``False`` streams
            whole blocks, every expert included.
        predict_experts: while a layer's experts compute, start reading the experts the next layer's
            router picks for this layer's input (a guess: ``stats()`` reports predicted and used bytes).
            Off by default: on the random-weight models measured here (README, Mixtures of experts) only
            41% of the predicted bytes were used and it slowed decoding; measure it on a trained model.
        tune: with ``prefetch="auto"``, measure the disk when no measurement is cached; ``False`` uses a
            cached one or else depth 2 (``offload run --no-tune``).

    Returns:
        A :class:`Handle` (``stats()``, ``disable()``, context manager).

    Example:
        >>> with offload.enable(model, prefetch=2, ram_tier=0) as h:
        ...     model.generate(**inputs, max_new_tokens=16)
        ...     print(h.stats())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"offload.enable expects an nn.Module, got {type(model).__name__}")
    old = getattr(model, "_offload_handle", None)
    if old is not None and not old.closed:
        raise OffloadError("offload is already enabled on this model: call offload.disable(model) first")
    shared = next((n for n, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                model.named_buffers(remove_duplicate=False))
                   if isinstance(t, Offloaded)), None)
    if shared is not None:  # a module shared with a model offload streams: its weights are that model's stand-ins
        raise OffloadError(f"{shared} is streamed by another model that offload has enabled (this model shares its "
                           f"module): disable that model first, or enable one model that holds both")
    if isinstance(prefetch, str) and prefetch != "auto":
        raise ValueError(f"prefetch must be an integer >= 1 or 'auto', got {prefetch!r}")
    StagingConfig(_tune.DEFAULT_PREFETCH if prefetch == "auto" else prefetch, 1, 1, io_threads)  # validated before any work
    if cpu_memory is not None and ram_tier is not None:
        raise ValueError("pass cpu_memory= (all RAM for weights) or ram_tier= (the RAM tier alone), not both")
    if gpu_memory is not None and gpu_tier is not None:
        raise ValueError("pass gpu_memory= (all GPU memory for weights) or gpu_tier= (the GPU tier alone), not both")
    quantization = quantization_of(quantize, group_size or 64) if quantize is not None else None
    rd = reader if (reader is not None and not isinstance(reader, str)) else get_reader(reader)
    total_budget = parse_bytes(cpu_memory) if cpu_memory is not None else None
    tier_budget = parse_bytes(ram_tier) if ram_tier is not None else None

    kind, plans_all, plans, devices = _plan_units(model, device, units)  # 1. what streams, where it computes
    fp = source_fingerprint(plans, kind)
    path, temp_store = store_folder(model, store, kind, fp)
    built = _Built(path, temp_store, Tracer() if trace is not None else None)
    try:  # until the point of no return, a failure undoes everything it did (the model is as it was)
        st, quantization = open_store(path, model, plans, kind, fp, quantization, group_size,  # 2. the store
                                      progress=progress)
        built.loaded = load_resident_from_store(model, plans, st, devices[0], verify) if kind == "module" else []
        keep_shared(plans_all, built.shared)
        records = [st.by_name[p.name] for p in plans]
        fits = blocks_fit_on_gpu(model, plans, records, devices[0], kind, gpu_memory, gpu_tier) if routed_experts else False
        plans, records, groups = _carve_experts(st, plans, records, routed_experts, quantization, devices, fits)
        streaming = plans + [UnitPlan(g.name, g.module, g.tensors, devices[0]) for g in groups]  # not resident
        config = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config  # a multimodal model's
        top_k = getattr(config, "num_experts_per_tok", None)
        placement = place(model, kind, st, plans, records, streaming, devices, rd, prefetch,  # 3. tiers, ring, depth
                          io_threads=io_threads, cpu_memory=total_budget, ram_tier=tier_budget,
                          gpu_memory=gpu_memory, gpu_tier=gpu_tier, tune=tune, progress=progress,
                          gpu_extra=_experts_on_device(groups),
                          host_extra=reads_per_forward(top_k, [g.expert_bytes for g in groups]) if groups else 0)
        _build(built, st, plans, records, groups, devices, placement, rd, verify=verify, progress=progress,
               predict_experts=predict_experts, top_k=top_k)  # 4. prefetcher, stagers, hooks
    except BaseException:
        built.undo()
        raise
    return _install(model, built, st, kind, plans_all, plans, devices, placement, rd, trace)  # 5. no return


@dataclasses.dataclass
class _Built:
    """What ``enable`` made before its point of no return, each part kept as soon as it exists, so that
    ``undo`` can take it all back after a failure at any step (the model is then as it was)."""
    store_path: str
    temp_store: bool  # the store was made for this handle: removed by undo and by disable
    tracer: Tracer | None
    loaded: Replaced = dataclasses.field(default_factory=list)  # resident weights loaded from the store
    shared: Replaced = dataclasses.field(default_factory=list)  # tensors shared by units, read once
    prefetcher: Prefetcher | None = None
    stagers: dict[torch.device, Stager] = dataclasses.field(default_factory=dict)
    estager: ExpertsStager | None = None  # the stager of the routed experts
    hooks: list[UnitHook] = dataclasses.field(default_factory=list)  # built, not registered yet
    restore: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # the user's Parameters, by binding

    def undo(self) -> None:
        for stager in list(self.stagers.values()) + ([self.estager] if self.estager is not None else []):
            with contextlib.suppress(Exception):
                stager.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
        unload_resident(self.loaded + self.shared)
        if self.temp_store:
            shutil.rmtree(self.store_path, ignore_errors=True)


def _plan_units(model: nn.Module, device: str | torch.device | None, units: Sequence[str] | None
                ) -> tuple[str, list[UnitPlan], list[UnitPlan], list[torch.device]]:
    """Step 1: the units. ``(kind, every unit's plan, the plans with tensors to stream, their devices)``;
    ``kind`` is ``"accelerate"`` (its offload hooks are taken over) or ``"module"``."""
    if is_accelerate_offloaded(model):
        if units is not None:
            raise ValueError("units= applies to plain modules; Accelerate's device_map decides the units here")
        plans = plan_accelerate(model)
        kind = "accelerate"
    else:
        dev = torch.device(device) if device is not None else _module_device(model)
        plans = plan_plain(model, find_units(model, units), dev)
        kind = "module"
    plans_all, plans = plans, [p for p in plans if p.tensors]
    if not plans:
        raise OffloadError("nothing to stream: the chosen units have no parameters of their own (all tied or shared)")
    for p in plans:
        p.device = normalize_device(torch.device(device) if device is not None else p.device)
    devices = sorted({p.device for p in plans}, key=str)
    if any(d.type not in ("cpu", "cuda") for d in devices):
        raise OffloadError(f"streamed units execute on {[str(d) for d in devices]}: offload streams to the CPU or "
                           f"CUDA devices only")
    return kind, plans_all, plans, devices


def _carve_experts(store: Store, plans: list[UnitPlan], records: list[UnitRecord], routed: bool,
                   quantization: dict[str, Any] | None, devices: Sequence[torch.device], fits_on_gpu: bool = False
                   ) -> tuple[list[UnitPlan], list[UnitRecord], list[ExpertsGroup]]:
    """Blocks with routed experts stream without them; each experts module reads what it is routed
    (``offload/experts/``). Where that cannot serve yet, whole blocks stream, and one log line says why."""
    if not routed:
        return plans, records, []
    found = [p for p in plans if experts_modules(p.module)]
    if not found:
        moe = [n for p in plans for n, m in p.module.named_modules() if n.split(".")[-1] in ("experts", "moe")]
        if moe:  # experts there, in a layout experts.find cannot read one by one (DBRX, JetMoE, Llama 4)
            log.info("offload: reading whole blocks, every expert included (%s: its experts' layout or forward is "
                     "not the stacked [experts, ...] tensors with forward(hidden, top_k_index, top_k_weights) that "
                     "routed reads serve)", moe[0])
        return plans, records, []
    why = ("the units are quantized: routed experts are read for unquantized models only, for now"
           if quantization else
           "the model computes on several devices: routed experts are read on one device only, for now"
           if len(set(devices)) > 1 else
           "every block fits in the GPU tier, so nothing is read per token" if fits_on_gpu else None)
    if why is not None:
        log.info("offload: reading whole blocks, every expert included (%s)", why)
        return plans, records, []
    out_plans, out_records, groups = [], [], []
    for p, r in zip(plans, records):
        p2, r2, gs = carve(store, p, r)
        out_plans.append(p2)
        out_records.append(r2)
        groups += gs
    return out_plans, out_records, groups


def _experts_on_device(groups: Sequence[ExpertsGroup]) -> int:
    """GPU bytes routed experts take on a GPU: the device table (the largest experts module) and the routers'
    copies that prediction multiplies by."""
    routers = sum(g.router.numel() * g.router.element_size() for g in groups if g.router is not None)
    return max((g.table.data_bytes for g in groups), default=0) + routers


def _build(built: _Built, st: Store, plans: Sequence[UnitPlan], records: Sequence[UnitRecord],
           groups: Sequence[ExpertsGroup], devices: Sequence[torch.device], placement: Placement, reader: Reader, *,
           verify: bool, progress: bool, predict_experts: bool, top_k: int | None = None) -> None:
    """Step 4: the prefetcher (its ring, the RAM tier read in, reader threads), a stager per device (the
    GPU tier copied in) and a hook per unit and per experts module, each kept in ``built`` once made."""
    mp, tracer = placement.plan, built.tracer
    resident = {i: HostBuffer(records[i].data_bytes) for i in sorted(mp.ram_tier)}
    prefetcher = built.prefetcher = Prefetcher(st, records, reader, placement.config, resident,
                                               elsewhere=placement.elsewhere, verify=verify, tracer=tracer,
                                               batches=bool(groups))
    prefetcher.hold_for = {i for i, p in enumerate(plans) if any(g.name.startswith(p.name + ".") for g in groups)}
    if resident:
        from .writer import _progress
        bar = _progress(sum(b.nbytes for b in resident.values()), "offload: loading RAM tier", progress)
        try:
            prefetcher.load_ram_tier(bar.update)
        finally:
            bar.close()
    backend = placement.backends.get(devices[0]) if groups else None
    device = None
    if backend is not None:  # a GPU: the routed experts are copied to a device table; it and the experts' GPU
        # tier are allocated before the units' GPU tier is loaded, so the stagers' base has them
        tier = DeviceTier(backend, groups, placement.gpu_left.get(devices[0], 0))
        device = DeviceTable(backend, max(g.table.data_bytes for g in groups), tier)
        for g in groups:  # the routers' copies for prediction live there too (counted in gpu_extra)
            if g.router is not None:
                g.router = g.router.to(backend.device)
    built.stagers = _make_stagers(plans, records, prefetcher, placement.gpu_tiers, placement.backends, tracer)
    if device is not None and device.tier is not None and device.tier.chunks:  # experts go before GPU-tier units
        stager = built.stagers.get(devices[0])
        if isinstance(stager, CudaStager):
            stager.spills.append(device.tier.give_back)
    for stager in built.stagers.values():
        if isinstance(stager, CudaStager):
            stager.load_gpu_tier()
    bound_units = BoundUnits()
    for i, (p, rec) in enumerate(zip(plans, records)):
        built.hooks.append(UnitHook(i, p.module, rec, bindings(p, rec, built.restore, st), built.stagers[p.device],
                                    tracer, bound_units))
    if groups:  # what the RAM tier and the ring leave holds read experts
        room = max(0, placement.expert_room)
        if placement.room is None:  # ram_tier= bounds the cache only; a forward's reads are staging, as the ring
            reads = None
        else:  # a memory budget: the cache and one forward's reads share what it leaves (at least one expert's
            # reads: below that a forward is split expert by expert)
            largest = max(g.expert_bytes for g in groups)
            reads = max(largest, min(room, reads_per_forward(top_k, [g.expert_bytes for g in groups])))
            room = max(0, room - reads)
        estager = built.estager = ExpertsStager(prefetcher, groups, ExpertCache(room), device, read_room=reads)
        estager.predict_ahead = predict_experts
        bound_experts = BoundUnits()
        for k, g in enumerate(groups):
            gplan = UnitPlan(g.name, g.module, g.tensors, devices[0])
            bs = bindings(gplan, g.table, built.restore, st)  # a device table is packed: plain views
            if device is None:  # the host table: strided views of each expert's region
                for i, slab in enumerate(g.slabs):
                    old, bs[i] = bs[i], ExpertBinding.of(bs[i], slab)
                    if id(old) in built.restore:
                        built.restore[id(bs[i])] = built.restore.pop(id(old))
            built.hooks.append(ExpertsHook(k, g, bs, estager, bound_experts))


def _install(model: nn.Module, built: _Built, st: Store, kind: str, plans_all: Sequence[UnitPlan],
             plans: list[UnitPlan], devices: Sequence[torch.device], placement: Placement, reader: Reader,
             trace: str | os.PathLike[str] | None) -> Handle:
    """Step 5, the point of no return: free the streamed weights and install the hooks; from here
    ``disable()`` undoes it."""
    assert built.prefetcher is not None
    for h in built.hooks:
        for b in h.bindings:
            b.unbind()
        h.register()
    accelerate_state: list[tuple[Any, bool, Any]] = []
    for hk in [hk for p in plans_all for hk in p.hooks]:  # Accelerate hooks whose weights we now place
        accelerate_state.append((hk, hk.offload, hk.weights_map))
        hk.offload, hk.weights_map = False, None
    silenced = silence_inner_accelerate_hooks(plans) if kind == "accelerate" else []
    handle = Handle(model, st, built.prefetcher, built.hooks, plans, kind, built.temp_store,
                    list(built.stagers.values()) + ([built.estager] if built.estager is not None else []),
                    accelerate_state, built.restore, silenced, built.shared, built.tracer,
                    os.fspath(trace) if trace is not None else None,
                    experts=built.estager.cache if built.estager is not None else None,
                    gpu_experts=(built.estager.device.tier.cache if built.estager is not None and built.estager.device
                                 is not None and built.estager.device.tier is not None else None),
                    prediction=placement.prediction, tuning=placement.tuning)
    if kind == "module" and any(d.type == "cuda" for d in devices):
        try:
            move_resident(model, devices[0])  # everything not streamed computes where the units do
        except BaseException:
            handle.disable()
            raise
    handle._attach()
    records, resident, config = built.prefetcher.units, built.prefetcher.ram_tier, placement.config
    log.info("offload: %d units (%s) from %s; %d in RAM (%s), %d on the GPU, %d streamed, ring %d x %s, reader %s",
             len(records), format_bytes(sum(r.data_bytes for r in records)), st.path, len(resident),
             format_bytes(sum(b.nbytes for b in resident.values())), len(placement.elsewhere),
             len(records) - len(resident) - len(placement.elsewhere), config.ring_slots,
             format_bytes(config.slot_bytes), reader.name)
    return handle


def load(source: str | os.PathLike[str], prefetch: int | str = "auto", *, cpu_memory: int | str | None = None,
         ram_tier: int | str | None = None, device: str | torch.device | None = None,
         gpu_memory: int | str | None = None, gpu_tier: int | str | None = None,
         dtype: torch.dtype | str | None = None, reader: str | Reader | None = None, io_threads: int = 8,
         verify: bool = True, trace: str | os.PathLike[str] | None = None, quantize: str | None = None,
         group_size: int = 64, progress: bool = True, rebuild: bool = False, routed_experts: bool = True,
         predict_experts: bool = False, tune: bool = True) -> tuple[nn.Module, Handle]:
    """Load a model bigger than RAM: build it on meta, load its resident weights, stream its blocks.

    ``source`` is a store (``offload convert``) or a Hugging Face folder, converted once into a cached
    store that is rebuilt when the folder's files change (``quantize="int8"|"int4"``: with the blocks'
    linear weights quantized, a cache entry of its own; ``rebuild=True`` converts it again). A store is used
    as it was written. Peak memory is the resident weights + the staging ring + the RAM tier
    (``cpu_memory`` bounds all three) + activations.

    Example:
        >>> model, handle = offload.load("llama-70b/", prefetch=2, cpu_memory="16GiB")
        >>> model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)
    """
    path = os.fspath(source)
    if not os.path.exists(os.path.join(path, MANIFEST)):
        from .convert import cached_store
        path = cached_store(path, dtype=dtype, progress=progress, quantize=quantize, group_size=group_size,
                            rebuild=rebuild)
    st = Store.open(path)
    if verify:
        st.check_side_files()
    qz = st.quantization
    if quantize is not None and (qz or {}).get("scheme") != quantize:
        raise StoreMismatchError(f"store {path} holds {(qz or {}).get('scheme') or 'unquantized'} units, not "
                                 f"{quantize}: load it without quantize=, or convert the checkpoint with "
                                 f"`offload convert CHECKPOINT STORE --quantize {quantize}`")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise StoreError(f"store {path} has no config.json (it was converted from a module, not a checkpoint "
                         f"folder): build the model yourself and offload.enable(model, store={path!r})")
    model = build_on_meta(path, st.dtype or torch.float32)
    handle = enable(model, prefetch, store=path, device=device, cpu_memory=cpu_memory, ram_tier=ram_tier,
                    gpu_memory=gpu_memory, gpu_tier=gpu_tier, units=[u.name for u in st.units], reader=reader,
                    io_threads=io_threads, verify=verify, trace=trace, progress=progress,
                    quantize=qz["scheme"] if qz else None, group_size=qz.get("group_size") if qz else None,
                    routed_experts=routed_experts, predict_experts=predict_experts, tune=tune)
    return model, handle


def _module_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _make_stagers(plans: Sequence[UnitPlan], records: Sequence[UnitRecord], prefetcher: Prefetcher,
                  gpu_tier: dict[torch.device, set[int]], backends: dict[torch.device, Any],
                  tracer: Tracer | None) -> dict[torch.device, Stager]:
    stagers: dict[torch.device, Stager] = {}
    for dev, backend in sorted(backends.items(), key=lambda kv: str(kv[0])):
        if backend is None:
            stagers[dev] = CpuStager(prefetcher)
            continue
        idx = [i for i, p in enumerate(plans) if p.device == dev]
        stagers[dev] = CudaStager(backend, prefetcher, records, idx, sorted(gpu_tier.get(dev, ())), tracer)
    return stagers
