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
import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._memory import ensure_free_space
from .errors import CheckpointError, OffloadError, StoreError
from .integrity import file_provenance, fingerprint, read_safetensors_header
from .manifest import (DTYPE_NAMES, DTYPES, IN_PROGRESS, MANIFEST, PAGE, QuantRecord, TensorSpec, UnitRecord, _parse_unit,
                       dtype_name, main_float_dtype)
from .plan import UnitPlan, _numel, find_units, plan_plain
from .ranges import SourceTensor, plan_unit
from .store import Store
from .writer import plan_layout, unit_crc, unit_file_name, write_manifest, write_unit_file

Fetch = Callable[[str], torch.Tensor]
RESIDENT = "__resident__"


class UnitSource:
    """What the writer needs for one unit: its name, tensor specs, and a way to fetch each tensor.

    ``open()`` returns the fetch function and is a context, so a shard is mapped only while its
    unit is being written (peak memory: one unit's pages, one tensor's copy).
    """

    def __init__(self, name: str, specs: Sequence[TensorSpec], open_fetch: Callable[[], contextlib.AbstractContextManager[Fetch]]):
        self.name, self.specs, self.open_fetch = name, list(specs), open_fetch
        self.quantized: list[QuantRecord] = []  # weights whose specs are their quantized parts (quantize_sources)

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
                resident: UnitSource | None = None, progress: bool = True, extra: dict[str, Any] | None = None,
                files: Sequence[str] = (), edit: dict[str, Callable[[bytes], bytes]] | None = None) -> Store:
    """Write (or finish writing) a store from unit sources and return it opened.

    ``files`` (config, tokenizer) are copied in under their own names before the manifest is
    written, so a store with a manifest has all of them; ``edit[file]`` rewrites one on the way.
    """
    path = os.fspath(path)
    fp = str(source.get("fingerprint", ""))
    existed = os.path.exists(path)
    done = _prepare_folder(path, fp)
    todo = list(units) + ([resident] if resident is not None else [])
    # Every unit file is its data + a header page + at most a page of padding; the side files are small.
    needed = sum(plan_layout(u.specs)[1] + 2 * PAGE for u in todo if u.name not in done)
    needed += sum(os.path.getsize(f) for f in files)
    try:
        ensure_free_space(path, needed, f"writing the store {path} ({len(todo) - len(done)} unit files)")
    except OffloadError:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)  # leave nothing behind for a write that never started
        elif not done:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, IN_PROGRESS))
        raise
    # A fingerprint of files (a checkpoint's names, sizes, mtimes, header hashes) identifies the bytes a
    # finished unit was written from; one of shapes (a module's weights, held in memory) does not: two
    # models of the same shapes share it, so each unit an earlier run finished is checked by content.
    by_content = source.get("kind") == "module" or fp.startswith("content:")
    records: list[UnitRecord] = []
    bar = _progress(sum(u.nbytes for u in todo), f"offload: writing store {os.path.basename(path)}", progress)
    marker = os.path.join(path, IN_PROGRESS)
    try:
        for index, u in enumerate(todo):
            file = unit_file_name(index, u.name)
            prev = done.get(u.name)
            if prev is not None and prev.get("file") == file:
                try:
                    rec = _parse_unit(prev, marker)
                    if os.path.getsize(os.path.join(path, file)) == rec.file_bytes and (
                            not by_content or _same_content(u, rec)):
                        records.append(rec)
                        bar.update(u.nbytes)
                        continue
                except (StoreError, OSError):
                    pass
            with u.open_fetch() as fetch:
                rec = write_unit_file(path, file, u.name, u.specs, fetch, bar.update)
            rec = dataclasses.replace(rec, quantized=tuple(u.quantized))
            records.append(rec)
            with open(marker, "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")
    finally:
        bar.close()
    stored = _copy_side_files(path, files, edit)
    res = records.pop() if resident is not None else None
    write_manifest(path, records, source, res, dict(extra or {}, side_files=stored) if stored else extra)
    return Store.open(path)


def _copy_side_files(path: str, files: Sequence[str], edit: dict[str, Callable[[bytes], bytes]] | None
                     ) -> dict[str, str]:
    """Copy config/tokenizer files into a store (``edit[file]`` rewrites one on the way); return the
    SHA-256 of each copy as written, for the manifest's ``side_files`` (``Store.check_side_files``)."""
    stored = {}
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        if edit and f in edit:
            raw = edit[f](raw)
        write_atomic(os.path.join(path, os.path.basename(f)), raw)
        stored[os.path.basename(f)] = hashlib.sha256(raw).hexdigest()
    return stored


def _same_content(u: UnitSource, rec: UnitRecord) -> bool:
    """Does the unit file an earlier run finished hold exactly ``u``'s bytes (its recorded checksum)?"""
    with u.open_fetch() as fetch:
        return unit_crc(u.name, u.specs, fetch) == rec.crc32


def write_atomic(final: str, data: bytes | Iterable[bytes]) -> None:
    """Write ``final`` under a temporary name beside it, fsync, rename: it appears complete or not at all."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(final)), f".{os.path.basename(final)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


# A policy says, for (unit, tensor name relative to it), whether that tensor is stored quantized:
# None = as it is; else whether it is a transposed ([in, out], Conv1D) linear weight.
QuantPolicy = Callable[[str, str], "bool | None"]


def quantize_sources(units: Sequence[UnitSource], policy: QuantPolicy, scheme: str, group_size: int) -> int:
    """Store the linear weights ``policy`` picks as int8/int4 parts (``offload.quant``); returns how many.

    The parts are planned from metadata (``quantized_specs``); the weight is read and quantized once,
    when the writer asks for its first part, and its parts are kept only until all were written.
    """
    from . import quant
    count = 0
    for u in units:
        specs: list[TensorSpec] = []
        parts: dict[str, tuple[str, str, bool]] = {}  # part name -> (weight, key, transposed)
        for x in u.specs:
            transposed = policy(u.name, x.name) if x.dtype.is_floating_point and len(x.shape) == 2 else None
            if transposed is None:
                specs.append(x)
                continue
            for name, dt, shape in quant.quantized_specs(x.name, x.shape, x.dtype, scheme, group_size,
                                                         transposed=transposed):
                specs.append(TensorSpec(name, dt, shape))
                parts[name] = (x.name, name[len(x.name) + 1:], transposed)
            u.quantized.append(QuantRecord(x.name, dtype_name(x.dtype), tuple(x.shape), transposed))
            count += 1
        if not parts:
            continue
        dtypes = {x.name: x.dtype for x in u.specs}
        u.specs = specs

        def opened(inner=u.open_fetch, parts=parts, dtypes=dtypes):
            @contextlib.contextmanager
            def ctx():
                with inner() as fetch:
                    done: dict[str, dict[str, torch.Tensor]] = {}

                    def get(name: str) -> torch.Tensor:
                        if name not in parts:
                            return fetch(name)
                        weight, key, transposed = parts[name]
                        if weight not in done:
                            w = fetch(weight).to(dtypes[weight])
                            done[weight] = quant.quantize_linear(w, scheme, group_size, transposed=transposed)
                        return done[weight].pop(key)  # each part is written once: drop it after
                    yield get
            return ctx()
        u.open_fetch = opened
    return count


def module_policy(modules: dict[str, nn.Module], scheme: str, group_size: int) -> QuantPolicy:
    """The quantization policy of a model's own modules (``quant.is_quantizable``): its linear weights."""
    from . import quant

    def policy(unit: str, rel: str) -> bool | None:
        owner, _, attr = f"{unit}.{rel}".rpartition(".")
        m = modules.get(owner)
        t = m._parameters.get(attr) if m is not None else None
        if t is None or not quant.is_quantizable(owner, attr, t, m, scheme=scheme, group_size=group_size):
            return None
        return quant.is_transposed_linear(m)
    return policy


def quantization_of(scheme: str | None, group_size: int) -> dict[str, Any] | None:
    """The manifest's ``quantization`` entry for a scheme (None: plain tensors)."""
    if scheme is None:
        return None
    from . import quant
    if scheme not in quant.SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}: choose one of {', '.join(quant.SCHEMES)}")
    if scheme == "int4" and group_size not in quant.INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {quant.INT4_GROUP_SIZES}, got {group_size}")
    out: dict[str, Any] = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None}
    if scheme == "int4":
        out["int4_layout"] = quant.int4_layout()
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
    return units, resident, {"kind": "hf-safetensors", "path": os.path.abspath(src), "files": source_files(src)}


def in_place_units(src: str, dtype: torch.dtype) -> tuple[list[UnitRecord], UnitRecord | None] | None:
    """The units of a safetensors checkpoint read where they are (``ranges``), from the shards' headers
    only; None when the checkpoint must be copied instead: a dtype other than ``dtype`` (a cast), a
    dtype offload cannot read, a malformed header, or tensors so scattered that reading a unit in
    place would read far more than its bytes."""
    tensors: dict[str, tuple[str, tuple[int, ...], str, int, int]] = {}
    sizes: dict[str, int] = {}
    for shard in _shard_files(src):
        rel = os.path.relpath(shard, src)
        try:
            header, start = read_safetensors_header(shard)
        except StoreError:
            return None
        sizes[rel] = os.path.getsize(shard)
        for k, h in header.items():
            if k == "__metadata__":
                continue
            try:
                dt, shape, (a, b) = str(h["dtype"]), tuple(int(x) for x in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                return None
            torch_dt = DTYPES.get(dt)
            if torch_dt is None or (torch_dt.is_floating_point and torch_dt != dtype) or start + int(b) > sizes[rel]:
                return None
            tensors[k] = (dt, shape, rel, start + int(a), int(b) - int(a))
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


def _as_the_model_names_them(src: str, dtype: torch.dtype, tensors: dict[str, tuple[str, tuple[int, ...], str, int, int]]
                             ) -> list[Any] | None:
    """The checkpoint's tensors under the names, and in the layout, the model built from ``src`` holds,
    as Transformers' own loading converts them (``get_model_conversion_mapping``): renames are free, and
    per-expert tensors stacked into one 3-D tensor (``MergeModulelist(dim=0)``, then gate and up
    concatenated, ``Concatenate(dim=1)``) become one tensor of pieces, expert by expert. None for a
    conversion that is not a rearrangement of whole tensors (the checkpoint is then copied)."""
    from .runtime import build_on_meta
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
    return units, resident, {"kind": "accelerate-offload-folder", "path": os.path.abspath(src), "files": source_files(src)}


def module_sources(model: nn.Module, units: Sequence[str] | None = None) -> tuple[list[UnitPlan], list[UnitSource]]:
    plans = plan_plain(model, find_units(model, units), torch.device("cpu"))
    return plans, sources_from_plans(plans)


def convert(src: str | os.PathLike[str] | nn.Module, dst: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
            units: Sequence[str] | None = None, allow_pickle: bool = False, quantize: str | None = None,
            group_size: int = 64, progress: bool = True) -> Store:
    """Convert a checkpoint into a store of per-unit files.

    A store converted from a folder is a complete checkpoint: beside the units and the resident
    weights it holds the folder's ``config.json``, ``generation_config.json`` and tokenizer files, and
    its manifest records where it came from (each source file's name, size, mtime and header hash)
    and the dtype it holds.

    Args:
        src: a Hugging Face model folder (``*.safetensors`` shards), an Accelerate ``offload_folder``
            (``index.json`` + ``.dat`` files), or a live ``nn.Module`` (its current weights).
        dst: the store folder: new, empty, or an interrupted conversion of the same source (resumed).
        dtype: cast floating-point tensors, e.g. ``torch.bfloat16`` or ``"bf16"`` (default: keep them).
        units: for a module, the names of the modules to stream (default: its repeated blocks).
        allow_pickle: accept ``pytorch_model*.bin`` checkpoints (loaded with ``weights_only=True``).
        quantize: ``"int8"`` (per output channel) or ``"int4"`` (group-wise, ``group_size`` 32/64/128):
            the units' linear weights are stored quantized (``offload.quant``); norms, biases and the
            resident part (embeddings, head) stay as they are. Needs torchao (``pip install offload[quant]``).

    Example:
        >>> store = offload.convert("bloom-7b1/", "bloom-7b1.store", dtype="bf16")
    """
    cast = _parse_dtype(dtype)
    q = quantization_of(quantize, group_size)
    dst = os.fspath(dst)
    extra = {"quantization": q} if q else None
    if isinstance(src, nn.Module):
        plans, sources = module_sources(src, units)
        _cast(sources, None, cast)
        source = _with_dtype({"kind": "module", "class": type(src).__name__, "fingerprint": fingerprint(
            (p.name, t.rel, str(t.dtype), t.shape) for p in plans for t in p.tensors)}, sources, None, cast)
        if q:
            quantize_sources(sources, module_policy(dict(src.named_modules()), q["scheme"], group_size),
                             q["scheme"], group_size)
            source["quantization"] = q
        return write_store(dst, sources, source, progress=progress, extra=extra)
    src = os.fspath(src)
    units_, resident, source = checkpoint_sources(src, cast, allow_pickle)
    if q:
        from .runtime import build_on_meta
        meta = build_on_meta(src, cast or checkpoint_dtype(src) or torch.float32)
        if not quantize_sources(units_, module_policy(dict(meta.named_modules()), q["scheme"], group_size),
                                q["scheme"], group_size):
            raise CheckpointError(f"{src}: no linear weight in its blocks can be stored {quantize} (group size "
                                  f"{group_size}): convert it without quantize=")
        source = dict(source, quantization=q)
        source["fingerprint"] = fingerprint([source.get("fingerprint"), sorted(q.items())])
    files = side_files(src)
    source = dict(source, side_files=side_file_provenance(src))
    return write_store(dst, units_, source, resident, progress=progress, files=files, edit=_side_edits(src, cast),
                       extra=extra)


def _side_edits(src: str, cast: torch.dtype | None) -> dict[str, Callable[[bytes], bytes]]:
    """How side files change on their way into a store: config.json says the dtype the store holds."""
    config = os.path.join(src, "config.json")
    return {config: lambda raw: _config_with_dtype(raw, cast)} if cast is not None and os.path.isfile(config) else {}


def side_file_provenance(src: str) -> list[dict[str, str]]:
    """Name and SHA-256 of each config/tokenizer file of a checkpoint folder (small files: hashing them
    whole is cheap), so an edited ``config.json`` or tokenizer is seen, not just changed weights."""
    out = []
    for f in side_files(src):
        with open(f, "rb") as fh:
            out.append({"name": os.path.basename(f), "sha256": hashlib.sha256(fh.read()).hexdigest()})
    return out


def checkpoint_sources(src: str, cast: torch.dtype | None = None, allow_pickle: bool = False
                       ) -> tuple[list[UnitSource], UnitSource | None, dict[str, Any]]:
    """The units, resident part and manifest ``source`` of a checkpoint folder, from metadata only.

    Safetensors and Accelerate folders are described from their headers and index: no tensor data
    is read until a unit is written, so this also plans a model (``offload run --dry-run``) cheaply.
    """
    kind = source_kind(src)
    if kind == "accelerate-offload-folder":
        units_, resident, source = _accelerate_folder_sources(src)
    elif kind == "hf-safetensors":
        units_, resident, source = _hf_sources(src, None)
    else:
        if not allow_pickle:
            raise CheckpointError(f"{src} holds only pickle checkpoints (*.bin); pickle can run arbitrary code, so they "
                                  f"are refused. Convert them to safetensors, or pass allow_pickle=True "
                                  f"(`--allow-pickle`) to load them with torch.load(weights_only=True)")
        units_, resident, source = _pickle_sources(src, None)
    if not units_:
        raise CheckpointError(f"{src}: found no per-block tensors (names like 'model.layers.0.*') to stream")
    _cast(units_, resident, cast)
    return units_, resident, _with_dtype(source, units_, resident, cast)


def source_kind(src: str) -> str:
    """``"hf-safetensors"``, ``"accelerate-offload-folder"`` or ``"pickle"``: what ``convert`` reads in ``src``."""
    if not os.path.isdir(src):
        raise CheckpointError(f"{src} is not a folder: pass a Hugging Face model folder or an Accelerate offload folder")
    names = os.listdir(src)
    if "index.json" in names and any(n.endswith(".dat") for n in names):
        return "accelerate-offload-folder"
    if any(n.endswith(".safetensors") for n in names):
        return "hf-safetensors"
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        return "pickle"
    raise CheckpointError(f"{src} holds no *.safetensors shards nor an Accelerate index.json: nothing to convert")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def source_files(src: str) -> list[dict[str, Any]]:
    """Provenance of the files ``convert`` reads in ``src`` (see ``store.file_provenance``): the
    manifest's ``source.files``, and what a cached store is checked against before it is reused."""
    kind = source_kind(src)
    if kind == "hf-safetensors":
        paths = _shard_files(src)
    elif kind == "accelerate-offload-folder":
        names = os.listdir(src)
        paths = [os.path.join(src, "index.json")] + sorted(os.path.join(src, n) for n in names if n.endswith(".dat"))
    else:
        paths = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(PICKLE_SUFFIXES))
    return [file_provenance(p) for p in paths]


def _cast(units: Sequence[UnitSource], resident: UnitSource | None, cast: torch.dtype | None) -> None:
    if cast is None:
        return
    for s in list(units) + ([resident] if resident is not None else []):
        s.specs = [TensorSpec(x.name, cast if x.dtype.is_floating_point else x.dtype, x.shape) for x in s.specs]


def _with_dtype(source: dict[str, Any], units: Sequence[UnitSource], resident: UnitSource | None,
                cast: torch.dtype | None) -> dict[str, Any]:
    """Add what the store holds to ``source``: ``dtype`` (torch's name), ``quantization`` (none: the caller
    sets it after quantizing), and
    a ``fingerprint`` of the files and dtype (an interrupted conversion resumes only when it matches)."""
    specs = [x for u in list(units) + ([resident] if resident is not None else []) for x in u.specs]
    held = cast or main_float_dtype((x.dtype, x.nbytes) for x in specs)
    out = dict(source, dtype=str(held).removeprefix("torch.") if held is not None else None, quantization=None)
    if "files" in source:
        out["fingerprint"] = fingerprint([out["kind"], out["dtype"], *(sorted(f.items()) for f in source["files"])])
    return out


# Files besides the weights that make a store a complete checkpoint: the model's configs and whatever
# its tokenizer or processor loads (AutoTokenizer reads some of these, depending on the tokenizer).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "preprocessor_config.json",
              "processor_config.json")
TOKENIZER_FILES = tuple(n for n in SIDE_FILES if n not in ("config.json", "generation_config.json",
                                                           "preprocessor_config.json", "processor_config.json"))


def side_files(src: str) -> list[str]:
    """The config and tokenizer files in ``src`` that ``convert`` copies into the store."""
    return sorted(os.path.join(src, n) for n in os.listdir(src)
                  if os.path.isfile(os.path.join(src, n))
                  and (n in SIDE_FILES or n.startswith("chat_template.") or n.endswith(".tiktoken")))


def tokenizer_files(folder: str) -> list[str]:
    """The tokenizer files in ``folder`` (a checkpoint or a store); empty when it has no tokenizer."""
    return [p for p in side_files(folder) if os.path.basename(p) in TOKENIZER_FILES
            or os.path.basename(p).startswith("chat_template.") or p.endswith(".tiktoken")]


def _config_with_dtype(raw: bytes, dtype: torch.dtype) -> bytes:
    """config.json with its dtype set to what the store holds (a store converted with ``dtype=``)."""
    doc = json.loads(raw)
    name = str(dtype).removeprefix("torch.")
    doc["dtype"] = name
    if "torch_dtype" in doc:
        doc["torch_dtype"] = name
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


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
    resident = source(RESIDENT, groups[None]) if None in groups else None
    return units, resident, {"kind": "pickle", "path": os.path.abspath(src), "files": source_files(src)}


_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(_DTYPE_NAMES)}") from None


# ------------------------------------------------------------------------------ cached stores


def checkpoint_dtype(folder: str) -> torch.dtype | None:
    """The dtype a checkpoint folder is meant to run in: config.json's ``dtype`` (or ``torch_dtype``),
    else the floating dtype of most of its weights (safetensors headers; no data read)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(folder, "config.json")) as f:
            doc = json.load(f)
        name = doc.get("dtype") or doc.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name.removeprefix("torch."), None), torch.dtype):
            return getattr(torch, name.removeprefix("torch."))
    with contextlib.suppress(CheckpointError):
        if source_kind(folder) == "hf-safetensors":
            units, resident, _ = checkpoint_sources(folder)
            return main_float_dtype((x.dtype, x.nbytes) for u in units + ([resident] if resident else []) for x in u.specs)
    return None


def store_cache_path(folder: str, dtype: torch.dtype, quantize: str | None = None) -> str:
    """Where ``cached_store`` keeps the store of ``folder`` in ``dtype``: named after the folder, and
    keyed by a hash of its absolute path, so two checkpoints with the same folder name never share."""
    import hashlib

    from .config import cache_dir
    folder = os.path.abspath(folder)
    key = hashlib.sha256(folder.encode()).hexdigest()[:12]
    tag = str(dtype).removeprefix("torch.") + (f"-{quantize}" if quantize else "")
    return os.path.join(cache_dir(), "stores", f"{os.path.basename(folder)}-{key}-{tag}")


def cached_store(folder: str, dtype: torch.dtype | str | None = None, rebuild: bool = False,
                 allow_pickle: bool = False, progress: bool = True,
                 note: Callable[[str], None] | None = None, quantize: str | None = None,
                 group_size: int = 64) -> str:
    """The store of a checkpoint folder, converted once into the cache and reused while it is current.

    A cached store is reused only when the folder's weight files (name, size, mtime, safetensors
    header hash) and the dtype match what its manifest recorded; otherwise (or with ``rebuild``) it
    is rebuilt in a temporary folder beside it and swapped in. A pickle-only folder is refused
    unless ``allow_pickle``, whatever is cached.

    Args:
        folder: a Hugging Face model folder (or an Accelerate offload folder).
        dtype: the dtype to hold (``"bf16"``, ``torch.float16``...); default: the checkpoint's own
            (config.json's ``dtype``, else its weights').
        rebuild: convert again even if the cached store is current.
        allow_pickle: accept ``*.bin`` pickle checkpoints (``torch.load(weights_only=True)``).
        progress: progress bars, and the one line saying whether the store is reused or rebuilt.
        note: where that line goes (default: stderr when ``progress``, else the ``offload`` logger).
        quantize, group_size: store the blocks' linear weights int8/int4 (see ``convert``); part of the
            cache key, so the plain and quantized stores of one folder live side by side.

    Returns:
        The store's path (``$OFFLOAD_CACHE/stores/<name>-<path hash>-<dtype>``).

    Example:
        >>> model, handle = offload.load("my-llama/", prefetch=2)  # offload.load calls it for a folder
    """
    import logging
    import sys
    say = note or ((lambda s: print(s, file=sys.stderr, flush=True)) if progress else logging.getLogger("offload").info)
    folder = os.path.abspath(os.fspath(folder))
    kind = source_kind(folder)
    if kind == "pickle" and not allow_pickle:
        checkpoint_sources(folder)  # raises the pickle refusal, whatever is cached
    want = _parse_dtype(dtype) or checkpoint_dtype(folder)
    if want is None:
        raise CheckpointError(f"{folder}: cannot tell its dtype (no dtype in config.json, no floating-point "
                              f"weights): pass dtype= (--dtype)")
    q = quantization_of(quantize, group_size)
    path = store_cache_path(folder, want, quantize)
    with _build_lock(path, say):  # another process may be building (or refreshing) this very store
        files = source_files(folder)
        why = "--rebuild" if rebuild else "no store cached yet"
        if not rebuild and os.path.exists(os.path.join(path, MANIFEST)):
            try:
                st = Store.open(path)
                why = _stale_reason(st.source, files, want)
                if why is None and st.quantization != q:
                    why = f"it is quantized {st.quantization}, not {q}"
            except StoreError as e:
                why = f"the cached store is damaged ({e})"
            if why is None:
                changed = _refresh_side_files(st, folder, want)
                say(f"offload: reusing store {path} (built from {folder}; its weight files and dtype "
                    f"{str(want).removeprefix('torch.')} are unchanged"
                    + (f"; refreshed {', '.join(changed)}, changed in the folder)" if changed else ")"))
                return path
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
        index = in_place_units(folder, want) if kind == "hf-safetensors" and q is None else None
        if index is not None or (os.path.exists(tmp) and not os.path.exists(os.path.join(tmp, IN_PROGRESS))):
            shutil.rmtree(tmp, ignore_errors=True)  # a finished build never swapped in, or debris: start over
        if index is not None:
            say(f"offload: indexing {folder} to read it in place, no copy: {len(index[0])} units, a few KB ({why})")
            write_index(folder, tmp, index[0], index[1], want)
        else:
            own = checkpoint_dtype(folder)
            reason = (f"quantized {quantize}" if q is not None else "a pickle checkpoint" if kind == "pickle" else
                      "an Accelerate offload folder" if kind != "hf-safetensors" else
                      f"cast from {str(own).removeprefix('torch.')}" if own != want else
                      "its tensors are too scattered to read in place")
            say(f"offload: building store {path} from {folder} ({why}): a copy, {reason} (its size is checked "
                f"against free disk space first)")
            convert(folder, tmp, dtype=want, allow_pickle=allow_pickle, quantize=quantize, group_size=group_size,
                    progress=progress)
        old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{os.getpid()}")
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path


@contextlib.contextmanager
def _build_lock(path: str, say: Callable[[str], None]) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` while a cached store is checked, built or swapped in.

    Two processes loading the same folder at once would otherwise both write ``.partial`` and swap
    each other's result away. The lock file itself is left in place (removing it would let a third
    process lock a new file while the second still holds the old one); the kernel drops the lock
    when its holder exits, however it exits.
    """
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"offload: waiting for another process building {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _refresh_side_files(st: Store, folder: str, dtype: torch.dtype) -> list[str]:
    """Bring a current cached store's config/tokenizer files up to the folder's (an edited
    ``rope_theta`` must not need a rebuild of the weights, nor be ignored); return what changed."""
    now = side_file_provenance(folder)
    recorded = st.source.get("side_files")
    if recorded == now:
        return []
    old = {d.get("name"): d.get("sha256") for d in recorded or [] if isinstance(d, dict)}
    changed = sorted({d["name"] for d in now if old.get(d["name"]) != d["sha256"]} | (set(old) - {d["name"] for d in now}))
    for name in set(st.manifest.get("side_files") or {}) - {d["name"] for d in now}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(st.path, name))  # gone from the folder: gone from the store
    stored = _copy_side_files(st.path, side_files(folder), _side_edits(folder, dtype))
    manifest = dict(st.manifest, source=dict(st.source, side_files=now), side_files=stored)
    write_atomic(os.path.join(st.path, MANIFEST), json.dumps(manifest, indent=1).encode())
    return [str(n) for n in changed] or ["side files"]


def _stale_reason(source: dict[str, Any], files: list[dict[str, Any]], dtype: torch.dtype) -> str | None:
    """Why a cached store does not match the folder now (None: it does)."""
    held = source.get("dtype")
    if held != str(dtype).removeprefix("torch."):
        return f"it holds {held}, not {str(dtype).removeprefix('torch.')}"
    old = {f.get("name"): f for f in source.get("files") or [] if isinstance(f, dict)}
    new = {f["name"]: f for f in files}
    changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
    if changed:
        return f"source files changed: {', '.join(str(n) for n in changed[:3])}{'...' if len(changed) > 3 else ''}"
    return None
