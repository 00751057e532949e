"""What ``enable`` returns: the ``Handle`` (stats, trace, prediction, disable) and ``disable`` itself.

A handle owns what ``enable`` built (the store, the prefetcher and its reader threads, the stagers,
the hooks) and takes it down in one order, written once in ``Handle.disable``. Handles still open at
interpreter exit are disabled then (their temporary stores removed).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import sys
import threading
import weakref
from typing import Any

import torch
from torch import nn

from . import measure as _measure
from . import tune as _tune
from ._fileio import hold
from .config import cache_dir
from .errors import ChecksumError, OffloadError, StoreError
from .hooks import QuantBinding, UnitHook, _compiling, eagerly, guard_casts, unwatch_streamed, watch_streamed
from .install import unload_resident
from .plan import UnitPlan
from .prefetch import Prefetcher
from .store import Store
from .trace import Tracer
from .transfer import Stager

log = logging.getLogger("offload")

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
    ram_tier_hits: int
    units_in_flight: int
    verified_units: int  # units whose checksum was checked on their first read
    verify_seconds: float  # reader-thread time those checks took
    streamed_units: int
    ram_tier_units: int
    ring_bytes: int
    ram_tier_bytes: int
    prefetch: int  # units read ahead: the depth asked, capped by the ring (the streamed units but one; at least 1)
    reader: str  # the reader's name, "+bounce" when it reads through a bounce region (measure.use_profile)
    store: str
    expert_hits: int = 0  # routed experts found in the expert cache (mixture-of-experts models)
    expert_misses: int = 0  # routed experts read from disk
    expert_gpu_hits: int = 0  # routed experts found in the experts' GPU tier (neither read nor copied from the host)
    expert_gpu_bytes: int = 0  # experts held there now
    expert_bytes_read: int = 0  # of bytes_read, the routed experts' bytes
    expert_cache_bytes: int = 0  # experts held now
    expert_predicted_bytes: int = 0  # experts read ahead for the next layer (its router on this layer's input)
    expert_predicted_used_bytes: int = 0  # of those, what the next layer did route to (the rest was wasted)
    expert_split_forwards: int = 0  # forwards that routed more experts than cpu_memory holds, computed in groups
    passes: int = 0  # top-level forwards since enable / reset_stats
    s_per_pass: float = 0.0  # median seconds of the decode passes (one new position per row), else of all
    compute_seconds: float = 0.0  # time inside the units' forwards with weights bound (waits excluded)
    predicted_s_per_pass: float = 0.0  # what the plan predicted for a decode pass at batch 1 (0: no prediction)
    predicted_bound: str = ""  # what bounds that prediction: disk, compute or pcie

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Handle:
    """A model with offloading enabled. ``disable()`` (or leaving the ``with`` block) undoes it.

    Public: ``stats()``, ``reset_stats()``, ``disable()`` / ``close()``, the context manager,
    ``write_trace()``, ``predict()``, ``prediction``, ``why_no_prediction`` and ``closed``. What
    ``enable`` built (the store, the prefetcher, the stagers, the hooks) is the handle's own.
    """

    def __init__(self, model: nn.Module, store: Store, prefetcher: Prefetcher, hooks: list[UnitHook],
                 plans: list[UnitPlan], kind: str, temp_store: bool, stagers: list[Stager],
                 accelerate_state: list[tuple[Any, bool, Any]], restore: dict[int, torch.Tensor],
                 silenced: list[tuple[nn.Module, Any]] | None = None,
                 shared: list[tuple[nn.Module, str, bool, torch.Tensor]] | None = None,
                 tracer: Tracer | None = None, trace_path: str | None = None, *, experts: Any = None,
                 gpu_experts: Any = None,
                 prediction: _tune.Prediction | None = None, tuning: dict[str, Any] | None = None):
        self._model, self._store, self._prefetcher, self._hooks, self._plans = model, store, prefetcher, hooks, plans
        self._kind, self._temp_store, self._stagers = kind, temp_store, stagers
        self._accelerate_state = accelerate_state
        self._silenced = silenced or []
        self._restore = restore
        self._shared = shared or []
        self._tracer, self._trace_path = tracer, trace_path
        self._experts = experts  # the expert cache, when routed experts are read on routing
        self._gpu_experts = gpu_experts  # the experts' GPU tier's cache (routed experts on a GPU)
        self.prediction = prediction  # what enable predicted for a decode pass at batch 1 (None: nothing measured)
        self._tuning = tuning or {}  # what a prediction at another batch size needs
        clock = next((st.backend for st in (stagers or []) if hasattr(st, "backend")), None)
        # the units' hooks, not their experts modules' (which run inside a unit: counted in its time already)
        self._meter = _measure.PassMeter([h for h in hooks if type(h) is UnitHook],
                                         lambda: self._prefetcher.stats().wait_seconds, clock)
        self._root_hooks = [model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
                            model.register_forward_hook(self._root_post, always_call=True)]
        streamed = [b for h in hooks for b in h.bindings]
        self._cast_guards = guard_casts(model, streamed)
        self._watched = watch_streamed(streamed)
        # whether a forward's weights are gone once it returns (a backward through it cannot work): not where
        # every unit computes from its own RAM-tier buffer, kept between forwards
        self._frees_weights = any(not h.keeps_weights for h in hooks)
        self._lock = threading.Lock()
        self._forward_thread: int | None = None  # the thread whose forward the root pre-hook last let in
        self.closed = False
        self._final: Stats | None = None  # stats() as they stood at disable()
        for h in hooks:  # a unit module the user still holds keeps its handle (and the prefetcher) alive
            h.handle = self
        try:  # `offload cache clean` keeps what this handle reads
            self._in_use = hold(store.path, cache_dir())
        except OffloadError:  # no cache folder can be made: no store of this handle is in it
            self._in_use = None
        # dropped without disable() (the model and its handle garbage together): the reader threads, open
        # files and a temporary store must not outlive them. Holds no reference to the handle or the model.
        self._finalizer = weakref.finalize(self, _abandoned, prefetcher, list(stagers),
                                           store.path if temp_store else None, self._in_use, self._watched)

    def _attach(self) -> None:
        """Make this the model's handle (``disable(model)`` finds it), disabled at exit if still open."""
        self._model._offload_handle = self  # type: ignore[assignment]
        _live_handles.add(self)

    def _root_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if _compiling():  # torch.compile: run as uncompiled (hooks.eagerly)
            return eagerly(Handle._root_pre, self, module, args, kwargs)
        # A new top-level forward: a unit still bound by this thread was left by an interrupted forward
        # (KeyboardInterrupt skips post-hooks) and is unbound, so its staging buffer returns to the ring;
        # one another thread is computing in is an error (BoundUnits)
        for units in {id(h.bound_units): h.bound_units for h in self._hooks}.values():
            units.claim(f"{type(module).__name__} (offload-enabled)")
        self._forward_thread = threading.get_ident()
        self._meter.start(args, kwargs)

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if _compiling():
            return eagerly(Handle._root_post, self, module, args, output)
        if self._forward_thread != threading.get_ident():
            return  # the pre-hook refused this call (always_call runs us anyway)
        self._meter.end(failed=sys.exc_info()[1] is not None)
        if self._frees_weights and torch.is_grad_enabled() and sys.exc_info()[1] is None:
            _refuse_backward(output, type(module).__name__)
        if sys.exc_info()[1] is not None:  # the forward raised: out of memory outside the units gives memory back too
            for stager in self._stagers:
                on_oom = getattr(stager, "on_oom", None)
                if on_oom is not None:
                    on_oom("out of memory in the model's forward")

    def stats(self) -> Stats:
        """What the runtime did since ``enable`` (or ``reset_stats``); after ``disable``, as it stood then."""
        final = self._final
        if final is not None:
            return dataclasses.replace(final)
        s = self._prefetcher.stats()
        tier = self._prefetcher.ram_tier
        return Stats(
            bytes_read=s.bytes_read, read_seconds=s.read_seconds, wait_seconds=s.wait_seconds,
            units_loaded=s.units_loaded, hits=s.hits, misses=s.misses, ram_tier_hits=s.ram_tier_hits,
            units_in_flight=s.units_in_flight, verified_units=s.verified_units, verify_seconds=s.verify_seconds,
            streamed_units=len(self._prefetcher.units) - len(tier) - len(self._prefetcher.elsewhere),
            ram_tier_units=len(tier), ring_bytes=self._prefetcher.config.ring_bytes,
            ram_tier_bytes=sum(b.nbytes for b in tier.values()),
            prefetch=max(1, min(self._prefetcher.depth, self._prefetcher.config.ring_slots - 1)),
            reader=_reader_name(self._prefetcher.reader), store=self._store.path,
            **({"expert_hits": self._experts.hits, "expert_misses": self._experts.misses,
                "expert_bytes_read": self._experts.bytes_read, "expert_cache_bytes": self._experts.used,
                "expert_predicted_bytes": self._experts.predicted_bytes,
                "expert_predicted_used_bytes": self._experts.predicted_used_bytes,
                "expert_split_forwards": self._experts.split_forwards}
               if self._experts is not None else {}),
            **({"expert_gpu_hits": self._gpu_experts.hits, "expert_gpu_bytes": self._gpu_experts.used}
               if self._gpu_experts is not None else {}),
            passes=self._meter.passes, s_per_pass=self._meter.s_per_pass(),
            compute_seconds=self._meter.compute_seconds,
            predicted_s_per_pass=self.prediction.s_per_pass if self.prediction else 0.0,
            predicted_bound=self.prediction.bound if self.prediction else "")

    def reset_stats(self) -> None:
        if not self.closed:
            self._prefetcher.reset_stats()
            for cache in (self._experts, self._gpu_experts):
                if cache is not None:
                    cache.reset()
            self._meter.reset()

    def write_trace(self, path: str | os.PathLike[str] | None = None) -> str:
        """Write the trace recorded so far (``enable(trace=...)``) as Chrome trace JSON; returns the path."""
        if self._tracer is None:
            raise OffloadError("this handle records no trace: enable(model, trace='trace.json') to record one")
        target = path if path is not None else self._trace_path
        assert target is not None
        return self._tracer.write(target)

    def disable(self) -> None:
        """Stop the reader threads, free the buffers, remove the hooks and restore the model. Idempotent.

        NOTE (shutdown order, the only place it is written): hooks first, so no new forward can lease a
        buffer; then bound units are unbound (their leases go back); then the stagers (CUDA: the copy
        stream is synchronised, so no DMA still reads a host buffer); then the prefetcher (queued reads
        are abandoned, reader threads finish their current read and are joined, so nothing writes into
        a buffer; only then are ring and RAM-tier buffers freed); then the model's own state (Accelerate
        hooks, the user's Parameters, restored through the files the prefetcher still holds open); then
        those files; last the temporary store.
        """
        with self._lock:
            if self.closed:
                return
            try:  # what stats() answers from now on (the prefetcher and its buffers go)
                self._final = self.stats()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error must not stop the teardown below
                log.warning("offload: the handle's stats could not be read at disable (%s); they read as zero", e)
                zero = {f.name: 0 for f in dataclasses.fields(Stats) if f.default is dataclasses.MISSING}
                self._final = Stats(**{**zero, "prefetch": self._prefetcher.depth,
                                       "reader": _reader_name(self._prefetcher.reader), "store": self._store.path})
            self.closed = True
        self._finalizer.detach()
        errors: list[Exception] = []  # a failing step (a CUDA error, a damaged file) must not skip the rest

        def step(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - re-raised after the whole shutdown
                errors.append(e)
        for rh in self._root_hooks:
            rh.remove()
        for module, guard in self._cast_guards:
            guard.remove(module)
        unwatch_streamed(self._watched)
        for h in self._hooks:
            h.remove()
        step(self._save_compute)
        for h in self._hooks:
            step(h.reset)
        for stager in self._stagers:
            step(stager.close)
        step(self._prefetcher.close, True)  # its files stay open for the restore below (Store.pin)
        step(self._store.save_checksums)  # read in place: what first reads recorded, checked by later runs
        for hook, offload, weights_map in self._accelerate_state:
            hook.offload, hook.weights_map = offload, weights_map
        for module, hook in self._silenced:
            module._hf_hook = hook
        unload_resident(self._shared)  # Accelerate's placeholders for the shared tensors
        if self._restore:
            step(self._restore_weights)  # a damaged unit: finish the shutdown, then say which weights are lost
        for h in self._hooks:  # what the module held before (Accelerate's placeholders)
            for b in h.bindings:
                if id(b) not in self._restore:
                    (b.owner._parameters if b.is_param else b.owner._buffers)[b.attr] = b.original
        step(self._prefetcher.close_files)
        if getattr(self._model, "_offload_handle", None) is self:
            del self._model._offload_handle
        if self._kind == "module":
            _refuse_weightless_forward(self._model)
        if self._in_use is not None:
            os.close(self._in_use)
        if self._temp_store:
            shutil.rmtree(self._store.path, ignore_errors=True)
        _live_handles.discard(self)
        if self._tracer is not None and self._trace_path is not None:
            step(self._tracer.write, self._trace_path)
        if errors:
            raise errors[0]

    def _save_compute(self) -> None:
        """Cache the decode compute measured in this run (per batch size), so the next plan of this store
        predicts from it rather than from a kernel estimate. Host timing measures CPU compute only. A
        disk-bound run also tells the disk's profile how far its passes were from the prediction."""
        self._observe_disk()
        if not self._tuning.get("store_id") or any(p.device.type != "cpu" for p in self._plans):
            return
        for batch in self._meter.decode:
            c = self._meter.compute(batch)
            if c is not None:
                try:
                    _measure.save_compute(self._tuning["store_id"], batch, "cpu", c)
                except (OSError, OffloadError) as e:  # a cache that cannot be written only costs a re-measure
                    log.debug("offload: tuning cache not written: %s", e)

    def _observe_disk(self) -> None:
        """Measured / predicted of this run's decode passes, into the disk profile (``DiskProfile.drift``).
        Only where the model covers what the run did, so that the ratio is the disk's: on the CPU (a GPU's
        compute is not modelled), without routed experts (their reads are not in the prediction), with
        two or more decode passes at one batch size predicted from this run's own compute, and only when
        the profile alone (no drift) says the pass is disk-bound."""
        t = self._tuning
        if t.get("disk") is None or t.get("device") != "cpu" or self._experts is not None or len(self._meter.decode) != 1:
            return
        batch = next(iter(self._meter.decode))
        measured = self._meter.compute(batch)
        if measured is None or len(measured.unit_s) != len(t["sizes"]):
            return
        p = _tune.predict_plan({**t, "disk": dataclasses.replace(t["disk"], observed=[])}, batch, measured)
        s = self._meter.s_per_pass()
        if p.bound != "disk" or not s or not p.s_per_pass:
            return
        try:
            _measure.observe_disk(t["disk"], s / p.s_per_pass)
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written (or read) only costs accuracy
            log.debug("offload: disk observation not written: %s", e)

    def predict(self, batch: int = 1) -> _tune.Prediction | None:
        """Seconds per decode pass at ``batch`` rows, as the plan models them (``None``: nothing measured
        to predict from; ``why_no_prediction`` says why). Compute comes from this run's decode passes when it has seen some, else the
        tuning cache, else a kernel estimate."""
        t = self._tuning
        if not t or t.get("disk") is None:
            return None
        measured = self._meter.compute(batch) if t.get("device") == "cpu" else None  # host clocks time CPU work only
        return _tune.predict_plan(t, batch, measured)

    @property
    def why_no_prediction(self) -> str:
        return self._tuning.get("why", "") if self._tuning else "prefetch was given: no model of the disk was consulted"

    def _restore_weights(self) -> None:
        """Give a plain module its streamed weights back, read from the store (their only copy now)."""
        damaged = []
        for h in self._hooks:
            rec = h.record
            try:
                data = self._store.read_verified(rec)
            except (ChecksumError, StoreError, OSError):
                damaged.append(f"{self._store.root if rec.extents else self._store.file_path(rec)} (unit {rec.name})")
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
        state = "closed" if self.closed else f"{len(self._hooks)} units, prefetch={self._prefetcher.depth}"
        return f"<offload.Handle {state} store={self._store.path!r}>"


def _reader_name(reader: Any) -> str:
    return reader.name + ("+bounce" if getattr(reader, "bounce", False) else "")


def _refuse_backward(output: Any, model: str, depth: int = 0) -> None:
    """A forward run with gradients on: its streamed weights were emptied as each unit finished, so a
    backward through it failed deep in autograd (``The size of tensor a (0) must match ...``). A hook on
    each output tensor that carries a graph says why instead, before autograd reaches a unit."""
    if isinstance(output, torch.Tensor):
        if output.grad_fn is not None:
            def refuse(_: torch.Tensor) -> None:
                raise OffloadError(f"backward through a forward of {model} with offload enabled: offload streams "
                                   f"weights for inference, and each unit's were freed when its forward ended. Run "
                                   f"forwards under torch.no_grad() or torch.inference_mode(); to train, "
                                   f"offload.disable(model) first")
            output.register_hook(refuse)
    elif depth < 3 and isinstance(output, dict):
        for v in output.values():
            _refuse_backward(v, model, depth + 1)
    elif depth < 3 and isinstance(output, (tuple, list)):
        for v in output:
            _refuse_backward(v, model, depth + 1)


def _refuse_weightless_forward(model: nn.Module) -> None:
    """After ``disable``, a model whose streamed weights were never in memory (built on meta: ``offload.load``,
    ``enable(model, store=...)``) holds meta placeholders again; its forward failed deep in torch ("Tensor on
    device cpu is not on the expected device meta"). Now it says why, until it is enabled again."""
    def on_meta() -> str | None:
        return next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                     if t.device.type == "meta"), None)
    if on_meta() is None:
        return

    def refuse(module: nn.Module, args: Any) -> None:
        meta = on_meta()
        # enabled again, or given its weights (load_state_dict(assign=True), to_empty + load, a dispatch)
        if getattr(module, "_offload_handle", None) is not None or meta is None:
            hook.remove()
            return
        raise OffloadError(f"{type(module).__name__} was disabled and its weights are not in memory ({meta} is on "
                           f"the meta device: the model was built on meta, by offload.load or for enable(model, "
                           f"store=...)): load it again, or enable(model, store=STORE) to stream them again")
    hook = model.register_forward_pre_hook(refuse)


def _abandoned(prefetcher: Prefetcher, stagers: list[Stager], temp_store: str | None, in_use: int | None,
               watched: list[Any]) -> None:
    """A handle collected without ``disable()``: stop its reader threads, free its buffers, close its files,
    remove its temporary store, let the submodules that outlive it take weights again. In a thread of its own:
    the collection may run on a reader thread, which cannot join itself."""
    unwatch_streamed(watched)
    def close() -> None:
        for stager in stagers:
            with contextlib.suppress(Exception):
                stager.close()
        with contextlib.suppress(Exception):
            prefetcher.close()
        if in_use is not None:
            os.close(in_use)
        if temp_store is not None:
            shutil.rmtree(temp_store, ignore_errors=True)
    try:
        threading.Thread(target=close, name="offload-abandoned", daemon=True).start()
    except RuntimeError:  # interpreter shutting down: no new threads
        close()


@atexit.register
def _close_all() -> None:
    for h in list(_live_handles):
        with contextlib.suppress(Exception):
            h.disable()


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
