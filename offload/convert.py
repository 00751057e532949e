"""Checkpoint → store, in one streaming pass.

Sources: a Hugging Face model folder (``*.safetensors`` shards, optional index), Accelerate's
``offload_folder`` (``index.json`` + one ``.dat`` memmap per tensor), a live ``nn.Module``, or the
plan ``offload.enable`` builds from an Accelerate-dispatched model. Each unit is written with at
most one source tensor in memory; the source is only ever opened read-only.

Crash safety: a marker file says a conversion is in progress and records each finished unit; unit
files appear only under their final name once complete (``os.replace``); the manifest is written
last. Re-running the same conversion resumes; a folder that is neither empty, a store, nor one of
our in-progress conversions is refused, so nothing a user owns is overwritten.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, StoreError
from .plan import UnitPlan, find_units, plan_plain
from .store import (IN_PROGRESS, MANIFEST, Store, TensorSpec, UnitRecord, _parse_unit, fingerprint,
                    unit_file_name, write_manifest, write_unit_file)

Fetch = Callable[[str], torch.Tensor]
RESIDENT = "__resident__"


class UnitSource:
    """What the writer needs for one unit: its name, tensor specs, and a way to fetch each tensor.

    ``open()`` returns the fetch function and is a context, so a shard is mapped only while its
    unit is being written (peak memory: one unit's pages, one tensor's copy).
    """

    def __init__(self, name: str, specs: Sequence[TensorSpec], open_fetch: Callable[[], contextlib.AbstractContextManager[Fetch]]):
        self.name, self.specs, self.open_fetch = name, list(specs), open_fetch

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                leave=False, dynamic_ncols=True)


def _prepare_folder(path: str, fp: str) -> dict[str, dict[str, Any]]:
    """Create or resume a conversion folder; return units already finished by an earlier run."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, IN_PROGRESS)
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError):
            lines = []
        head = lines[0] if lines else {}
        done = {d["name"]: d for d in lines[1:] if isinstance(d, dict) and "name" in d}
        if head.get("fingerprint") == fp:
            return done
        # An interrupted conversion of something else: remove only the files it wrote.
        for d in done.values():
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, str(d.get("file", ""))))
        for e in os.listdir(path):
            if e.startswith(".") and ".tmp-" in e:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, e))
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
    elif os.path.exists(os.path.join(path, MANIFEST)):
        raise StoreError(f"{path} already holds a store: open it, or delete it to convert again")
    if entries and not os.path.exists(marker):
        raise StoreError(f"{path} is not empty and is not an offload store ({len(entries)} entries, e.g. "
                         f"{sorted(entries)[:3]}); refusing to write into it: choose an empty or new folder")
    with open(marker, "w") as f:
        f.write(json.dumps({"fingerprint": fp}) + "\n")
    return {}


def write_store(path: str | os.PathLike[str], units: Sequence[UnitSource], source: dict[str, Any],
                resident: UnitSource | None = None, progress: bool = True, extra: dict[str, Any] | None = None) -> Store:
    """Write (or finish writing) a store from unit sources and return it opened."""
    path = os.fspath(path)
    fp = str(source.get("fingerprint", ""))
    done = _prepare_folder(path, fp)
    records: list[UnitRecord] = []
    todo = list(units) + ([resident] if resident is not None else [])
    bar = _progress(sum(u.nbytes for u in todo), f"offload: writing store {os.path.basename(path)}", progress)
    marker = os.path.join(path, IN_PROGRESS)
    try:
        for index, u in enumerate(todo):
            file = unit_file_name(index, u.name)
            prev = done.get(u.name)
            if prev is not None and prev.get("file") == file:
                try:
                    rec = _parse_unit(prev, marker)
                    if os.path.getsize(os.path.join(path, file)) == rec.file_bytes:
                        records.append(rec)
                        bar.update(u.nbytes)
                        continue
                except (StoreError, OSError):
                    pass
            with u.open_fetch() as fetch:
                rec = write_unit_file(path, file, u.name, u.specs, fetch, bar.update)
            records.append(rec)
            with open(marker, "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")
    finally:
        bar.close()
    res = records.pop() if resident is not None else None
    write_manifest(path, records, source, res, extra)
    return Store.open(path)


# ------------------------------------------------------------------------------ sources


def _fixed(fetch: Fetch) -> Callable[[], contextlib.AbstractContextManager[Fetch]]:
    return lambda: contextlib.nullcontext(fetch)


def sources_from_plans(plans: Sequence[UnitPlan]) -> list[UnitSource]:
    out = []
    for p in plans:
        by_rel = {t.rel: t for t in p.tensors}
        specs = [TensorSpec(t.rel, t.dtype, t.shape) for t in p.tensors]
        out.append(UnitSource(p.name, specs, _fixed(lambda rel, by_rel=by_rel: by_rel[rel].fetch())))
    return out


_UNIT_KEY = re.compile(r"^(.*?\.\d+)\.")


def unit_of_key(key: str) -> str | None:
    """``transformer.h.12.mlp.weight`` → ``transformer.h.12``; keys outside a block → None."""
    m = _UNIT_KEY.match(key)
    return m.group(1) if m else None


def _shard_files(src: str) -> list[str]:
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [x for x in files if not os.path.exists(os.path.join(src, x))]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing[:3]}: re-download the checkpoint")
        return [os.path.join(src, x) for x in files]
    return sorted(os.path.join(src, x) for x in os.listdir(src) if x.endswith(".safetensors"))


def _hf_sources(src: str, dtype: torch.dtype | None) -> tuple[list[UnitSource], UnitSource | None, dict[str, Any]]:
    from safetensors import safe_open

    shards = _shard_files(src)
    key_shard: dict[str, str] = {}
    meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                from .store import DTYPES
                dt = DTYPES.get(sl.get_dtype())
                if dt is None:
                    raise CheckpointError(f"{shard}: tensor {k} has dtype {sl.get_dtype()}, which offload cannot store")
                key_shard[k] = shard
                meta[k] = (dt, tuple(sl.get_shape()))
    groups: dict[str | None, list[str]] = {}
    for k in key_shard:
        groups.setdefault(unit_of_key(k), []).append(k)

    def source(name: str, keys: list[str]) -> UnitSource:
        prefix = "" if name == RESIDENT else name + "."
        specs = []
        for k in keys:
            dt, shape = meta[k]
            if dtype is not None and dt.is_floating_point:
                dt = dtype
            specs.append(TensorSpec(k[len(prefix):], dt, shape))

        @contextlib.contextmanager
        def opened():
            with contextlib.ExitStack() as stack:
                handles: dict[str, Any] = {}

                def fetch(rel: str) -> torch.Tensor:
                    k = prefix + rel
                    shard = key_shard[k]
                    if shard not in handles:
                        handles[shard] = stack.enter_context(safe_open(shard, framework="pt"))
                    return handles[shard].get_tensor(k)
                yield fetch
        return UnitSource(name, specs, opened)

    units = [source(n, ks) for n, ks in groups.items() if n is not None]
    units.sort(key=lambda u: _natural_key(u.name))
    resident = source(RESIDENT, groups[None]) if None in groups else None
    fp = fingerprint((os.path.basename(s), os.path.getsize(s), os.stat(s).st_mtime_ns) for s in shards)
    return units, resident, {"kind": "hf-safetensors", "path": os.path.abspath(src), "fingerprint": fp}


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _accelerate_folder_sources(src: str) -> tuple[list[UnitSource], UnitSource | None, dict[str, Any]]:
    with open(os.path.join(src, "index.json")) as f:
        index = json.load(f)

    def load(key: str) -> torch.Tensor:
        info = index[key]
        shape = tuple(info["shape"]) or (1,)
        np_dtype = "int16" if info["dtype"] == "bfloat16" else info["dtype"]
        path = os.path.join(src, f"{key}.dat")
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is listed in {src}/index.json but missing")
        arr = np.memmap(path, dtype=np_dtype, shape=shape, mode="r")
        if len(info["shape"]) == 0:
            arr = arr[0]
        t = torch.from_numpy(np.array(arr))  # one tensor's copy; the memmap is dropped right after
        return t.view(torch.bfloat16) if info["dtype"] == "bfloat16" else t

    groups: dict[str | None, list[str]] = {}
    for k in index:
        groups.setdefault(unit_of_key(k), []).append(k)

    def source(name: str, keys: list[str]) -> UnitSource:
        prefix = "" if name == RESIDENT else name + "."
        specs = [TensorSpec(k[len(prefix):], getattr(torch, index[k]["dtype"]), tuple(index[k]["shape"])) for k in keys]
        return UnitSource(name, specs, _fixed(lambda rel: load(prefix + rel)))

    units = sorted((source(n, ks) for n, ks in groups.items() if n is not None), key=lambda u: _natural_key(u.name))
    resident = source(RESIDENT, groups[None]) if None in groups else None
    fp = fingerprint((k, os.path.getsize(os.path.join(src, f"{k}.dat")), os.stat(os.path.join(src, f"{k}.dat")).st_mtime_ns)
                     for k in sorted(index))
    return units, resident, {"kind": "accelerate-offload-folder", "path": os.path.abspath(src), "fingerprint": fp}


def module_sources(model: nn.Module, units: Sequence[str] | None = None) -> tuple[list[UnitPlan], list[UnitSource]]:
    plans = plan_plain(model, find_units(model, units), torch.device("cpu"))
    return plans, sources_from_plans(plans)


def convert(src: str | os.PathLike[str] | nn.Module, dst: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
            units: Sequence[str] | None = None, allow_pickle: bool = False, progress: bool = True) -> Store:
    """Convert a checkpoint into a store of per-unit files.

    Args:
        src: a Hugging Face model folder (``*.safetensors`` shards), an Accelerate ``offload_folder``
            (``index.json`` + ``.dat`` files), or a live ``nn.Module`` (its current weights).
        dst: the store folder: new, empty, or an interrupted conversion of the same source (resumed).
        dtype: cast floating-point tensors, e.g. ``torch.bfloat16`` or ``"bf16"``.
        units: for a module, the names of the modules to stream (default: its repeated blocks).
        allow_pickle: accept ``pytorch_model*.bin`` checkpoints (loaded with ``weights_only=True``).

    Example:
        >>> store = offload.convert("bloom-7b1/", "bloom-7b1.store", dtype="bf16")
    """
    cast = _parse_dtype(dtype)
    dst = os.fspath(dst)
    if isinstance(src, nn.Module):
        plans, sources = module_sources(src, units)
        fp = fingerprint((p.name, t.rel, str(t.dtype), t.shape) for p in plans for t in p.tensors)
        if cast is not None:
            for s in sources:
                s.specs = [TensorSpec(x.name, cast if x.dtype.is_floating_point else x.dtype, x.shape) for x in s.specs]
        return write_store(dst, sources, {"kind": "module", "class": type(src).__name__, "fingerprint": fp}, progress=progress)
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src} is not a folder: pass a Hugging Face model folder or an Accelerate offload folder")
    names = os.listdir(src)
    if "index.json" in names and any(n.endswith(".dat") for n in names):
        if cast is not None:
            raise CheckpointError("dtype= is not supported for Accelerate offload folders (they are already in the model's dtype)")
        units_, resident, source = _accelerate_folder_sources(src)
    elif any(n.endswith(".safetensors") for n in names):
        units_, resident, source = _hf_sources(src, cast)
    elif any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        if not allow_pickle:
            raise CheckpointError(f"{src} holds only pickle checkpoints (*.bin); pickle can run arbitrary code, so they "
                                  f"are refused. Convert them to safetensors, or pass allow_pickle=True "
                                  f"(`--allow-pickle`) to load them with torch.load(weights_only=True)")
        units_, resident, source = _pickle_sources(src, cast)
    else:
        raise CheckpointError(f"{src} holds no *.safetensors shards nor an Accelerate index.json: nothing to convert")
    if not units_:
        raise CheckpointError(f"{src}: found no per-block tensors (names like 'model.layers.0.*') to stream")
    store = write_store(dst, units_, source, resident, progress=progress)
    for extra in ("config.json", "generation_config.json"):
        if extra in names:
            tmp = os.path.join(dst, f".{extra}.tmp")
            shutil.copyfile(os.path.join(src, extra), tmp)
            os.replace(tmp, os.path.join(dst, extra))
    return store


def _pickle_sources(src: str, cast: torch.dtype | None) -> tuple[list[UnitSource], UnitSource | None, dict[str, Any]]:
    files = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith((".bin", ".pt", ".pth")))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    groups: dict[str | None, list[str]] = {}
    for k in state:
        groups.setdefault(unit_of_key(k), []).append(k)

    def source(name: str, keys: list[str]) -> UnitSource:
        prefix = "" if name == RESIDENT else name + "."
        specs = [TensorSpec(k[len(prefix):], cast if (cast and state[k].is_floating_point()) else state[k].dtype,
                            tuple(state[k].shape)) for k in keys]
        return UnitSource(name, specs, _fixed(lambda rel: state[prefix + rel]))

    units = sorted((source(n, ks) for n, ks in groups.items() if n is not None), key=lambda u: _natural_key(u.name))
    fp = fingerprint((os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files)
    return units, (source(RESIDENT, groups[None]) if None in groups else None), {"kind": "pickle", "path": os.path.abspath(src), "fingerprint": fp}


_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(_DTYPE_NAMES)}") from None
