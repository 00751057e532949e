"""Decide what streams: which modules are units, which of their tensors move, which stay resident.

Two sources of a plan:
  * a model dispatched by Accelerate/Transformers: every module whose ``AlignDevicesHook`` offloads
    its weights contributes its (meta) tensors; they are grouped into units by ``hf_device_map``;
  * a plain ``nn.Module``: the repeated blocks (children of ``ModuleList``/``Sequential`` containers,
    or, for models without one, the largest run of same-class sibling modules), or names given.

Tensors that are shared (tied weights, one storage seen under two names) stay resident, and so do
buffers of plain modules (BatchNorm statistics are updated in place; they are small).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import OffloadError


@dataclasses.dataclass
class StreamedTensor:
    owner: nn.Module  # holds the tensor in _parameters / _buffers under ``attr``
    attr: str
    rel: str  # name relative to the unit module: the store's tensor name
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor]  # the current value, for conversion or comparison
    source_id: Any = None  # what identifies the value on disk (file, size, mtime), if known


@dataclasses.dataclass
class UnitPlan:
    name: str
    module: nn.Module
    tensors: list[StreamedTensor]
    device: torch.device
    hooks: list[Any] = dataclasses.field(default_factory=list)  # Accelerate hooks taken over
    shared: list[StreamedTensor] = dataclasses.field(default_factory=list)  # shared with other units: kept resident

    @property
    def nbytes(self) -> int:
        return sum(_numel(t.shape) * t.dtype.itemsize for t in self.tensors)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


# ------------------------------------------------------------------------------ unit discovery


def find_units(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The modules to stream, in registration order (a good first guess at execution order)."""
    modules = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in modules]
        if missing:
            raise OffloadError(f"units {missing} are not modules of this model; valid names look like "
                               f"{[n for n in list(modules)[1:6]]}")
        chosen = [(n, modules[n]) for n in names]
        for a, _ in chosen:
            for b, _ in chosen:
                if a != b and (b.startswith(a + ".") or a == ""):
                    raise OffloadError(f"units must not nest: {b!r} is inside {a!r}")
        return chosen
    total = _param_bytes(model)
    # 1) Children of ModuleList/Sequential containers, outermost first, big enough to matter.
    lists = [(n, m) for n, m in modules.items() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2]
    scored = [(n, m, sum(_param_bytes(c) for c in m)) for n, m in lists]
    scored = [x for x in scored if x[2] > 0]
    if scored:
        best = max(b for _, _, b in scored)
        picked: list[tuple[str, nn.Module]] = []
        for n, m, b in sorted(scored, key=lambda x: x[0].count(".") if x[0] else -1):
            if b < 0.1 * best or any(n == p or n.startswith(p + ".") for p, _ in picked):
                continue
            if isinstance(m, nn.Sequential) and len({type(c) for c in m}) == len(m):
                continue  # a pipeline of distinct stages, not a stack of blocks
            for cn, c in m.named_children():
                if _param_bytes(c) > 0:
                    picked.append((f"{n}.{cn}" if n else cn, c))
        if picked and sum(_param_bytes(c) for _, c in picked) >= 0.2 * total:
            return _in_model_order(modules, picked)
    # 2) No usable container: the largest run of same-class siblings that covers most of the model.
    runs: list[list[tuple[str, nn.Module]]] = []
    for n, m in modules.items():
        by_cls: dict[type, list[tuple[str, nn.Module]]] = {}
        for cn, c in m.named_children():
            if _param_bytes(c) > 0:
                by_cls.setdefault(type(c), []).append((f"{n}.{cn}" if n else cn, c))
        runs.extend(r for r in by_cls.values() if len(r) >= 2)
    if runs:
        big = [r for r in runs if sum(_param_bytes(c) for _, c in r) >= 0.5 * total]
        run = max(big, key=len) if big else max(runs, key=lambda r: sum(_param_bytes(c) for _, c in r))
        return run
    raise OffloadError("found no repeated blocks to stream in this model: pass units=[...] with the names of "
                       "the modules to stream (e.g. units=['layers.0', 'layers.1'])")


def _in_model_order(modules: dict[str, nn.Module], picked: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    order = {n: i for i, n in enumerate(modules)}
    return sorted(picked, key=lambda x: order[x[0]])


# ------------------------------------------------------------------------------ plain modules


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    if t.device.type == "meta":
        return ("meta", id(t))
    return (str(t.device), t.untyped_storage().data_ptr())


def _fetcher(unit: str, rel: str, p: torch.Tensor) -> Callable[[], torch.Tensor]:
    if p.device.type != "meta":
        return p.detach
    def missing() -> torch.Tensor:
        raise OffloadError(f"{unit}.{rel} is on the meta device (no weights in memory) and the store does not exist "
                           f"yet: pass store= pointing at a store made by `offload convert`")
    return missing


def plan_plain(model: nn.Module, units: list[tuple[str, nn.Module]], device: torch.device) -> list[UnitPlan]:
    """Parameters of each unit that are not shared with anything else; buffers stay resident."""
    owners: dict[tuple[str, int], set[str]] = {}
    for mn, m in model.named_modules(remove_duplicate=False):
        for an, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                owners.setdefault(_storage_key(t), set()).add(f"{mn}.{an}" if mn else an)
    plans = []
    for uname, umod in units:
        tensors: list[StreamedTensor] = []
        for mn, m in umod.named_modules(remove_duplicate=False):
            for an, p in m._parameters.items():
                if p is None:
                    continue
                if len(owners.get(_storage_key(p), ())) != 1:
                    continue  # tied or aliased (a block shared by several layers): resident, read once
                rel = f"{mn}.{an}" if mn else an
                tensors.append(StreamedTensor(m, an, rel, True, p.dtype, tuple(p.shape), _fetcher(uname, rel, p)))
        plans.append(UnitPlan(uname, umod, tensors, device))
    return plans


# ------------------------------------------------------------------------------ Accelerate


def _align_hooks(module: nn.Module) -> list[Any]:
    """Every AlignDevicesHook on ``module``. A SequentialHook holds several, and may hold SequentialHooks:
    a module shared by four blocks gets one hook per block, nested three deep. Flattening one level
    missed three of them, which kept loading the shared weights while offload was enabled and left
    entries in Accelerate's tied-weights cache that served wrong tensors after ``disable``."""
    out: list[Any] = []
    todo = [getattr(module, "_hf_hook", None)]
    while todo:
        h = todo.pop(0)
        if h is None:
            continue
        if hasattr(h, "hooks"):
            todo[:0] = list(h.hooks)
        elif type(h).__name__ == "AlignDevicesHook" and hasattr(h, "weights_map"):
            out.append(h)
    return out


def is_accelerate_offloaded(model: nn.Module) -> bool:
    return any(h.offload for m in model.modules() for h in _align_hooks(m))


def _source_id(weights_map: Any, key: str) -> Any:
    """(file, size, mtime) of the bytes behind an Accelerate weights-map entry, when it has a file."""
    ds = getattr(weights_map, "dataset", weights_map)
    full = getattr(weights_map, "prefix", "") + key
    index = getattr(ds, "index", None) or {}
    info = index.get(full)
    if info is None:
        return None
    path = info.get("safetensors_file") or (os.path.join(ds.save_folder, f"{full}.dat") if getattr(ds, "save_folder", None) else None)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), info.get("weight_name", full), st.st_size, st.st_mtime_ns)


def offload_folder_of(model: nn.Module) -> str | None:
    for m in model.modules():
        for h in _align_hooks(m):
            ds = getattr(h.weights_map, "dataset", None)
            if h.offload and getattr(ds, "save_folder", None):
                return str(ds.save_folder)
    return None


def plan_accelerate(model: nn.Module) -> list[UnitPlan]:
    """Group every offloading AlignDevicesHook's tensors into units: the model's repeated blocks.

    Whatever the map's granularity: Accelerate merges neighbours that share a device, so with a small
    ``max_memory`` the map says ``model.layers: "disk"`` or even ``"": "disk"``. A container has no
    forward of its own (its hooks would never fire), so an offloaded tensor belongs to the repeated
    block that contains it (``find_units``); only tensors outside every block (``lm_head``, a final
    norm) fall back to their map entry, or to their own module when that entry contains blocks.

    A module reachable from two units (a shared block called inside two hybrid blocks) would be
    streamed with one of them and read from disk on every use by the other: its tensors are kept resident (``shared``)
    instead, read once and kept on the device (``UnitPlan.shared``).
    """
    device_map = getattr(model, "hf_device_map", None) or {}
    keys = sorted((k for k in device_map if k), key=len, reverse=True)
    try:
        blocks = [n for n, _ in find_units(model)]
    except OffloadError:
        blocks = []

    def inside(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    def unit_of(mn: str) -> str:
        block = next((u for u in blocks if inside(mn, u)), None)
        if block is not None:
            return block
        key = next((k for k in keys if inside(mn, k)), None)
        if key is not None and not any(inside(u, key) for u in blocks):
            return key
        return mn

    names: dict[int, set[str]] = {}  # every name of every module (a shared module has several)
    for mn, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), set()).add(mn)
    units: dict[str, UnitPlan] = {}
    modules = dict(model.named_modules())
    seen: set[tuple[int, str]] = set()  # a shared module carries one hook per block (a SequentialHook)
    for mn, m in modules.items():
        for h in _align_hooks(m):
            if not h.offload:
                continue
            owners = sorted({unit_of(n) for n in names[id(m)]})
            unit = owners[0]
            umod = modules[unit]
            prefix = mn[len(unit) + 1:] if mn != unit else ""
            dev = torch.device(h.execution_device) if h.execution_device is not None else torch.device("cpu")
            plan = units.setdefault(unit, UnitPlan(unit, umod, [], dev))
            plan.hooks.append(h)
            sub = m.named_modules() if h.place_submodules else [("", m)]
            for sn, sm in sub:
                entries = [(n, t, True) for n, t in sm._parameters.items()]
                if h.offload_buffers:
                    persistent = [n for n in sm._buffers if n not in sm._non_persistent_buffers_set]
                    entries += [(n, sm._buffers[n], False) for n in persistent]
                for an, t, is_param in entries:
                    if t is None or t.device.type != "meta" or (id(sm), an) in seen:
                        continue  # not offloaded (tied to a resident tensor, or already placed)
                    seen.add((id(sm), an))
                    key = f"{sn}.{an}" if sn else an
                    rel = f"{prefix}.{key}" if prefix else key
                    wm = h.weights_map
                    fetch = (lambda wm=wm, key=key: wm[key])
                    st = StreamedTensor(sm, an, rel, is_param, t.dtype, tuple(t.shape), fetch, _source_id(wm, key))
                    (plan.shared if len(owners) > 1 else plan.tensors).append(st)
    order = {n: i for i, n in enumerate(modules)}
    return sorted((p for p in units.values() if p.tensors or p.shared), key=lambda p: order[p.name])


def disk_device_map(model: nn.Module, disk_units: Sequence[str], rest: str | int | torch.device = "cpu",
                    offloaded: str | int | torch.device = "disk") -> dict[str, str | int]:
    """An Accelerate ``device_map`` with the named units on ``offloaded`` and everything else on ``rest``.

    The default (units on ``"disk"``, the rest on ``"cpu"``) is a CPU user with too little memory.
    ``rest`` may be a GPU (an index such as ``0``, or ``"cuda:0"``): ``offloaded="cpu"`` then gives
    Accelerate's GPU + CPU offload (units kept in RAM, copied to the GPU when they are called) and
    ``offloaded="disk"`` its GPU + disk offload. Used by the benchmark (and the tests) to have
    Transformers/Accelerate dispatch a model the way such a user would, at any nesting depth.
    """
    def value(d: str | int | torch.device) -> str | int:
        return str(d) if isinstance(d, torch.device) else d

    disk = set(disk_units)
    where, other = value(offloaded), value(rest)
    out: dict[str, str | int] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full in disk:
                out[full] = where
            elif any(d.startswith(full + ".") for d in disk):
                walk(full, child)
            else:
                out[full] = other
        for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            out[f"{prefix}.{pname}" if prefix else pname] = other

    walk("", model)
    return out


# ------------------------------------------------------------------------------ RAM tier


def choose_resident(sizes: Sequence[int], budget: int) -> set[int]:
    """A fixed set of units to keep in RAM, spread evenly through the order.

    For a cyclic scan, which units stay does not change the bytes read, but spreading them gives
    every streamed read the compute of the resident units around it to hide behind.
    """
    n = len(sizes)
    if budget <= 0 or n == 0:
        return set()
    if sum(sizes) <= budget:
        return set(range(n))
    k = min(n, int(budget // max(1, max(sizes))))
    chosen = {min(n - 1, int((j + 0.5) * n / k)) for j in range(k)} if k else set()
    used = sum(sizes[i] for i in chosen)
    for i in range(n):  # fill what is left with any unit that still fits
        if i not in chosen and used + sizes[i] <= budget:
            chosen.add(i)
            used += sizes[i]
    return chosen
