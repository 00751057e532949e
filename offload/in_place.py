"""A checkpoint read where it is: a store that is an index of byte ranges in the checkpoint's own files.

One concept: the units of a safetensors folder (``in_place_units``) or of an Accelerate-dispatched
model's offload index (``accelerate_units``) as extents in the source files (``ranges.plan_unit``),
under the names and in the layout the model holds them, and the manifest that records them
(``write_index``, ``write_accelerate_index``): a few KB per unit, no weight copied. None when the
checkpoint must be copied instead (``convert``).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch

from .errors import StoreError
from .integrity import read_safetensors_header
from .manifest import DTYPE_NAMES, DTYPES, UnitRecord
from .plan import UnitPlan, _numel
from .ranges import SourceTensor, plan_unit
from .sources import (RESIDENT, _as_the_model_names_them, _header_tensors, _natural_key, _with_dtype, folder_model,
                      side_file_provenance, side_files, source_files, unit_of_key)
from .store import Store
from .writer import _copy_side_files, write_manifest

def in_place_units(src: str, dtype: torch.dtype) -> tuple[list[UnitRecord], UnitRecord | None] | None:
    """The units of a safetensors checkpoint read where they are (``ranges``), from the shards' headers
    only; None when the checkpoint must be copied instead: a dtype other than ``dtype`` (a cast), a
    dtype offload cannot read, a malformed header, or tensors so scattered that reading a unit in
    place would read far more than its bytes."""
    read = _header_tensors(src)
    if read is None:
        return None
    tensors, sizes = read
    if any((DTYPES[dt].is_floating_point and DTYPES[dt] != dtype) for dt, *_ in tensors.values()):
        return None
    wanted = _as_the_model_names_them(folder_model(src, dtype), tensors)
    if wanted is None:
        return None
    groups: dict[str | None, list[SourceTensor]] = {}
    for t in wanted:
        groups.setdefault(None if t.resident else unit_of_key(t.name), []).append(t)

    def unit(name: str, ts: list[SourceTensor]) -> UnitRecord | None:
        prefix = "" if name == RESIDENT else name + "."
        return plan_unit(name, [dataclasses.replace(t, name=t.name[len(prefix):])
                                for t in sorted(ts, key=lambda t: t.pieces[0][:2])], sizes, streamed=name != RESIDENT)
    units = [unit(n, ks) for n, ks in sorted(((n, ks) for n, ks in groups.items() if n is not None),
                                             key=lambda nk: _natural_key(nk[0]))]
    resident = unit(RESIDENT, groups[None]) if None in groups else None
    if any(u is None for u in units) or (None in groups and resident is None):
        return None
    return units, resident  # type: ignore[return-value]


def write_index(src: str, dst: str, units: Sequence[UnitRecord], resident: UnitRecord | None,
                dtype: torch.dtype) -> Store:
    """A store that reads ``src`` in place: a manifest of extents (a few KB per unit), the config and
    tokenizer files, and later the checksums recorded on first reads. No weight is copied."""
    os.makedirs(dst, exist_ok=True)
    source = _with_dtype({"kind": "hf-safetensors", "path": os.path.abspath(src), "files": source_files(src),
                          "side_files": side_file_provenance(src), "layout": "in-place"}, [], None, dtype)
    stored = _copy_side_files(dst, side_files(src), None)
    write_manifest(dst, list(units), source, resident, {"root": os.path.abspath(src), "side_files": stored})
    return Store.open(dst)


def accelerate_units(plans: Sequence[UnitPlan]) -> list[UnitRecord] | None:
    """The units of an Accelerate-dispatched model read where Accelerate's offload index points (the
    original safetensors shards, or its own ``.dat`` files), from ``StreamedTensor.source_id``; None when a
    tensor has no file, or its file's bytes are not the tensor as the model holds it (another dtype)."""
    headers: dict[str, tuple[dict[str, Any], int]] = {}
    sizes: dict[str, int] = {}
    units = []
    for p in plans:
        tensors = []
        for t in p.tensors:
            if t.source_id is None or t.dtype not in DTYPE_NAMES:
                return None
            path, name, size = t.source_id[0], t.source_id[1], t.source_id[2]
            nbytes = _numel(t.shape) * t.dtype.itemsize
            if path.endswith(".safetensors"):
                if path not in headers:
                    try:
                        headers[path] = read_safetensors_header(path)
                    except StoreError:
                        return None
                header, start = headers[path]
                h = header.get(name)
                if (not isinstance(h, dict) or h.get("dtype") != DTYPE_NAMES[t.dtype]
                        or tuple(h.get("shape") or ()) != tuple(t.shape)):
                    return None
                offset = start + int(h["data_offsets"][0])
            else:  # Accelerate's .dat: the tensor's raw bytes, nothing else
                if size != nbytes:
                    return None
                offset = 0
            rel = os.path.relpath(path, "/")
            sizes[rel] = size
            tensors.append(SourceTensor(t.rel, DTYPE_NAMES[t.dtype], tuple(t.shape), ((rel, offset, nbytes),)))
        unit = plan_unit(p.name, tensors, sizes)
        if unit is None:
            return None
        units.append(unit)
    return units


def write_accelerate_index(dst: str, units: Sequence[UnitRecord], source: dict[str, Any]) -> Store:
    """A store of extents in the files Accelerate's offload index names (``root`` "/": absolute paths)."""
    os.makedirs(dst, exist_ok=True)
    write_manifest(dst, list(units), dict(source, layout="in-place"), None, {"root": "/"})
    return Store.open(dst)
