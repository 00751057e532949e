"""What a store is written from: a checkpoint folder (or a module) as unit sources, from metadata.

One concept: the source side of a conversion. A folder's kind (Hugging Face safetensors shards,
Accelerate's ``offload_folder``, pickle), its tensors grouped into units (``writer.UnitSource``:
specs now, each tensor fetched only when the writer asks for it), the config and tokenizer files
that make a store a complete checkpoint, the provenance of every file read (what a cached store is
checked against) and the dtype it holds. Nothing here writes; a source is only opened read-only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, StoreError
from .integrity import file_provenance, fingerprint, read_safetensors_header
from .manifest import DTYPES, TensorSpec, main_float_dtype
from .plan import UnitPlan, _numel, find_units, plan_plain
from .ranges import SourceTensor
from .writer import Fetch, UnitSource

log = logging.getLogger("offload")

RESIDENT = "__resident__"


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


def _hf_sources(src: str, dtype: torch.dtype | None, model: nn.Module | None
                ) -> tuple[list[UnitSource], UnitSource | None, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    fused = fused_tensors(src, model)
    if fused is not None:  # per-expert tensors the model holds stacked: written as it holds them
        return _fused_sources(src, fused, dtype)
    shards = _shard_files(src)
    key_shard: dict[str, str] = {}
    meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for shard in shards:
        try:
            f = safe_open(shard, framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard} is not a readable safetensors file ({str(e).strip() or type(e).__name__}): "
                                  f"it is truncated or damaged; download it again") from None
        with f:
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


def fused_tensors(src: str, model: nn.Module | None) -> list[SourceTensor] | None:
    """The checkpoint's tensors as ``model`` (built from ``src`` on meta) names and lays them out, when that
    stacks per-expert tensors into fused ones (Transformers 5 loading a MoE checkpoint); None when it does not
    (or they cannot be mapped): the checkpoint's own names are the model's. What a copy (``convert``) writes,
    as reading in place indexes it."""
    read = _header_tensors(src)
    if read is None:
        return None
    wanted = _as_the_model_names_them(model, read[0])
    return wanted if wanted is not None and any(len(t.pieces) > 1 for t in wanted) else None


def _as_the_model_names_them(model: nn.Module | None, tensors: dict[str, tuple[str, tuple[int, ...], str, int, int]]
                             ) -> list[Any] | None:
    """The checkpoint's tensors under the names, and in the layout, ``model`` (built from the checkpoint on
    meta: ``folder_model``; None without a config.json) holds, as Transformers' own loading converts them
    (``get_model_conversion_mapping``): renames are free, and per-expert tensors stacked into one 3-D tensor
    (``MergeModulelist(dim=0)``, then gate and up concatenated, ``Concatenate(dim=1)``) become one tensor of
    pieces, expert by expert. None for a conversion that is not a rearrangement of whole tensors (the
    checkpoint is then copied)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older Transformers converts nothing at load time: names are the model's
        get_model_conversion_mapping = None
    if get_model_conversion_mapping is None or model is None:
        # not a Transformers checkpoint (or no conversions to apply): the names are the model's own
        return [SourceTensor(k, dt, shape, ((f, o, n),)) for k, (dt, shape, f, o, n) in tensors.items()]
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
    unused = []  # the checkpoint's tensors the model has no place for: not loaded, as Transformers does
    names: dict[tuple[str, str], tuple[str, str]] = {}  # (target, pattern) -> one piece's key and its expert
    for k, (dt, shape, f, o, n) in tensors.items():
        target, pattern = rename_source_key(k, renamings, converters, prefix, meta)
        if target not in meta:  # multi-token-prediction layers (DeepSeek-V3, GLM-4.5, Qwen3-Next), stale buffers
            unused.append(k)
            continue
        if pattern is None:
            out.append(SourceTensor(target, dt, shape, ((f, o, n),), resident=target in buffers))
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
        m = re.search(re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)"), k)
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or m is None:
            return None
        entry = fused.setdefault(target, (conv, {p: {} for p in conv.source_patterns}, dt))
        if dt != entry[2]:  # the pieces are joined as bytes: one dtype, or another's bits read as this one's
            raise CheckpointError(f"{k} is {dt} while the other tensors {target} is stacked from are {entry[2]}: "
                                  f"offload reads a stacked tensor's pieces as one dtype. Save the checkpoint in one "
                                  f"dtype (load it with Transformers and save_pretrained)")
        entry[1][pattern][int(m.group(1))] = (f, o, n)
        names[(target, pattern)] = (k, m.group(1))
    if unused and 2 * sum(tensors[k][4] for k in unused) > sum(v[4] for v in tensors.values()):
        raise CheckpointError(f"most of the checkpoint's weights have no place in {type(model).__name__} (e.g. "
                              f"{unused[0]}; the model has {next(iter(meta), '?')}): its names do not match this "
                              f"model's (another architecture in config.json, or a prefix the checkpoint adds)")
    if unused:
        log.info("offload: %d tensor(s) of the checkpoint are not in %s and are not loaded (as Transformers does), "
                 "e.g. %s", len(unused), type(model).__name__, unused[0])
    for target, (conv, by_pattern, dt) in fused.items():
        experts = sorted(set().union(*(set(v) for v in by_pattern.values())))
        for p, v in by_pattern.items():
            if missing := [e for e in experts if e not in v]:
                key, at = names[(target, p)]
                name = re.sub(rf"(?<=\.){at}(?=\.)", str(missing[0]), key, count=1)
                raise CheckpointError(f"the checkpoint has no {name} (expert {missing[0]}'s part of {target}, which "
                                      f"its other experts have): the checkpoint is incomplete; download it again")
        pieces = tuple(by_pattern[p][e] for e in experts for p in conv.source_patterns)
        t = SourceTensor(target, dt, meta[target], pieces)
        if _numel(meta[target]) * DTYPES[dt].itemsize != t.nbytes:
            return None
        out.append(t)
    return out


def _fused_sources(src: str, tensors: Sequence[Any], dtype: torch.dtype | None
                   ) -> tuple[list[UnitSource], UnitSource | None, dict[str, Any]]:
    """Units of ``tensors`` (``ranges.SourceTensor``: the model's names, each tensor's bytes as pieces of the
    shards, in order), each tensor assembled from its pieces when the writer asks for it."""
    groups: dict[str | None, list[Any]] = {}
    for t in tensors:
        groups.setdefault(None if t.resident else unit_of_key(t.name), []).append(t)

    def source(name: str, ts: list[Any]) -> UnitSource:
        prefix = "" if name == RESIDENT else name + "."
        by_rel = {t.name[len(prefix):]: t for t in ts}
        specs = []
        for rel, t in by_rel.items():
            dt = DTYPES[t.dtype]
            specs.append(TensorSpec(rel, dtype if dtype is not None and dt.is_floating_point else dt, t.shape))

        @contextlib.contextmanager
        def opened() -> Iterator[Fetch]:
            with contextlib.ExitStack() as stack:
                files: dict[str, Any] = {}  # each shard opened once per unit (a tensor can be hundreds of pieces)

                def fetch(rel: str) -> torch.Tensor:
                    t = by_rel[rel]
                    buf = bytearray(t.nbytes)
                    view, at = memoryview(buf), 0
                    for f, offset, n in t.pieces:
                        path = os.path.join(src, f)
                        if path not in files:
                            files[path] = stack.enter_context(open(path, "rb"))
                        fh = files[path]
                        fh.seek(offset)
                        got = fh.readinto(view[at:at + n])
                        if got != n:
                            raise CheckpointError(f"{path} ended early reading {t.name} ({got} of {n} bytes at offset "
                                                  f"{offset}): the shard is truncated or changed; download it again")
                        at += n
                    out = (torch.frombuffer(buf, dtype=DTYPES[t.dtype]) if t.nbytes
                           else torch.empty(0, dtype=DTYPES[t.dtype]))
                    return out.view(t.shape)
                yield fetch
        return UnitSource(name, specs, opened)

    units = sorted((source(n, ts) for n, ts in groups.items() if n is not None), key=lambda u: _natural_key(u.name))
    resident = source(RESIDENT, groups[None]) if None in groups else None
    return units, resident, {"kind": "hf-safetensors", "path": os.path.abspath(src), "files": source_files(src)}


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
        model = folder_model(src, cast or torch.float32)  # names and shapes; in ``cast``, its kept dtypes too
        units_, resident, source = _hf_sources(src, None, model)
    else:
        if not allow_pickle:
            raise CheckpointError(f"{src} holds only pickle checkpoints (*.bin); pickle can run arbitrary code, so they "
                                  f"are refused. Convert them to safetensors, or pass allow_pickle=True "
                                  f"(`--allow-pickle`) to load them with torch.load(weights_only=True)")
        units_, resident, source = _pickle_sources(src, None)
    if not units_:
        raise CheckpointError(f"{src}: found no per-block tensors (names like 'model.layers.0.*') to stream")
    _cast(units_, resident, cast, _kept_dtypes(model, cast) if kind == "hf-safetensors" else {})
    return units_, resident, _with_dtype(source, units_, resident, cast)


def folder_model(src: str, dtype: torch.dtype) -> nn.Module | None:
    """The model of a Transformers checkpoint folder on meta (its names, shapes and kept dtypes), or None
    without a config.json; built once per description of a checkpoint (a large MoE's takes seconds)."""
    if not os.path.exists(os.path.join(src, "config.json")):
        return None
    from .meta import build_on_meta
    return build_on_meta(src, dtype)


def _kept_dtypes(model: nn.Module | None, cast: torch.dtype | None) -> dict[str, torch.dtype]:
    """What ``model`` (built in ``cast``) holds each floating tensor as, by name, when that is not ``cast``: a
    module Transformers keeps in float32 (``_keep_in_fp32_modules``: DeepSeek-V3's router, T5's ``wo``) stays
    so in the store, or the store would not match the model."""
    if cast is None or model is None:
        return {}
    return {k: v.dtype for k, v in model.state_dict().items() if v.dtype.is_floating_point and v.dtype != cast}


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
    """Provenance of the files ``convert`` reads in ``src`` (see ``integrity.file_provenance``): the
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


def _cast(units: Sequence[UnitSource], resident: UnitSource | None, cast: torch.dtype | None,
          kept: dict[str, torch.dtype] | None = None) -> None:
    """Floating tensors to ``cast``, except those the model keeps in another dtype (``kept``, by full name)."""
    if cast is None:
        return
    kept = kept or {}
    for s in list(units) + ([resident] if resident is not None else []):
        prefix = "" if s.name == RESIDENT else s.name + "."
        s.specs = [TensorSpec(x.name, kept.get(prefix + x.name, cast) if x.dtype.is_floating_point else x.dtype,
                              x.shape) for x in s.specs]


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
