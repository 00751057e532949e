"""Checkpoint → store: ``convert`` writes a copy in one streaming pass; ``cached_store`` keeps a
folder's store in the cache and reuses it while it is current.

Sources (``sources``): a Hugging Face model folder (``*.safetensors`` shards, optional index),
Accelerate's ``offload_folder`` (``index.json`` + one ``.dat`` memmap per tensor), a live
``nn.Module``, or the plan ``offload.enable`` builds from an Accelerate-dispatched model; the blocks'
linear weights optionally quantized on the way (``quantize_sources``). Each unit is written with at
most one source tensor in memory, resumably (``writer.write_store``). A cached store is that copy,
or an index that reads the folder in place (``in_place``); a lock serialises its builders, and the
provenance of the folder's files says when it is stale.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ._fileio import in_use
from .errors import CheckpointError, OffloadError, StoreError
from .in_place import in_place_units, write_index
from .integrity import fingerprint
from .manifest import IN_PROGRESS, MANIFEST, QuantRecord, TensorSpec, dtype_name
from .sources import (_cast, _parse_dtype, _side_edits, _with_dtype, checkpoint_dtype, checkpoint_sources, module_sources,
                      side_file_provenance, side_files, source_files, source_kind)
from .store import Store
from .writer import UnitSource, _copy_side_files, write_atomic, write_store

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
        from .meta import build_on_meta
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



def store_cache_path(folder: str, dtype: torch.dtype, quantize: str | None = None) -> str:
    """Where ``cached_store`` keeps the store of ``folder`` in ``dtype``: named after the folder, and
    keyed by a hash of its absolute path, so two checkpoints with the same folder name never share."""
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
        if not in_use(old):  # a process still reading it keeps it: `offload cache clean` removes it later
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
    try:  # the first write in the cache folder: where an unwritable one shows
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OffloadError(f"cannot write in the cache folder {os.path.dirname(path)} ({e.strerror or e}): set "
                           f"OFFLOAD_CACHE to a writable folder") from None
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
