"""Forward hooks that give a unit its weights for exactly the duration of its forward.

pre-hook:  bytes = stager.stage(i)   (a leased host buffer on the CPU, a device slot on CUDA); bind views
post-hook: unbind (tensors point at their Offloaded stand-ins again); stager.done(i)

A unit whose forward calls itself (directly or through a child) is bound once, by the outermost
call, and unbound when that call returns: the hooks count the depth.

Binding swaps objects in ``module._parameters`` / ``_buffers`` rather than replacing
``module.forward``, so the model's own code runs unchanged, and code that reads a child's weight
directly inside the unit (``self.dense.weight``) sees the real tensor. Between forwards a streamed
tensor is an ``Offloaded`` stand-in: no storage, the right shape, dtype and device, and a use from
outside the unit (a parent reading ``self.blocks[0].weight``) reads the real values from the store.
The module always holds the stand-in between forwards; the Parameter object bound during them (the
user's own) is emptied, except in a CPU unit of the RAM tier, whose buffer is its own for the handle's
life: there it keeps its view until ``disable``, so the next forward only puts it back (issue 17).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import threading
import time
import weakref
from typing import Any

import torch
from torch import nn

from .errors import OffloadError
from .store import UnitRecord
from .trace import COMPUTE_TRACK, Tracer

log = logging.getLogger("offload")

_compiling = torch.compiler.is_compiling


@torch.compiler.disable
def eagerly(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` outside ``torch.compile``'s tracing. A hook that binds streamed weights cannot be traced
    (dynamo would meet the stand-ins, which have no storage), so under ``torch.compile`` every hook asks
    ``_compiling()`` first (0.1 us; wrapping each hook in ``torch.compiler.disable`` would cost ~1 us per call
    uncompiled) and comes here: a graph break, and the hook runs as it does uncompiled. The code between a
    unit's hooks, its forward, is compiled."""
    return fn(*args)


# The (module, name) slots whose tensor is streamed, per enabled model: assigning one a new tensor while enabled
# (``module.weight = nn.Parameter(...)``, ``register_buffer``) was silently undone at the unit's next forward,
# which binds its own; torch's global registration hooks refuse it instead, at no cost to a forward.
_STREAMED: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()
_REGISTRATION_HOOKS: list[Any] = []


def _refuse_replacing(module: nn.Module, name: str, value: Any) -> None:
    slots = _STREAMED.get(module)
    if slots and name in slots:
        raise OffloadError(
            f"{type(module).__name__}.{name} is streamed by offload while it is enabled: a tensor assigned to it "
            f"would be replaced by the store's at the unit's next forward. Call offload.disable(model), assign, "
            f"then enable again (the store is rebuilt from the model's new weights)")


def watch_streamed(bindings: list[Binding]) -> list[tuple[weakref.ref[nn.Module], str]]:
    """Refuse assignments to these bindings' slots until ``unwatch_streamed`` of what this returns (``disable``,
    or the handle's finalizer: a submodule kept after its model was dropped without ``disable`` takes weights
    again). The slots are held weakly, so the finalizer keeps no module alive."""
    if not _REGISTRATION_HOOKS:
        from torch.nn.modules import module as _m
        _REGISTRATION_HOOKS.extend([_m.register_module_parameter_registration_hook(_refuse_replacing),
                                    _m.register_module_buffer_registration_hook(_refuse_replacing)])
    for b in bindings:
        slots = _STREAMED.setdefault(b.owner, {})
        slots[b.attr] = slots.get(b.attr, 0) + 1
    return [(weakref.ref(b.owner), b.attr) for b in bindings]


def unwatch_streamed(watched: list[tuple[weakref.ref[nn.Module], str]]) -> None:
    for ref, attr in watched:
        owner = ref()
        slots = _STREAMED.get(owner) if owner is not None else None
        if slots is not None and attr in slots:
            slots[attr] -= 1
            if not slots[attr]:
                del slots[attr]


_EMPTY: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared zero-element tensor: what a parameter's ``.data`` becomes between forwards.

    ``.data`` cannot change device type (cpu↔meta↔cuda), so it must be on the parameter's device.
    """
    t = _EMPTY.get((dtype, device))
    if t is None:
        with torch.inference_mode(False):  # made inside inference mode, it would be an inference tensor for good
            t = _EMPTY[(dtype, device)] = torch.empty(0, dtype=dtype, device=device)
    return t


def _getters(*names: str) -> set[Any]:
    """The functions ``__torch_function__`` receives for these Tensor attributes (property getters too)."""
    out = set()
    for n in names:
        a = getattr(torch._C.TensorBase, n, None)
        if a is not None:
            out.add(a.__get__ if hasattr(a, "__get__") and not callable(a) else a)
    return out


_METADATA = _getters("shape", "dtype", "ndim", "requires_grad", "is_leaf", "grad", "layout", "size", "dim", "numel",
                     "nelement", "element_size", "is_floating_point", "is_complex", "__len__", "stride", "is_contiguous",
                     "is_sparse", "is_quantized", "is_nested")
_DEVICE = {torch._C.TensorBase.device.__get__: lambda d: d,  # type: ignore[attr-defined]
           torch._C.TensorBase.is_meta.__get__: lambda d: d.type == "meta",  # type: ignore[attr-defined]
           torch._C.TensorBase.is_cuda.__get__: lambda d: d.type == "cuda",  # type: ignore[attr-defined]
           torch._C.TensorBase.is_cpu.__get__: lambda d: d.type == "cpu",  # type: ignore[attr-defined]
           torch._C.TensorBase.get_device: lambda d: d.index if d.type == "cuda" else -1}


_FLAGS = _getters("requires_grad_")  # changes the stand-in's own flag; Binding.bind passes it on
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__setitem__",
                    "__set__"}


def _written_stand_in(func: Any, args: Any, kwargs: dict[str, Any]) -> Offloaded | None:
    """The stand-in ``func`` would write into, if any: ``out=``, or the first tensor argument of an
    in-place function, whether a method (``w.add_``) or a function given it by keyword
    (``nn.init.constant_(tensor=w, ...)`` reaches us with no positional arguments)."""
    if isinstance(kwargs.get("out"), Offloaded):
        return kwargs["out"]
    first = args[0] if args else next((kwargs[k] for k in ("tensor", "input", "self") if k in kwargs), None)
    if not isinstance(first, Offloaded):
        return None
    name = getattr(func, "__name__", "")
    return first if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_")) else None


class Offloaded(torch.Tensor):
    """A streamed tensor between its unit's forwards: shape, dtype and device, but no storage.

    A bare meta tensor here would be a trap: ``x @ w.T`` with ``w`` on meta returns *uninitialised
    memory* on the CPU without an error (torch 2.13). So any operation on the stand-in that needs
    values (a parent module reading ``self.blocks[0].weight``; ``state_dict()``, which then holds
    every weight in RAM) gets the real tensor, read from the store for that operation, and a
    warning, once per tensor per ``enable``, that this is a disk read per use. Metadata (shape,
    dtype, device, numel, repr) is answered without reading. ``device`` is where the tensor
    computes (the original placeholder's ``meta`` for a model Accelerate dispatched, so its code
    sees what it expects).
    """

    _offload_name: str
    _offload_device: torch.device
    _offload_load: Any
    _offload_warned: bool
    _offload_grad: bool  # requires_grad, mirrored: reading it through __torch_function__ costs ~2 us per bind

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool, name: str,
                device: torch.device, load: Any) -> Offloaded:
        t = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=dtype, device="meta"), requires_grad)
        t._offload_name, t._offload_device, t._offload_load = name, device, load
        t._offload_warned = False
        t._offload_grad = requires_grad
        return t

    def materialize(self) -> torch.Tensor:
        """The real values, read from the store (a disk read per call; warns once)."""
        if not self._offload_warned:
            self._offload_warned = True
            log.warning("offload: %s was used outside its unit's forward; it is read from disk on every such use. "
                        "If this is on the hot path, make the module that uses it a unit (units=[...]).",
                        self._offload_name)
        return self._offload_load()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA or func in _DEVICE or func in _FLAGS:
            with torch._C.DisableTorchFunctionSubclass():
                if func in _DEVICE:
                    return _DEVICE[func](args[0]._offload_device)
                out = func(*args, **kwargs)
                if func in _FLAGS:  # requires_grad_(): the only way its flag changes (assignment is refused)
                    args[0]._offload_grad = args[0].requires_grad
                return out
        target = _written_stand_in(func, args, kwargs)
        if target is not None:
            raise OffloadError(
                f"{getattr(func, '__name__', func)} would modify {target._offload_name} in place, but it is streamed "
                f"from a read-only store while offload is enabled (the change would be lost at the next read). "
                f"Call offload.disable(model), change the weights, then enable again with a new store")
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: a.materialize() if isinstance(a, Offloaded) else a, (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self, **kwargs: Any) -> str:  # no disk read to print a parameter list
        return f"Offloaded({self._offload_name}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __reduce_ex__(self, proto: Any) -> Any:  # pickling / deepcopy: the real values
        return self.materialize().__reduce_ex__(proto)

    def __deepcopy__(self, memo: Any) -> torch.Tensor:
        return self.materialize()


_MAX_VIEWS = 16  # buffers a binding remembers views into (a unit meets a handful: ring slots, tiers)


@dataclasses.dataclass
class Binding:
    """One streamed tensor: where it lives in the module and in the unit's bytes."""
    owner: nn.Module
    attr: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stand_in: Offloaded  # installed between forwards
    original: torch.Tensor  # what the module held before enable (reinstalled by disable)
    live: torch.Tensor | None  # the Parameter object re-used across binds (keeps identity), or None for buffers
    # The typed view of this tensor in each buffer it has been bound from, by the buffer's address: a
    # unit is bound from one of a few fixed buffers (ring slots, its RAM-tier buffer, device slots), so
    # the slicing and two views are built once per buffer, not once per forward.
    views: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict, init=False, repr=False)
    # The view ``live.data`` holds now (None: the shared empty tensor). A unit whose buffer is its own for
    # the handle's life (the RAM tier) keeps it across forwards (``unbind(keep_data=True)``), so its next
    # bind skips the ``.data`` swap and back, two thirds of a binding's cost (0.8 of 1.2 us in a loop).
    held: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def _view(self, data: torch.Tensor) -> torch.Tensor:
        """This tensor's typed view in a unit's bytes ``data``."""
        return data[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def _normal_view(self, data: torch.Tensor) -> torch.Tensor:
        """``_view`` made outside inference mode: a view made in it is an inference tensor, and views are kept
        (``views``, the hook's ``_kept``), so a later forward with grad mode on failed on them ("Inference
        tensors cannot be saved for backward"). A view of normal memory made outside it serves every mode."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self._view(data)
        return self._view(data)

    def view_in(self, data: torch.Tensor, keep: bool) -> torch.Tensor:
        """``keep``: ``data`` lives as long as the handle (host ring slots, the RAM tier, expert tables), so
        its view may be kept; a device slot or GPU-tier unit can be freed (given back on OOM) and is not."""
        if not keep:
            return self._normal_view(data)
        key = data.data_ptr()
        view = self.views.get(key)
        if view is None:
            view = self._normal_view(data)
            if len(self.views) >= _MAX_VIEWS:
                self.views.clear()
            self.views[key] = view
        return view

    def bind(self, data: torch.Tensor, keep: bool = False) -> None:
        view = self.view_in(data, keep)
        if self.is_param:
            live = self.live
            assert live is not None
            if view is not self.held:
                live.data = view
                self.held = view
            if live.requires_grad != self.stand_in._offload_grad:  # requires_grad_() between forwards
                live.requires_grad_(self.stand_in._offload_grad)
            self.owner._parameters[self.attr] = live  # type: ignore[assignment]
        else:
            self.owner._buffers[self.attr] = view

    def unbind(self, keep_data: bool = False) -> None:
        """The module holds the stand-in again. ``keep_data``: the user's Parameter keeps pointing at the
        bound view (only for a buffer that is the unit's own for the handle's life; a ring slot is the next
        unit's, so a Parameter left on it would alias that unit's bytes)."""
        if self.is_param:
            self.owner._parameters[self.attr] = self.stand_in  # type: ignore[assignment]
            if not keep_data:
                self.release()
        else:
            self.owner._buffers[self.attr] = self.stand_in

    def release(self) -> None:
        """The Parameter holds no bytes (the shared empty tensor)."""
        if self.live is not None:
            self.live.data = _empty(self.dtype, self.live.device)
        self.held = None


@dataclasses.dataclass
class QuantBinding(Binding):
    """A linear weight stored quantized: bound as a ``quant.QuantizedWeight`` over its parts' views, which
    ``F.linear`` (so the module's unchanged forward) dispatches to the int8/int4 kernel."""
    parts: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    scheme: str = ""
    group_size: int = 64
    transposed: bool = False
    layout: str | None = None  # int4 packing of the machine that wrote the store (repacked if not this one's)
    weight: Any = None  # one QuantizedWeight per parameter, re-pointed at each forward's buffer

    def bind(self, data: torch.Tensor, keep: bool = False) -> None:
        views = {k: data[o:o + n].view(dt).view(sh) for k, (o, n, dt, sh) in self.parts.items()}
        if self.weight is None:
            from .quant import from_stored
            self.weight = from_stored(views, self.shape, self.dtype, self.scheme, self.group_size,
                                      transposed=self.transposed, layout=self.layout)
        else:
            self.weight.rebind(views, layout=self.layout)
        self.owner._parameters[self.attr] = self.weight

    def unbind(self, keep_data: bool = False) -> None:  # always released: the weight re-points each forward
        self.owner._parameters[self.attr] = self.stand_in  # type: ignore[assignment]
        if self.live is not None:  # the user's float Parameter keeps no storage (as an unquantized one)
            self.live.data = _empty(self.dtype, self.live.device)
        if self.weight is not None:
            self.weight.release()  # a reference kept past the forward raises instead of reading a reused buffer


class ApplyGuard:
    """A module's ``_apply`` while offload is enabled: what ``.to()``, ``.half()``, ``.float()`` and ``.cuda()``
    call. torch's own casts the module's tensors one by one; reaching the first streamed one it fails (its
    stand-in refuses in-place changes), after it had already cast those before it (the embeddings): a
    refused ``model.half()`` left the model in mixed dtypes, and the user's weights changed for good. So
    the streamed tensors are asked first, with an empty tensor of their dtype where they compute: a call
    that would change one is refused before anything is touched; one that changes none of them (a no-op
    ``.to("cpu")``, ``.float()`` on fp32 weights) is applied to the rest, the stand-ins held aside."""

    def __init__(self, module: nn.Module, bindings: list[Binding]):
        self.bindings = bindings  # the streamed tensors under ``module``
        self.kind = type(module)
        self.module = weakref.ref(module)  # the guard is the module's own attribute: no cycle through it

    def __call__(self, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
        for b in self.bindings:
            probe = torch.empty(0, dtype=b.dtype, device=b.stand_in._offload_device)
            try:
                out = fn(probe)
            except Exception as e:  # e.g. a copy out of Accelerate's meta placeholders: refused all the same
                raise OffloadError(f"{b.stand_in._offload_name} is streamed from offload's store; this call cannot "
                                   f"apply to it ({type(e).__name__}: {e}), so nothing was changed. Disable offload "
                                   f"first") from e
            if isinstance(out, torch.Tensor) and (out.dtype != probe.dtype or out.device != probe.device):
                raise OffloadError(
                    f"{b.stand_in._offload_name} is streamed from offload's store as {b.dtype} on "
                    f"{probe.device}; this call would make it {out.dtype} on {out.device}, so nothing was changed. "
                    f"Cast or move the model before offload.enable (or load it with dtype=), or disable first")
        held = []
        for b in self.bindings:
            table = b.owner._parameters if b.is_param else b.owner._buffers
            if table.get(b.attr) is b.stand_in:
                held.append((table, b.attr, b.stand_in))
                table[b.attr] = None
        try:
            return self.kind._apply(self.module(), fn, *args, **kwargs)
        finally:
            for table, attr, stand_in in held:
                table[attr] = stand_in

    def install(self, module: nn.Module) -> None:
        module._apply = self  # type: ignore[method-assign]

    def remove(self, module: nn.Module) -> None:
        if module.__dict__.get("_apply") is self:
            del module.__dict__["_apply"]


def guard_casts(model: nn.Module, bindings: list[Binding]) -> list[tuple[nn.Module, ApplyGuard]]:
    """An ``ApplyGuard`` on ``model`` and on every module under it that holds streamed tensors below it, so
    that ``.half()`` on the model or on any of its parts is checked first."""
    owners = {id(b.owner) for b in bindings}
    out = []
    for module in model.modules():
        below = {id(m) for m in module.modules()}
        if below & owners:
            guard = ApplyGuard(module, [b for b in bindings if id(b.owner) in below])
            guard.install(module)
            out.append((module, guard))
    return out


def _owns_buffer(stager: Any, index: int) -> bool:
    """Whether every forward of unit ``index`` computes from the same buffer, owned by the prefetcher's RAM
    tier for the handle's life (a CPU unit in the RAM tier). Its Parameters may then keep their views
    between forwards: no ring slot is aliased, and ``remove`` drops them before the tier is freed. A CUDA
    stager's slots and GPU tier can be freed or reused, and an experts table's contents are evicted, so
    those are not."""
    from .transfer import CpuStager
    return type(stager) is CpuStager and index in stager.prefetcher.ram_tier


_CALL = nn.Module._call_impl.__code__  # the frame of a module's call, hooks and forward inside it


def _calls_on_stack(frame: Any) -> list[int]:
    """The ``id`` of each module whose call is on this stack, innermost first (one per call)."""
    out = []
    while frame is not None:
        if frame.f_code is _CALL:
            out.append(id(frame.f_locals.get("self")))
        frame = frame.f_back
    return out


class BoundUnits:
    """Which thread has which unit bound, shared by a handle's hooks.

    A forward that entered a unit and never left it (``KeyboardInterrupt`` skips post-hooks: ``always_call``
    catches ``Exception`` only) left the unit bound, holding its ring slot; a forward of a second thread
    would lease, bind and unbind units under the first. So before a thread binds a unit (and at the
    model's own call) ``claim`` looks at the units bound now: none between the units of a forward, so
    that costs a dict write and a length. A unit this thread bound whose call is no longer on its stack was left by an
    interrupted forward, and is unbound; one that another thread is inside is an error, raised before
    anything is touched.
    """

    def __init__(self) -> None:
        self.threads: dict[UnitHook, int] = {}  # bound (or being bound) unit -> the thread binding it
        self.lock = threading.Lock()  # one check at a time

    def claim(self, entering: UnitHook | str, hook: UnitHook | None = None) -> None:
        """Record ``hook`` as this thread's before it stages anything, then check (see the class).
        ``entering``: what is being called, named in the error (the unit's hook, or the model's name).

        Claimed first and checked after, so of two threads entering at once each sees the other's claim
        (both are refused: they were not to run together). With nothing else bound, the usual case
        between units, there is no check and no lock: a dict write and a length."""
        me = threading.get_ident()
        threads = self.threads
        if hook is not None:
            threads[hook] = me
            if len(threads) == 1:
                return
        elif not threads:
            return
        with self.lock:
            try:
                self._check(entering, me, hook)
            except BaseException:
                if hook is not None:
                    threads.pop(hook, None)
                raise

    def release(self, hook: UnitHook) -> None:
        self.threads.pop(hook, None)

    def _check(self, entering: UnitHook | str, me: int, claimed: UnitHook | None) -> None:
        stacks: dict[int, set[int]] = {}
        for hook, thread in list(self.threads.items()):
            if hook is claimed:
                continue
            if thread not in stacks:
                frame = sys._getframe(2) if thread == me else sys._current_frames().get(thread)
                stacks[thread] = set(_calls_on_stack(frame))
            if id(hook.module) not in stacks[thread]:
                hook.reset()  # its forward is over: interrupted, or its thread is gone
                self.threads.pop(hook, None)
            elif thread != me:
                what = entering if isinstance(entering, str) else f"unit {entering.record.name}"
                raise OffloadError(
                    f"{what} was called while another thread is in the forward of unit {hook.record.name}: "
                    f"an enabled model runs one forward at a time (its units share one staging ring). Call it "
                    f"from one thread, or send the requests to one offload.engine.Engine, which batches them")


class UnitHook:
    """The pre/post pair for one unit, registered with ``register_forward_pre_hook``/``register_forward_hook``.

    Module hooks, not a wrapper of ``module.forward``, although PyTorch's hooked-call path is about 2 us
    of a unit's cost (README, issue 17): with hooks, a pre-hook a user registers after ``enable`` sees
    the bound weights, a ``KeyboardInterrupt`` (which ``always_call`` does not catch) leaves the unit
    bound until the next call of a unit or of the model finds it (``BoundUnits``), and
    ``disable`` never has to put back a ``forward`` that Accelerate or the user may have wrapped since.
    A RAM-tier unit on the CPU then costs ``stage``/``done`` and two table writes per tensor (``_kept``).
    """

    def __init__(self, index: int, module: nn.Module, record: UnitRecord, bindings: list[Binding], stager: Any,
                 tracer: Tracer | None = None, bound_units: BoundUnits | None = None):
        self.index, self.module, self.record, self.bindings = index, module, record, bindings
        self.stager, self.tracer = stager, tracer
        self.bound_units = bound_units if bound_units is not None else BoundUnits()
        self._keep = getattr(stager, "host_buffers_only", False)  # views into its buffers may be kept (Binding)
        self._own = _owns_buffer(stager, index)  # its Parameters keep their views between forwards (Binding.held)
        # An own buffer with plain bindings: after the first bind, a forward only writes each tensor's
        # (module table, name) entry, the live Parameter (or the buffer's view) in and the stand-in back,
        # with no call per tensor. ``_kept`` lists those entries while the Parameters hold views of
        # ``_kept_data`` (None: bind in full). The tables are the modules' own dicts, looked up at the full
        # bind: were one replaced meanwhile, the unit would compute from stand-ins, read from the store.
        self._fast = self._own and all(type(b) is Binding for b in bindings)
        self._kept: list[tuple[dict[str, Any], str, torch.Tensor, Offloaded, torch.Tensor | None]] | None = None
        self._kept_data: torch.Tensor | None = None
        self._kept_at = 0
        self._t_bound = 0.0
        self._w_bound = 0.0
        prefetcher = getattr(stager, "prefetcher", None)
        self._waited = prefetcher.waited if prefetcher is not None else None  # reads waited for, in total
        self.compute_s = 0.0  # time inside the unit's forward, weights bound, waits inside it excluded: tune.py's
        self.depth = 0  # forwards of this unit in progress (>1: it called itself)
        self.handles: list[Any] = []
        self.handle: Any = None  # the offload handle this hook belongs to (kept alive while its module is)
        # Forwards that began binding / finished unbinding this unit: a ``state_dict()`` that overlapped one
        # (from another thread, or inside the forward) may hold views its next units overwrite (_state_dict_post)
        self.binds = self.unbinds = 0
        self._state_dicts: dict[int, tuple[int, int, bool]] = {}  # per thread: binds, unbinds, keep_vars at its start
        self._keys: list[tuple[str, Binding]] | None = None  # each binding's name under this unit's module

    @property
    def bound(self) -> bool:
        return self.depth > 0

    @property
    def keeps_weights(self) -> bool:
        """Whether its tensors keep their values after its forward (a CPU unit in the RAM tier, plain views)."""
        return self._fast

    def register(self) -> None:
        self.handles = [self.module.register_forward_pre_hook(self.pre),
                        self.module.register_forward_hook(self.post, always_call=True), *self._state_dict_hooks()]

    def _state_dict_hooks(self) -> list[Any]:
        # torch marks the post-hook with an attribute, which a bound method cannot take: a partial can
        return [self.module.register_state_dict_pre_hook(self._state_dict_pre),
                self.module.register_state_dict_post_hook(functools.partial(UnitHook._state_dict_post, self))]

    def _state_dict_pre(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        self._state_dicts[threading.get_ident()] = (self.binds, self.unbinds, keep_vars)

    def _state_dict_post(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
        """A ``state_dict()`` that overlapped a forward of this unit (a checkpoint thread during ``generate``, or
        a call inside the forward) may have collected the bound tensors: views of a ring slot the next units
        overwrite. Those entries are read from the store instead (``keep_vars``: the stand-ins). A unit in the
        RAM tier on the CPU computes from its own buffer, whose views stay right."""
        seen = self._state_dicts.pop(threading.get_ident(), None)
        if seen is None or self._fast:
            return
        binds, unbinds, keep_vars = seen
        if binds == unbinds == self.binds:
            return  # no forward of it bound its tensors meanwhile: the entries are the stand-ins' reads
        if self._keys is None:
            names = {id(m): n for n, m in module.named_modules()}
            self._keys = [((names[id(b.owner)] + "." if names[id(b.owner)] else "") + b.attr, b)
                          for b in self.bindings if id(b.owner) in names]
        for key, b in self._keys:
            if prefix + key in state_dict:
                state_dict[prefix + key] = b.stand_in if keep_vars else b.stand_in.materialize()

    def remove(self) -> None:
        """Take the hooks out, and the views kept into the handle's buffers with them, so that freeing the
        ring and the RAM tier (``disable``) frees their memory even while this object lives on."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self._kept = self._kept_data = None
        for b in self.bindings:
            if b.held is not None:
                b.release()
            b.views.clear()

    def pre(self, module: nn.Module, args: Any) -> None:
        if _compiling():
            return eagerly(UnitHook._pre_compiled, self, module, args)
        if self.depth and self.bound_units.threads.get(self) == threading.get_ident():
            if self.reentered(module):
                self.depth += 1  # re-entered (a unit calling itself): the outer call's binding serves
                return
            self.reset()  # bound by a forward of this thread that was interrupted in it
        self.bound_units.claim(self, self)
        try:
            data = self.stager.stage(self.index)
        except BaseException:
            self.bound_units.release(self)
            raise
        self.binds += 1
        try:
            kept = self._kept
            if kept is not None and (data is self._kept_data or data.data_ptr() == self._kept_at):
                for table, attr, value, stand_in, live in kept:  # the Parameters still hold their views
                    if live is not None and live.requires_grad != stand_in._offload_grad:  # requires_grad_()
                        live.requires_grad_(stand_in._offload_grad)
                    table[attr] = value
            else:
                keep = self._keep
                for b in self.bindings:
                    b.bind(data, keep)
                if self._fast:
                    self._kept = [(b.owner._parameters, b.attr, b.live, b.stand_in, b.live) if b.is_param else
                                  (b.owner._buffers, b.attr, b.view_in(data, keep), b.stand_in, None)
                                  for b in self.bindings]
                    self._kept_data, self._kept_at = data, data.data_ptr()
        except BaseException:
            self._kept = self._kept_data = None
            for b in self.bindings:
                b.unbind()
            self.unbinds += 1
            self.stager.done(self.index)
            self.bound_units.release(self)
            raise
        self.depth = 1
        self._w_bound = self._waited() if self._waited is not None else 0.0
        self._t_bound = time.perf_counter()

    def _pre_compiled(self, module: nn.Module, args: Any) -> None:
        """The pre-hook of a unit in a ``torch.compile``d model (``eagerly``). Refused where units compute on a
        GPU: CUDA graphs (``mode="reduce-overhead"``) would replay the first forward's slot addresses while the
        copies move on, and no GPU run has checked it; nothing is bound yet."""
        device = getattr(self.stager, "device", None)
        if device is not None and device.type != "cpu":
            raise OffloadError(
                f"torch.compile of a model whose offloaded units compute on {device} is not supported ({self.record.name} "
                f"would be the first): run the model uncompiled (a streamed forward waits on its reads, not on "
                f"Python), or enable it with device='cpu' to compile on the CPU")
        self.pre(module, args)

    def reentered(self, module: nn.Module) -> bool:
        """Whether this call of a unit this thread has bound is inside its own forward (a unit calling
        itself), not a new forward after one that was interrupted in it. Walks the stack: only ever asked of
        a bound unit."""
        return _calls_on_stack(sys._getframe(2)).count(id(module)) > 1

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if _compiling():
            return eagerly(UnitHook.post, self, module, args, output)
        if self.depth == 0 or self.bound_units.threads.get(self) != threading.get_ident():
            return  # the pre-hook failed, or refused another thread's call (always_call runs us anyway)
        self.depth -= 1
        if self.depth == 0:
            t = time.perf_counter()
            inside = self._waited() - self._w_bound if self._waited is not None else 0.0  # its experts' reads
            self.compute_s += t - self._t_bound - inside
            if self.tracer is not None:
                self.tracer.span(COMPUTE_TRACK, f"forward {self.record.name}", "forward", self._t_bound, t)
            self._unbind()

    def reset(self) -> None:
        """Unbind whatever an interrupted forward left bound (its post-hook never ran)."""
        if self.depth:
            self.depth = 0
            self._unbind()

    def _unbind(self) -> None:
        self.bound_units.release(self)
        kept = self._kept
        if kept is not None:
            for table, attr, _, stand_in, _ in kept:
                table[attr] = stand_in
        else:
            own = self._own
            for b in self.bindings:
                b.unbind(own)
        self.unbinds += 1
        self.stager.done(self.index)
