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
import re
from collections.abc import Sequence
from typing import Any

import torch

from .errors import CheckpointError, StoreError
from .integrity import read_safetensors_header
from .manifest import DTYPE_NAMES, DTYPES, UnitRecord
from .plan import UnitPlan, _numel
from .ranges import SourceTensor, plan_unit
from .sources import (RESIDENT, _natural_key, _shard_files, _with_dtype, side_file_provenance, side_files, source_files,
                      unit_of_key)
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
    wanted = _as_the_model_names_them(src, dtype, tensors)
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


def _header_tensors(src: str) -> tuple[dict[str, tuple[str, tuple[int, ...], str, int, int]], dict[str, int]] | None:
    """Every tensor of a safetensors folder, ``name -> (dtype, shape, shard, offset, nbytes)``, and each shard's
    size, from the headers only; None for a header offload does not understand or a dtype it cannot read. A
    shard whose header cannot be read at all is damaged (an interrupted download): copying it would fail too."""
    tensors: dict[str, tuple[str, tuple[int, ...], str, int, int]] = {}
    sizes: dict[str, int] = {}
    for shard in _shard_files(src):
        rel = os.path.relpath(shard, src)
        try:
            header, start = read_safetensors_header(shard)
        except StoreError:
            raise CheckpointError(f"{shard}: its safetensors header cannot be read (cut short or damaged): the file is "
                                  f"truncated or damaged; download it again") from None
        sizes[rel] = os.path.getsize(shard)
        for k, h in header.items():
            if k == "__metadata__":
                continue
            try:
                dt, shape, (a, b) = str(h["dtype"]), tuple(int(x) for x in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                return None
            if DTYPES.get(dt) is None or start + int(b) > sizes[rel]:
                return None
            tensors[k] = (dt, shape, rel, start + int(a), int(b) - int(a))
    return tensors, sizes


def fused_tensors(src: str) -> list[SourceTensor] | None:
    """The checkpoint's tensors as the model built from ``src`` names and lays them out, when that stacks
    per-expert tensors into fused ones (Transformers 5 loading a MoE checkpoint); None when it does not (or
    they cannot be mapped): the checkpoint's own names are the model's. What a copy (``convert``) writes,
    as reading in place indexes it."""
    read = _header_tensors(src)
    if read is None:
        return None
    tensors = read[0]
    dtype = next((DTYPES[dt] for dt, *_ in tensors.values() if DTYPES[dt].is_floating_point), torch.float32)
    wanted = _as_the_model_names_them(src, dtype, tensors)
    return wanted if wanted is not None and any(len(t.pieces) > 1 for t in wanted) else None


def _as_the_model_names_them(src: str, dtype: torch.dtype, tensors: dict[str, tuple[str, tuple[int, ...], str, int, int]]
                             ) -> list[Any] | None:
    """The checkpoint's tensors under the names, and in the layout, the model built from ``src`` holds,
    as Transformers' own loading converts them (``get_model_conversion_mapping``): renames are free, and
    per-expert tensors stacked into one 3-D tensor (``MergeModulelist(dim=0)``, then gate and up
    concatenated, ``Concatenate(dim=1)``) become one tensor of pieces, expert by expert. None for a
    conversion that is not a rearrangement of whole tensors (the checkpoint is then copied)."""
    from .meta import build_on_meta
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older Transformers converts nothing at load time: names are the model's
        get_model_conversion_mapping = None
    if get_model_conversion_mapping is None or not os.path.exists(os.path.join(src, "config.json")):
        # not a Transformers checkpoint (or no conversions to apply): the names are the model's own
        return [SourceTensor(k, dt, shape, ((f, o, n),)) for k, (dt, shape, f, o, n) in tensors.items()]
    model = build_on_meta(src, dtype)
    meta = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {k for k, _ in model.named_buffers()}  # loaded with the resident part, never streamed
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    # A parameter under several names (Zamba2's transformer block shared by several layers) is resident:
    # the checkpoint holds it once, under its first name, and every layer computes with that one tensor.
    buffers |= {k for k, p in model.named_parameters(remove_duplicate=False) if seen[id(p)] > 1}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    out = []
    fused: dict[str, tuple[Any, dict[str, dict[int, tuple[str, int, int]]], str]] = {}
    for k, (dt, shape, f, o, n) in tensors.items():
        target, pattern = rename_source_key(k, renamings, converters, prefix, meta)
        if pattern is None:
            out.append(SourceTensor(target, dt, shape, ((f, o, n),), resident=target in buffers))
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
        m = re.search(re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)"), k)
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or m is None:
            return None
        entry = fused.setdefault(target, (conv, {p: {} for p in conv.source_patterns}, dt))
        entry[1][pattern][int(m.group(1))] = (f, o, n)
    for target, (conv, by_pattern, dt) in fused.items():
        experts = sorted(next(iter(by_pattern.values())))
        if any(sorted(v) != experts for v in by_pattern.values()) or target not in meta:
            return None
        pieces = tuple(by_pattern[p][e] for e in experts for p in conv.source_patterns)
        t = SourceTensor(target, dt, meta[target], pieces)
        if _numel(meta[target]) * DTYPES[dt].itemsize != t.nbytes:
            return None
        out.append(t)
    return out


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
