"""What ``enable`` puts into a model's modules and ``disable`` takes back.

Before the point of no return, each step records what it replaced so a failed ``enable`` puts it back:
the resident weights of a model built on meta, loaded from the store (``load_resident_from_store``),
and tensors shared by several units, read once and kept where they compute (``keep_shared``);
``unload_resident`` undoes both. Then each streamed tensor gets its ``Binding`` (``bindings``: the
stand-in a module holds between forwards, the view bound during its unit's forward) and Accelerate's
device-alignment hooks inside the units are silenced while offload is enabled.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import OffloadError, StoreMismatchError
from .hooks import Binding, Offloaded, QuantBinding
from .manifest import UnitRecord
from .placement import normalize_device
from .plan import UnitPlan
from .store import Store


def load_resident_from_store(model: nn.Module, plans: Sequence[UnitPlan], store: Store, device: torch.device,
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


def keep_shared(plans: Sequence[UnitPlan], replaced: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    """Tensors reachable from several units (``UnitPlan.shared``): read once, kept where they compute.

    Each replacement is appended to ``replaced`` as it happens, so a failure part way can be undone."""
    for p in plans:
        for t in p.shared:
            table = t.owner._parameters if t.is_param else t.owner._buffers
            original = table[t.attr]
            assert original is not None
            value = t.fetch().to(device=p.device, dtype=t.dtype)
            table[t.attr] = nn.Parameter(value, requires_grad=original.requires_grad) if t.is_param else value
            replaced.append((t.owner, t.attr, t.is_param, original))


def unload_resident(replaced: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    for m, attr, is_param, t in reversed(replaced):
        (m._parameters if is_param else m._buffers)[attr] = t


def bindings(plan: UnitPlan, rec: UnitRecord, restore: dict[int, torch.Tensor], store: Store) -> list[Binding]:
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
            # Made outside inference mode (``load``/``enable`` under ``torch.inference_mode()``): an inference
            # tensor's ``.data`` cannot take the buffers' views, made outside it (``Binding._normal_view``), so a
            # Parameter made inside it (a model built there) is not kept either.
            with torch.inference_mode(False):
                fresh = nn.Parameter(torch.empty(0, dtype=t.dtype, device=plan.device),
                                     requires_grad=current.requires_grad)
            keep = not on_meta and current.device == plan.device and not current.is_inference()
            live = current if keep else fresh
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


def silence_inner_accelerate_hooks(plans: Sequence[UnitPlan]) -> list[tuple[nn.Module, Any]]:
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
            if normalize_device(dev) == p.device and not hook.io_same_device and not hook.offload:
                out.append((m, hook))
                m._hf_hook = noop
    return out
