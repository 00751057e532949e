"""``offload.enable`` / ``offload.disable`` / ``offload.load`` and the handle they share: wiring only.

enable: plan (what streams) → store (write or validate) → resident weights of a model built on meta
(from the store) → free the streamed weights → prefetcher (ring + RAM tier, reader threads) →
stagers (CPU in place, CUDA slots) → hooks. disable undoes it in the reverse order (NOTE in
``Handle.disable``) and gives a plain module its weights back.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import StagingConfig, cache_dir
from .convert import module_policy, quantization_of, quantize_sources
from .errors import ChecksumError, OffloadError, StoreError, StoreMismatchError
from .experts import ExpertCache, ExpertsGroup, ExpertsHook, ExpertsStager, carve, experts_modules
from .hooks import Binding, Offloaded, QuantBinding, UnitHook
from .in_place import accelerate_units, write_accelerate_index
from .integrity import fingerprint
from .io import Reader, get_reader
from .budget import MemoryPlan, min_room, plan_memory
from .manifest import MANIFEST, UnitRecord
from .meta import build_on_meta
from .plan import (UnitPlan, _numel, find_units, is_accelerate_offloaded, offload_folder_of,
                   plan_accelerate, plan_plain)
from .prefetch import Prefetcher
from .sources import sources_from_plans
from .staging import HostBuffer
from .store import Store
from .trace import Tracer
from . import tune as _tune
from .transfer import CpuStager, CudaBackend, CudaStager, Stager
from .writer import unit_crc, write_store
from ._memory import available_memory, format_bytes, parse_bytes

log = logging.getLogger("offload")

# Head-room left for activations, the KV cache and the allocator when the RAM tier is sized by default.
DEFAULT_MARGIN_BYTES = 1 << 30
_live_handles: weakref.WeakSet[Handle] = weakref.WeakSet()


@dataclasses.dataclass
class Stats:
    """What the runtime did since ``enable`` (or ``reset_stats``): I/O, stalls and the memory plan."""
    bytes_read: int
    read_seconds: float
    wait_seconds: float
    units_loaded: int
    hits: int
    misses: int
    resident_hits: int
    units_in_flight: int
    verified_units: int  # units whose checksum was checked on their first read
    verify_seconds: float  # reader-thread time those checks took
    streamed_units: int
    resident_units: int
    ring_bytes: int
    resident_bytes: int
    prefetch: int
    reader: str
    store: str
    expert_hits: int = 0  # routed experts found in the expert cache (mixture-of-experts models)
    expert_misses: int = 0  # routed experts read from disk
    expert_bytes_read: int = 0  # of bytes_read, the routed experts' bytes
    expert_cache_bytes: int = 0  # experts held now
    expert_predicted_bytes: int = 0  # experts read ahead for the next layer (its router on this layer's input)
    expert_predicted_used_bytes: int = 0  # of those, what the next layer did route to (the rest was wasted)
    passes: int = 0  # top-level forwards since enable / reset_stats
    s_per_pass: float = 0.0  # median seconds of the decode passes (one new position per row), else of all
    compute_seconds: float = 0.0  # time inside the units' forwards with weights bound (waits excluded)
    predicted_s_per_pass: float = 0.0  # what the plan predicted for a decode pass at batch 1 (0: no prediction)
    predicted_bound: str = ""  # what bounds that prediction: disk, compute or pcie

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Handle:
    """A model with offloading enabled. ``disable()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, model: nn.Module, store: Store, prefetcher: Prefetcher, hooks: list[UnitHook],
                 plans: list[UnitPlan], kind: str, temp_store: bool, stagers: list[Stager],
                 accelerate_state: list[tuple[Any, bool, Any]], restore: dict[int, torch.Tensor],
                 silenced: list[tuple[nn.Module, Any]] | None = None,
                 pinned: list[tuple[nn.Module, str, bool, torch.Tensor]] | None = None,
                 tracer: Tracer | None = None, trace_path: str | None = None):
        self.model, self.store, self.prefetcher, self.hooks, self.plans = model, store, prefetcher, hooks, plans
        self.kind, self.temp_store, self.stagers = kind, temp_store, stagers
        self._accelerate_state = accelerate_state
        self._silenced = silenced or []
        self._restore = restore
        self._pinned = pinned or []
        self.tracer, self.trace_path = tracer, trace_path
        self.experts: Any = None  # the expert cache, when routed experts are read on routing
        self.prediction: _tune.Prediction | None = None  # set by enable when it planned the depth
        self._tuning: dict[str, Any] = {}  # what a prediction at another batch size needs (enable fills it)
        self._meter = _tune.PassMeter([h for h in hooks if isinstance(h, UnitHook)],
                                     lambda: self.prefetcher.stats().wait_seconds)
        self._root_hooks = [model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
                            model.register_forward_hook(self._root_post, always_call=True)]
        self._lock = threading.Lock()
        self._compute_at_reset = 0.0
        self.closed = False

    def _root_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        # A new top-level forward: any unit still bound was left by an interrupted forward
        # (KeyboardInterrupt skips post-hooks). Unbind it so its staging buffer returns to the ring.
        for h in self.hooks:
            h.reset()
        self._meter.start(args, kwargs)

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._meter.end()

    def stats(self) -> Stats:
        s = self.prefetcher.stats() if not self.closed else None
        resident = self.prefetcher.resident if not self.closed else {}
        return Stats(
            bytes_read=s.bytes_read if s else 0, read_seconds=s.read_seconds if s else 0.0,
            wait_seconds=s.wait_seconds if s else 0.0, units_loaded=s.units_loaded if s else 0,
            hits=s.hits if s else 0, misses=s.misses if s else 0, resident_hits=s.resident_hits if s else 0,
            units_in_flight=s.units_in_flight if s else 0, verified_units=s.verified_units if s else 0,
            verify_seconds=s.verify_seconds if s else 0.0,
            streamed_units=len(self.prefetcher.units) - len(resident) - len(self.prefetcher.elsewhere),
            resident_units=len(resident), ring_bytes=self.prefetcher.config.ring_bytes if not self.closed else 0,
            resident_bytes=sum(b.nbytes for b in resident.values()),
            prefetch=self.prefetcher.depth, reader=self.prefetcher.reader.name, store=self.store.path,
            **({"expert_hits": self.experts.hits, "expert_misses": self.experts.misses,
                "expert_bytes_read": self.experts.bytes_read, "expert_cache_bytes": self.experts.used,
                "expert_predicted_bytes": self.experts.predicted_bytes,
                "expert_predicted_used_bytes": self.experts.predicted_used_bytes}
               if self.experts is not None else {}),
            passes=len(self._meter.seconds), s_per_pass=statistics.median(self._meter.decode_seconds or self._meter.seconds or [0.0]),
            compute_seconds=sum(h.compute_s for h in self._meter.hooks) - self._compute_at_reset,
            predicted_s_per_pass=self.prediction.s_per_pass if self.prediction else 0.0,
            predicted_bound=self.prediction.bound if self.prediction else "")

    def reset_stats(self) -> None:
        if not self.closed:
            self.prefetcher.reset_stats()
            if self.experts is not None:
                self.experts.reset()
            self._meter.reset()
            self._compute_at_reset = sum(h.compute_s for h in self._meter.hooks)

    def write_trace(self, path: str | os.PathLike[str] | None = None) -> str:
        """Write the trace recorded so far (``enable(trace=...)``) as Chrome trace JSON; returns the path."""
        if self.tracer is None:
            raise OffloadError("this handle records no trace: enable(model, trace='trace.json') to record one")
        target = path if path is not None else self.trace_path
        assert target is not None
        return self.tracer.write(target)

    def disable(self) -> None:
        """Stop the reader threads, free the buffers, remove the hooks and restore the model. Idempotent.

        NOTE (shutdown order, the only place it is written): hooks first, so no new forward can lease a
        buffer; then bound units are unbound (their leases go back); then the stagers (CUDA: the copy
        stream is synchronised, so no DMA still reads a host buffer); then the prefetcher (queued reads
        are abandoned, reader threads finish their current read and are joined, so nothing writes into
        a buffer; only then are ring and RAM-tier buffers freed); then the model's own state (Accelerate
        hooks, the user's Parameters); last the temporary store.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
        errors: list[Exception] = []  # a failing step (a CUDA error, a damaged file) must not skip the rest

        def step(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - re-raised after the whole shutdown
                errors.append(e)
        for rh in self._root_hooks:
            rh.remove()
        for h in self.hooks:
            h.remove()
        self._save_compute()
        for h in self.hooks:
            step(h.reset)
        for stager in self.stagers:
            step(stager.close)
        step(self.prefetcher.close)
        step(self.store.save_checksums)  # read in place: what first reads recorded, checked by later runs
        for hook, offload, weights_map in self._accelerate_state:
            hook.offload, hook.weights_map = offload, weights_map
        for module, hook in self._silenced:
            module._hf_hook = hook
        _unload_resident(self._pinned)  # Accelerate's placeholders for the shared tensors
        if self._restore:
            step(self._restore_weights)  # a damaged unit: finish the shutdown, then say which weights are lost
        for h in self.hooks:  # what the module held before (Accelerate's placeholders)
            for b in h.bindings:
                if id(b) not in self._restore:
                    (b.owner._parameters if b.is_param else b.owner._buffers)[b.attr] = b.original
        if getattr(self.model, "_offload_handle", None) is self:
            del self.model._offload_handle
        if self.temp_store:
            shutil.rmtree(self.store.path, ignore_errors=True)
        _live_handles.discard(self)
        if self.tracer is not None and self.trace_path is not None:
            step(self.tracer.write, self.trace_path)
        if errors:
            raise errors[0]

    def _save_compute(self) -> None:
        """Cache the decode compute measured in this run (per batch size), so the next plan of this store
        predicts from it rather than from a kernel estimate. Host timing measures CPU compute only."""
        if not self._tuning.get("store_id") or any(p.device.type != "cpu" for p in self.plans):
            return
        for batch in self._meter.decode:
            c = self._meter.compute(batch)
            if c is not None:
                try:
                    _tune.save_compute(self._tuning["store_id"], batch, "cpu", c)
                except (OSError, OffloadError) as e:  # a cache that cannot be written only costs a re-measure
                    log.debug("offload: tuning cache not written: %s", e)

    def predict(self, batch: int = 1) -> _tune.Prediction | None:
        """Seconds per decode pass at ``batch`` rows, as the plan models them (``None``: nothing measured
        to predict from; ``why_no_prediction`` says why). Compute comes from this run's decode passes when it has seen some, else the
        tuning cache, else a kernel estimate."""
        t = self._tuning
        if not t or t.get("disk") is None:
            return None
        measured = self._meter.compute(batch)
        return _tune.predict_plan(t, batch, measured)

    @property
    def why_no_prediction(self) -> str:
        return self._tuning.get("why", "") if self._tuning else "prefetch was given: no model of the disk was consulted"

    def _restore_weights(self) -> None:
        """Give a plain module its streamed weights back, read from the store (their only copy now)."""
        damaged = []
        for h in self.hooks:
            rec = h.record
            try:
                data = self.store.read_verified(rec)
            except (ChecksumError, StoreError, OSError):
                damaged.append(f"{self.store.root if rec.extents else self.store.file_path(rec)} (unit {rec.name})")
                for b in h.bindings:  # never hand back silently wrong weights: the Parameter stays empty
                    b.owner._parameters[b.attr] = self._restore[id(b)]  # type: ignore[assignment]
                continue
            for b in h.bindings:
                p = self._restore[id(b)]  # the user's own Parameter, back on the device it came from
                if isinstance(b, QuantBinding):  # only the quantized values exist now
                    b.bind(data)
                    dense = b.weight.dequantize().to(p.device)
                    b.unbind()  # (empties p: set it after)
                    p.data = dense
                    log.warning("offload: %s was streamed %s-quantized; disable() gives it back dequantized (the "
                                "original values were freed at enable)", b.stand_in._offload_name, b.scheme)
                else:
                    p.data = data[b.offset:b.offset + b.nbytes].view(b.dtype).view(b.shape).clone().to(p.device)
                b.owner._parameters[b.attr] = p  # type: ignore[assignment]
        if damaged:
            raise ChecksumError(f"the weights of {len(damaged)} unit(s) cannot be restored: {', '.join(damaged)} "
                                f"failed the checksum recorded when they were written (damaged on disk since); "
                                f"their parameters are left empty. Reload the model from its checkpoint")

    close = disable

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disable()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.hooks)} units, prefetch={self.prefetcher.depth}"
        return f"<offload.Handle {state} store={self.store.path!r}>"


@atexit.register
def _close_all() -> None:
    for h in list(_live_handles):
        with contextlib.suppress(Exception):
            h.disable()


def _expected(plans: Sequence[UnitPlan], store: Store | None = None
              ) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """What each unit's file must hold for this model: its tensors, or for a weight the store holds
    quantized, that weight's parts (checked against the weight's own shape and dtype)."""
    from .quant import quantized_specs
    out = {}
    for p in plans:
        rec = store.by_name.get(p.name) if store is not None else None
        quantized = {q.name: q for q in rec.quantized} if rec is not None else {}
        want: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for t in p.tensors:
            q = quantized.get(t.rel)
            if q is None:
                want[t.rel] = (t.dtype, t.shape)
                continue
            if (q.torch_dtype, q.shape) != (t.dtype, t.shape):
                raise StoreMismatchError(f"store {store.path}: unit {p.name} holds {t.rel} quantized from "  # type: ignore[union-attr]
                                         f"{q.torch_dtype} {list(q.shape)}, the model has {t.dtype} {list(t.shape)}")
            qz = store.quantization or {}  # type: ignore[union-attr]
            for name, dt, shape in quantized_specs(t.rel, t.shape, t.dtype, qz.get("scheme", ""),
                                                   qz.get("group_size") or 64, transposed=q.transposed):
                want[name] = (dt, shape)
        out[p.name] = want
    return out


def _sources(model: nn.Module, plans: Sequence[UnitPlan], quantization: dict[str, Any] | None) -> list[Any]:
    """The unit sources a store is written from (and compared with): the model's tensors, quantized when asked."""
    sources = sources_from_plans(plans)
    if quantization:
        scheme, group = quantization["scheme"], quantization.get("group_size") or 64
        quantize_sources(sources, module_policy(dict(model.named_modules()), scheme, group), scheme, group)
    return sources


def _check_quantization(store: Store, want: dict[str, Any] | None) -> None:
    have = store.quantization
    same = (have is None and want is None) or (have is not None and want is not None and have.get("scheme") ==
                                                 want.get("scheme") and have.get("group_size") == want.get("group_size"))
    if not same:
        def say(q: dict[str, Any] | None) -> str:
            return "unquantized" if q is None else f"{q['scheme']}" + (f" (group {q['group_size']})" if q.get("group_size") else "")
        fix = (f"pass quantize={have['scheme']!r}" + (f", group_size={have['group_size']}" if have.get("group_size") else "")
               if have is not None else "enable without quantize=")
        raise StoreMismatchError(f"store {store.path} holds {say(have)} units but {say(want)} ones were asked for: "
                                 f"{fix} to use this store, or pass another store=")


def _source_fingerprint(plans: Sequence[UnitPlan], kind: str) -> str:
    if kind == "accelerate" and all(t.source_id is not None for p in plans for t in p.tensors):
        return fingerprint((p.name, t.rel, str(t.dtype), t.shape, t.source_id) for p in plans for t in p.tensors)
    # No file identity (a plain module, or weights Accelerate keeps in RAM): the content decides,
    # through the per-unit checksums compared when a store is reused.
    return "content:" + fingerprint((p.name, t.rel, str(t.dtype), t.shape) for p in plans for t in p.tensors)


def _check_reused(store: Store, plans: Sequence[UnitPlan], fp: str, sources: Sequence[Any]) -> None:
    have = str(store.source.get("fingerprint", ""))
    if not fp.startswith("content:"):
        if have != fp:
            raise StoreMismatchError(f"store {store.path} was built from other checkpoint files than this model's "
                                     f"(source fingerprint {have[:12]} vs {fp[:12]}): delete it or pass another store=")
        return
    for p in plans:
        if any(t.owner._parameters.get(t.attr) is not None and t.owner._parameters[t.attr].device.type == "meta"
               for t in p.tensors if t.is_param):
            continue  # a model built on meta has no weights to compare: the store is its weights
        rec = store.by_name[p.name]
        src = next(u for u in sources if u.name == p.name)
        with src.open_fetch() as fetch:
            crc = unit_crc(p.name, src.specs, fetch)
        if crc != rec.crc32:
            raise StoreMismatchError(f"store {store.path}: unit {p.name} holds different weights than the model "
                                     f"(checksum {rec.crc32:08x} vs {crc:08x}): delete the store or pass another store=")


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

    accelerate = is_accelerate_offloaded(model)
    if accelerate:
        if units is not None:
            raise ValueError("units= applies to plain modules; Accelerate's device_map decides the units here")
        plans = plan_accelerate(model)
        kind = "accelerate"
    else:
        dev = torch.device(device) if device is not None else _module_device(model)
        plans = plan_plain(model, find_units(model, units), dev)
        kind = "module"
    takeover = [hk for p in plans for hk in p.hooks]  # Accelerate hooks whose weights we now place
    plans_all, plans = plans, [p for p in plans if p.tensors]
    if not plans:
        raise OffloadError("nothing to stream: the chosen units have no parameters of their own (all tied or shared)")
    for p in plans:
        p.device = _normalize(torch.device(device) if device is not None else p.device)
    devices = sorted({p.device for p in plans}, key=str)
    if any(d.type not in ("cpu", "cuda") for d in devices):
        raise OffloadError(f"streamed units execute on {[str(d) for d in devices]}: offload streams to the CPU or "
                           f"CUDA devices only")

    fp = _source_fingerprint(plans, kind)
    temp_store = False
    if store is None:
        folder = offload_folder_of(model) if accelerate else None
        if folder:
            store = os.path.join(folder, "offload-store")
        elif kind == "accelerate" and not fp.startswith("content:"):
            store = os.path.join(cache_dir(), "stores", fp)
        else:
            store = tempfile.mkdtemp(prefix="store-", dir=cache_dir())
            temp_store = True
            from ._cache import write_owner
            write_owner(store)  # `offload cache` tells a live process's store from a crashed one's
    store = os.fspath(store)
    loaded: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    pinned: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    prefetcher: Prefetcher | None = None
    stagers: dict[torch.device, Stager] = {}
    restore: dict[int, torch.Tensor] = {}
    hooks: list[UnitHook] = []
    estager: ExpertsStager | None = None
    tracer = Tracer() if trace is not None else None
    try:  # until the point of no return, a failure undoes everything it did (the model is as it was)
        if os.path.exists(os.path.join(store, MANIFEST)):
            st = Store.open(store)
            if quantization and group_size is None and st.quantization and st.quantization["scheme"] == quantize:
                quantization = st.quantization  # "int4" means the store's group size unless one is named
            _check_quantization(st, quantization)
            st.match(_expected(plans, st))
            _check_reused(st, plans, fp, _sources(model, plans, quantization))
        else:
            source = {"kind": kind, "class": type(model).__name__, "fingerprint": fp, "quantization": quantization}
            in_place = accelerate_units(plans) if kind == "accelerate" and not quantization else None
            if in_place is not None:  # read where Accelerate's offload index points: no second copy
                st = write_accelerate_index(store, in_place, source)
            else:
                st = write_store(store, _sources(model, plans, quantization), source, progress=progress,
                                 extra={"quantization": quantization} if quantization else None)
            st.match(_expected(plans, st))
        loaded = _load_resident_from_store(model, plans, st, devices[0], verify) if kind == "module" else []
        _pin_shared(plans_all, pinned)
        records = [st.by_name[p.name] for p in plans]
        plans, records, groups = _carve_experts(st, plans, records, routed_experts, quantization, devices)

        backends = {dev: _backend_for(dev) for dev in devices}
        sizes = [r.data_bytes for r in records]
        streaming = plans + [UnitPlan(g.name, g.module, g.tensors, devices[0]) for g in groups]  # not resident

        def placed(depth: int) -> tuple[dict[torch.device, set[int]], set[int], int | None, int | None, MemoryPlan]:
            """The tiers at look-ahead ``depth``: GPU tier (per device with a copy engine: units kept on
            the device, read once), then the RAM tier (units read once; the streamed weights about to be
            freed count as free). A deeper ring leaves less for both."""
            tiers = _gpu_tiers(model, plans, records, depth, gpu_memory, gpu_tier, backends, kind)
            elsewhere = set().union(*tiers.values()) if tiers else set()
            room, tier_size = _ram_room(model, streaming, kind, depth, [sizes[i] for i in range(len(sizes))
                                                                        if i not in elsewhere], total_budget, tier_budget)
            return tiers, elsewhere, room, tier_size, plan_memory(sizes, depth, ram_room=room, ram_tier=tier_size,
                                                                  on_gpu=frozenset(elsewhere))

        streams = bool(placed(_tune.DEFAULT_PREFETCH)[4].streamed)  # all in the tiers: no disk to plan for
        tuning = _tuning_inputs(st, records, rd, devices, model, plans, measure=tune and prefetch == "auto" and streams,
                                progress=progress)
        if prefetch == "auto":
            prefetch, prediction = _auto_depth(placed, tuning)
        else:
            prediction = None
        tiers, elsewhere, room, tier_size, mp = placed(prefetch)
        if prediction is None and tuning.get("disk") is not None:
            tuning["plan"] = mp
            prediction = _tune.predict_plan({**tuning, "prefetch": prefetch}, 1, None)
        tuning.update(prefetch=prefetch, plan=mp)
        slots, slot_bytes = mp.host_ring
        config = StagingConfig(prefetch, slot_bytes, len(mp.streamed), io_threads)
        assert room is None or mp.bytes_of(mp.ram_tier) + config.ring_bytes <= room or not mp.ram_tier
        resident = {i: HostBuffer(sizes[i]) for i in sorted(mp.ram_tier)}
        prefetcher = Prefetcher(st, records, rd, config, resident, elsewhere=elsewhere, verify=verify, tracer=tracer)
        if resident:
            from .writer import _progress
            bar = _progress(sum(b.nbytes for b in resident.values()), "offload: loading RAM tier", progress)
            try:
                prefetcher.load_resident(bar.update)
            finally:
                bar.close()
        stagers = _make_stagers(plans, records, prefetcher, tiers, backends, tracer)
        for stager in stagers.values():
            if isinstance(stager, CudaStager):
                stager.load_gpu_tier()
        for i, (p, rec) in enumerate(zip(plans, records)):
            bindings = _bindings(p, rec, restore, st)
            hooks.append(UnitHook(i, p.module, rec, bindings, stagers[p.device], tracer))
        if groups:  # what the RAM tier and the ring leave holds read experts
            left = (tier_size - mp.bytes_of(mp.ram_tier) if tier_size is not None else
                    room - mp.bytes_of(mp.ram_tier) - config.ring_bytes if room is not None else 0)
            estager = ExpertsStager(prefetcher, groups, ExpertCache(max(0, left)))
            estager.predict_ahead = predict_experts
            for k, g in enumerate(groups):
                gplan = UnitPlan(g.name, g.module, g.tensors, devices[0])
                hooks.append(ExpertsHook(k, g, _bindings(gplan, g.table, restore, st), estager))
    except BaseException:
        for stager in list(stagers.values()) + ([estager] if estager is not None else []):
            with contextlib.suppress(Exception):
                stager.close()
        if prefetcher is not None:
            prefetcher.close()
        _unload_resident(loaded + pinned)
        if temp_store:
            shutil.rmtree(store, ignore_errors=True)
        raise
    # Point of no return: free the streamed weights and install the hooks; from here disable() undoes it.
    for h in hooks:
        for b in h.bindings:
            b.unbind()
        h.register()
    accelerate_state: list[tuple[Any, bool, Any]] = []
    for hk in takeover:
        accelerate_state.append((hk, hk.offload, hk.weights_map))
        hk.offload, hk.weights_map = False, None
    silenced = _silence_inner_accelerate_hooks(plans) if accelerate else []
    handle = Handle(model, st, prefetcher, hooks, plans, kind, temp_store,
                    list(stagers.values()) + ([estager] if estager is not None else []), accelerate_state,
                    restore, silenced, pinned, tracer, os.fspath(trace) if trace is not None else None)
    handle.experts = estager.cache if estager is not None else None
    handle.prediction, handle._tuning = prediction, tuning
    if kind == "module" and any(d.type == "cuda" for d in devices):
        try:
            _move_resident(model, devices[0])  # everything not streamed computes where the units do
        except BaseException:
            handle.disable()
            raise
    model._offload_handle = handle  # type: ignore[assignment]
    _live_handles.add(handle)
    log.info("offload: %d units (%s) from %s; %d in RAM (%s), %d on the GPU, %d streamed, ring %d x %s, reader %s",
             len(records), format_bytes(sum(r.data_bytes for r in records)), st.path, len(resident),
             format_bytes(sum(b.nbytes for b in resident.values())), len(elsewhere),
             len(records) - len(resident) - len(elsewhere), config.ring_slots, format_bytes(config.slot_bytes), rd.name)
    return handle


def _carve_experts(store: Store, plans: list[UnitPlan], records: list[UnitRecord], routed: bool,
                   quantization: dict[str, Any] | None, devices: Sequence[torch.device]
                   ) -> tuple[list[UnitPlan], list[UnitRecord], list[ExpertsGroup]]:
    """Blocks with routed experts stream without them; each experts module reads what it is routed
    (``experts.py``). Where that cannot serve yet, whole blocks stream, and one log line says why."""
    if not routed:
        return plans, records, []
    found = [p for p in plans if experts_modules(p.module)]
    if not found:
        return plans, records, []
    why = ("the units are quantized" if quantization else
           "the units compute on CUDA" if any(d.type != "cpu" for d in devices) else None)
    if why is not None:
        log.info("offload: reading whole blocks, every expert included (%s: routed experts are read on the CPU "
                 "path of unquantized models for now)", why)
        return plans, records, []
    out_plans, out_records, groups = [], [], []
    for p, r in zip(plans, records):
        p2, r2, gs = carve(store, p, r)
        out_plans.append(p2)
        out_records.append(r2)
        groups += gs
    return out_plans, out_records, groups


def _tuning_inputs(st: Store, records: Sequence[UnitRecord], reader: Reader, devices: Sequence[torch.device],
                   model: nn.Module, plans: Sequence[UnitPlan], *, measure: bool, progress: bool) -> dict[str, Any]:
    """What ``tune`` needs to predict this model's passes: the disk profile (cached, or measured now when
    ``measure`` and the units stream enough bytes for it to matter), the units' byte ranges and sizes,
    the compute's kind and where it runs."""
    reads = [[(st.path_of(r, e.file), e.offset, e.length) for e in r.reads] for r in records if r.reads]
    q = st.quantization
    kind = q["scheme"] if q else str(st.dtype or torch.float32).replace("torch.", "")
    resident = sum(t.numel() * t.element_size() for t in _resident_tensors(model, plans))
    out: dict[str, Any] = {"sizes": [r.data_bytes for r in records], "kind": kind, "resident_bytes": resident,
                           "device": devices[0].type, "store_id": _tune.store_id(st, records), "disk": None}
    if not reads or sum(out["sizes"]) < _tune.MIN_STREAMED_BYTES:
        out["why"] = (f"the units total {format_bytes(sum(out['sizes']))} (< {format_bytes(_tune.MIN_STREAMED_BYTES)}): "
                      f"too little for the depth to matter")
        return out
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else log.info  # noqa: E731
    try:
        out["disk"] = _tune.disk_profile(reads, reader, measure=measure, say=say)
    except OSError as e:  # measuring is an optimisation: a disk that cannot be measured plans as before
        log.warning("offload: could not measure the disk (%s); prefetch=%d", e, _tune.DEFAULT_PREFETCH)
        out["why"] = f"the disk could not be measured ({e})"
    if out["disk"] is None and "why" not in out:
        out["why"] = ("this disk was never measured (`offload tune MODEL` measures it; prefetch='auto' does when "
                      "units stream)")
    if out["disk"] is not None and devices[0].type == "cuda":
        out["h2d_bps"] = _tune.h2d_rate(devices[0])
    return out


def _auto_depth(placed: Any, tuning: dict[str, Any]) -> tuple[int, _tune.Prediction | None]:
    """The look-ahead depth for ``prefetch="auto"``: each depth the budget allows is placed (tiers and
    ring) and its pass predicted; ``tune.choose_prefetch`` takes the shallowest near the best."""
    if tuning.get("disk") is None:
        return _tune.DEFAULT_PREFETCH, None
    candidates, first_error = [], None
    for depth in range(1, _tune.MAX_CONCURRENCY + 1):
        try:
            mp = placed(depth)[4]
        except OffloadError as e:  # this ring does not fit the budget: deeper ones will not either
            first_error = first_error or e
            break
        candidates.append((depth, mp))
    if not candidates:
        assert first_error is not None
        raise first_error
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
                f"slots in the RAM tier, {format_bytes(need)}): the minimum is {format_bytes(resident + need)} "
                f"(or lower prefetch=)")
        return total - resident, None
    freed = sum(_numel(t.shape) * t.dtype.itemsize for p in plans for t in p.tensors
                if kind == "module" and t.is_param and t.owner._parameters[t.attr].device.type == "cpu")
    return max(0, available_memory() + freed - DEFAULT_MARGIN_BYTES), None


def _load_resident_from_store(model: nn.Module, plans: Sequence[UnitPlan], store: Store, device: torch.device,
                              verify: bool = True) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """A model built on meta: load what is not streamed (embeddings, norms, head) from the store.

    With ``verify`` the resident file's checksum is checked first, as every unit's is on its first
    read: a damaged embedding would otherwise change every output without an error.
    Tied weights stay tied: every module slot that held the same meta tensor gets the same loaded one.
    Returns what was replaced, so a failed ``enable`` can put the meta tensors back.
    """
    streamed = {(id(t.owner), t.attr) for p in plans for t in p.tensors}
    wanted: dict[int, tuple[str, torch.Tensor]] = {}
    for mname, m in model.named_modules():
        for attr, t in list(m._parameters.items()) + [(n, b) for n, b in m._buffers.items()
                                                       if n not in m._non_persistent_buffers_set]:
            if t is not None and t.device.type == "meta" and (id(m), attr) not in streamed and id(t) not in wanted:
                wanted[id(t)] = (f"{mname}.{attr}" if mname else attr, t)
    if not wanted:
        return []
    state: dict[str, torch.Tensor] = {}
    if store.resident is not None:
        rec = store.resident
        data = store.read_verified(rec) if verify else store.read_unit(rec)
        state = {t.name: data[t.offset:t.offset + t.nbytes].view(t.torch_dtype).view(t.shape) for t in rec.tensors}
    missing = [name for name, _ in wanted.values() if name not in state]
    for mname, m in model.named_modules():  # buffers the checkpoint holds (a router's bias) are its values,
        for attr, b in m._buffers.items():  # not the ones the model was built with
            name = f"{mname}.{attr}" if mname else attr
            if (b is not None and b.device.type != "meta" and attr not in m._non_persistent_buffers_set
                    and name in state and (id(m), attr) not in streamed and id(b) not in wanted):
                wanted[id(b)] = (name, b)
    if missing:
        raise OffloadError(
            f"{type(model).__name__} has weights on the meta device that store {store.path} does not hold "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): build the model with its weights, "
            f"or make the store from its full checkpoint with `offload convert CHECKPOINT STORE`")
    new: dict[int, torch.Tensor] = {}
    for key, (name, t) in wanted.items():
        value = state[name]
        if tuple(value.shape) != tuple(t.shape):
            raise StoreMismatchError(f"store {store.path}: {name} has shape {tuple(value.shape)}, the model expects "
                                     f"{tuple(t.shape)}: the store was made from another model")
        value = value.to(device=device, dtype=t.dtype)
        new[key] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    replaced = []
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for attr, t in table.items():
                if t is not None and id(t) in new:
                    replaced.append((m, attr, table is m._parameters, t))
                    table[attr] = new[id(t)]
    return replaced


def _pin_shared(plans: Sequence[UnitPlan], replaced: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    """Tensors reachable from several units (``UnitPlan.pinned``): read once, kept where they compute.

    Each replacement is appended to ``replaced`` as it happens, so a failure part way can be undone."""
    for p in plans:
        for t in p.pinned:
            table = t.owner._parameters if t.is_param else t.owner._buffers
            original = table[t.attr]
            assert original is not None
            value = t.fetch().to(device=p.device, dtype=t.dtype)
            table[t.attr] = nn.Parameter(value, requires_grad=original.requires_grad) if t.is_param else value
            replaced.append((t.owner, t.attr, t.is_param, original))


def _unload_resident(replaced: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    for m, attr, is_param, t in reversed(replaced):
        (m._parameters if is_param else m._buffers)[attr] = t


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


def _bindings(plan: UnitPlan, rec: UnitRecord, restore: dict[int, torch.Tensor], store: Store) -> list[Binding]:
    by_name = {t.name: t for t in rec.tensors}
    quantized = {q.name: q for q in rec.quantized}
    qz = store.quantization or {}
    out: list[Binding] = []
    for t in plan.tensors:
        q = quantized.get(t.rel)
        r = by_name[t.rel] if q is None else None
        current = (t.owner._parameters if t.is_param else t.owner._buffers)[t.attr]
        assert current is not None
        on_meta = current.device.type == "meta"  # Accelerate's placeholder (or a model built on meta)
        stand_in = Offloaded(t.shape, t.dtype, bool(current.requires_grad), f"{plan.name}.{t.rel}",
                             current.device if on_meta else plan.device,
                             functools.partial(_read_stray, store, rec, t.rel, plan.device))
        live = None
        if t.is_param:
            # The user's Parameter keeps its identity (its storage is swapped) when it is on the unit's device.
            fresh = nn.Parameter(torch.empty(0, dtype=t.dtype, device=plan.device), requires_grad=current.requires_grad)
            live = current if not on_meta and current.device == plan.device else fresh
        if q is None:
            assert r is not None
            b = Binding(t.owner, t.attr, t.is_param, r.offset, r.nbytes, t.dtype, t.shape, stand_in, current, live)
        else:
            parts = {x.name[len(t.rel) + 1:]: (x.offset, x.nbytes, x.torch_dtype, x.shape)
                     for x in rec.tensors if x.name.startswith(t.rel + ".")}
            b = QuantBinding(t.owner, t.attr, t.is_param, 0, 0, t.dtype, t.shape, stand_in, current, live, parts,
                             qz["scheme"], qz.get("group_size") or 64, q.transposed, qz.get("int4_layout"))
        if t.is_param and not on_meta:
            restore[id(b)] = current
        out.append(b)
    return out


def _read_stray(store: Store, rec: UnitRecord, name: str, device: torch.device) -> torch.Tensor:
    """A streamed tensor used outside its unit's forward: read it on its own (see hooks.Offloaded); a
    quantized weight is read as its parts and dequantized."""
    try:
        q = next((q for q in rec.quantized if q.name == name), None)
        if q is None:
            return store.read_tensor(rec, name).to(device)
        return _dequantized(store, rec, q).to(device)
    except FileNotFoundError as e:
        raise OffloadError(f"{rec.name}.{name}: its layer file {e.filename} is gone (was this a reference kept from "
                           f"before offload.disable()? read the module's parameter again)") from None


def _dequantized(store: Store, rec: UnitRecord, q: Any) -> torch.Tensor:
    from .quant import from_stored
    qz = store.quantization or {}
    parts = {t.name[len(q.name) + 1:]: store.read_tensor(rec, t.name) for t in rec.tensors
             if t.name.startswith(q.name + ".")}
    return from_stored(parts, q.shape, q.torch_dtype, qz["scheme"], qz.get("group_size") or 64,
                       transposed=q.transposed, layout=qz.get("int4_layout")).dequantize()


def _silence_inner_accelerate_hooks(plans: Sequence[UnitPlan]) -> list[tuple[nn.Module, Any]]:
    """Swap Accelerate's hooks *inside* each unit for a no-op while offload is enabled.

    With offloading taken over, an AlignDevicesHook inside a unit only re-sends tensors that are
    already on its execution device, ~8 times per block per token (18% of a warm bloom-1b7 decode
    step). The unit module's own hook still aligns the unit's inputs and outputs. Restored on disable.
    """
    from accelerate.hooks import ModelHook
    noop = ModelHook()
    out = []
    for p in plans:
        for name, m in p.module.named_modules():
            hook = getattr(m, "_hf_hook", None)
            if not name or type(hook).__name__ != "AlignDevicesHook":
                continue  # the unit's own hook, or hooks that are not (only) device alignment
            dev = torch.device(hook.execution_device) if hook.execution_device is not None else p.device
            if _normalize(dev) == p.device and not hook.io_same_device and not hook.offload:
                out.append((m, hook))
                m._hf_hook = noop
    return out


def _normalize(device: torch.device) -> torch.device:
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
               kind: str) -> dict[torch.device, set[int]]:
    """Per device with a copy engine, the units kept on it: what ``gpu_memory`` leaves after the resident
    weights computing there and the device slot ring (too little for those two is an error)."""
    tiers: dict[torch.device, set[int]] = {}
    for dev, backend in backends.items():
        if backend is None:
            continue
        idx = [i for i, p in enumerate(plans) if p.device == dev]
        ring = min_room([records[i].data_bytes for i in idx], prefetch)
        there, coming = _resident_on(model, plans, dev, moving=kind == "module")
        room = None
        if gpu_memory is not None:
            total = parse_bytes(gpu_memory)
            if total < there + coming + ring:
                raise OffloadError(
                    f"gpu_memory={format_bytes(total)} cannot hold the resident weights on {dev} "
                    f"({format_bytes(there + coming)}) and the device slot ring ({format_bytes(ring)}): the minimum "
                    f"is {format_bytes(there + coming + ring)} (or lower prefetch=)")
            room = total - there - coming
        elif gpu_tier is None:  # free memory, minus what is still to move there and room for activations/KV cache
            room = backend.free_bytes() - coming - GPU_MARGIN_BYTES
        mp = plan_memory([r.data_bytes for r in records], prefetch, ram_tier=0, gpu_units=idx, gpu_room=room,
                         gpu_tier=parse_bytes(gpu_tier) if gpu_tier is not None else None)
        tiers[dev] = set(mp.gpu_tier)
    return tiers


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


def _move_resident(model: nn.Module, device: torch.device) -> None:
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and not isinstance(p, Offloaded) and p.device.type != "meta" and p.device != device:
                p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None and not isinstance(b, Offloaded) and b.device.type != "meta" and b.device != device:
                m._buffers[name] = b.to(device)


def disable(target: nn.Module | Handle) -> None:
    """Undo :func:`enable` on a model, or given its handle (no-op if it is not enabled)."""
    if isinstance(target, Handle):
        target.disable()
        return
    if not isinstance(target, nn.Module):
        raise TypeError(f"offload.disable expects a model or the Handle enable returned, got {type(target).__name__}")
    h = getattr(target, "_offload_handle", None)
    if h is not None:
        h.disable()
