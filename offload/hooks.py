"""Forward hooks that give a unit its weights for exactly the duration of its forward.

pre-hook:  bytes = prefetcher.acquire(i); bytes = stager.stage(i, bytes); bind every tensor as a view
post-hook: unbind (parameters point at meta placeholders again); stager.done(i); prefetcher.release(i)

Binding swaps objects in ``module._parameters`` / ``_buffers`` rather than replacing
``module.forward``, so the model's own code runs unchanged, and code that reads a child's weight
directly inside the unit (``self.dense.weight``) sees the real tensor. Between forwards a streamed
parameter is a meta tensor: it holds no memory and any stray use fails loudly instead of silently
reading stale bytes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .prefetch import Prefetcher
from .store import UnitRecord

_EMPTY: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared zero-element tensor: what a parameter's ``.data`` becomes between forwards.

    ``.data`` cannot change device type (cpu↔meta↔cuda), so it must be on the parameter's device.
    """
    t = _EMPTY.get((dtype, device))
    if t is None:
        t = _EMPTY[(dtype, device)] = torch.empty(0, dtype=dtype, device=device)
    return t


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
    placeholder: torch.Tensor  # meta tensor with the right shape/dtype, installed between forwards
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
            self.owner._parameters[self.attr] = self.placeholder  # type: ignore[assignment]
            assert self.live is not None
            self.live.data = _empty(self.dtype, self.live.device)
        else:
            self.owner._buffers[self.attr] = self.placeholder


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
