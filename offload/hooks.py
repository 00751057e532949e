"""Forward hooks that give a unit its weights for exactly the duration of its forward.

pre-hook:  bytes = prefetcher.acquire(i); bytes = stager.stage(i, bytes); bind every tensor as a view
post-hook: unbind (tensors point at their Offloaded stand-ins again); stager.done(i); prefetcher.release(i)

Binding swaps objects in ``module._parameters`` / ``_buffers`` rather than replacing
``module.forward``, so the model's own code runs unchanged, and code that reads a child's weight
directly inside the unit (``self.dense.weight``) sees the real tensor. Between forwards a streamed
tensor is an ``Offloaded`` stand-in: no storage, the right shape, dtype and device, and a use from
outside the unit (a parent reading ``self.blocks[0].weight``) reads the real values from the store.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from .prefetch import Prefetcher
from .store import UnitRecord

log = logging.getLogger("offload")

_EMPTY: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared zero-element tensor: what a parameter's ``.data`` becomes between forwards.

    ``.data`` cannot change device type (cpu↔meta↔cuda), so it must be on the parameter's device.
    """
    t = _EMPTY.get((dtype, device))
    if t is None:
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

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool, name: str,
                device: torch.device, load: Any) -> Offloaded:
        t = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=dtype, device="meta"), requires_grad)
        t._offload_name, t._offload_device, t._offload_load = name, device, load
        t._offload_warned = False
        return t

    def materialize(self) -> torch.Tensor:
        if not self._offload_warned:
            self._offload_warned = True
            log.warning("offload: %s was used outside its unit's forward; it is read from disk on every such use. "
                        "If this is on the hot path, make the module that uses it a unit (units=[...]).",
                        self._offload_name)
        return self._offload_load()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA or func in _DEVICE:
            with torch._C.DisableTorchFunctionSubclass():
                if func in _DEVICE:
                    return _DEVICE[func](args[0]._offload_device)
                return func(*args, **kwargs)
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: a.materialize() if isinstance(a, Offloaded) else a, (args, kwargs))
        return func(*args, **kwargs)

    def __repr__(self, **kwargs: Any) -> str:  # no disk read to print a parameter list
        return f"Offloaded({self._offload_name}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __reduce_ex__(self, proto: Any) -> Any:  # pickling / deepcopy: the real values
        return self.materialize().__reduce_ex__(proto)

    def __deepcopy__(self, memo: Any) -> torch.Tensor:
        return self.materialize()


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

    def bind(self, data: torch.Tensor) -> None:
        view = data[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)
        if self.is_param:
            assert self.live is not None
            self.live.data = view
            self.owner._parameters[self.attr] = self.live  # type: ignore[assignment]
        else:
            self.owner._buffers[self.attr] = view

    def unbind(self) -> None:
        if self.is_param:
            self.owner._parameters[self.attr] = self.stand_in  # type: ignore[assignment]
            assert self.live is not None
            self.live.data = _empty(self.dtype, self.live.device)
        else:
            self.owner._buffers[self.attr] = self.stand_in


class UnitHook:
    """The pre/post pair for one unit, registered with ``register_forward_pre_hook``/``register_forward_hook``."""

    def __init__(self, index: int, module: nn.Module, record: UnitRecord, bindings: list[Binding],
                 prefetcher: Prefetcher, stager: Any):
        self.index, self.module, self.record, self.bindings = index, module, record, bindings
        self.prefetcher, self.stager = prefetcher, stager
        self.bound = False
        self.handles: list[Any] = []

    def register(self) -> None:
        self.handles = [self.module.register_forward_pre_hook(self.pre),
                        self.module.register_forward_hook(self.post, always_call=True)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def pre(self, module: nn.Module, args: Any) -> None:
        if self.bound:  # re-entered (a unit calling itself): already bound
            return
        data = self.prefetcher.acquire(self.index)
        try:
            data = self.stager.stage(self.index, data)
            for b in self.bindings:
                b.bind(data)
        except BaseException:
            for b in self.bindings:
                b.unbind()
            self.prefetcher.release(self.index)
            raise
        self.bound = True

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.bound:
            return
        self.unbind()

    def unbind(self) -> None:
        for b in self.bindings:
            b.unbind()
        self.bound = False
        self.stager.done(self.index)
        self.prefetcher.release(self.index)


class CpuStager:
    """On the CPU the host buffer is the compute buffer: parameters are views into it, no copy."""

    def stage(self, index: int, data: torch.Tensor) -> torch.Tensor:
        return data

    def done(self, index: int) -> None:
        pass

    def close(self) -> None:
        pass
