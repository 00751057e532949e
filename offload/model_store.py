"""The store a live model streams from (``enable``): where it is, and whether an existing one may be reused.

A store is found or made once per model: Accelerate's offload folder (``offload-store`` inside it),
the cache entry of the model's checkpoint files (its fingerprint), else a temporary folder that
``disable`` removes. An existing store is reused only after checks (its quantization, each unit's
tensors, the checkpoint files it came from or the weights' own checksums); a mismatch is an error,
never a silent rewrite. A missing one is written: read in place from Accelerate's offload folder
where it can be, else copied from the model's tensors (quantized when asked).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import cache_dir
from .convert import module_policy, quantize_sources
from .errors import StoreMismatchError
from .in_place import accelerate_units, write_accelerate_index
from .integrity import fingerprint
from .manifest import MANIFEST
from .plan import UnitPlan, offload_folder_of
from .sources import sources_from_plans
from .store import Store
from .writer import unit_crc, write_store


def store_folder(model: nn.Module, store: str | os.PathLike[str] | None, kind: str, fp: str) -> tuple[str, bool]:
    """The folder of the model's store and whether it is temporary (removed by ``disable``): ``store``
    when given, else Accelerate's offload folder, the cache entry of an Accelerate model's checkpoint
    files, or a new temporary folder."""
    temp_store = False
    if store is None:
        folder = offload_folder_of(model) if kind == "accelerate" else None
        if folder:
            store = os.path.join(folder, "offload-store")
        elif kind == "accelerate" and not fp.startswith("content:"):
            store = os.path.join(cache_dir(), "stores", fp)
        else:
            store = tempfile.mkdtemp(prefix="store-", dir=cache_dir())
            temp_store = True
            from ._cache import write_owner
            write_owner(store)  # `offload cache` tells a live process's store from a crashed one's
    return os.fspath(store), temp_store


def open_store(path: str, model: nn.Module, plans: Sequence[UnitPlan], kind: str, fp: str,
               quantization: dict[str, Any] | None, group_size: int | None, *, progress: bool
               ) -> tuple[Store, dict[str, Any] | None]:
    """The store at ``path``, reused after the checks, or written there; and the quantization it holds
    (``"int4"`` asked without a group size means the store's own)."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        st = Store.open(path)
        if quantization and group_size is None and st.quantization and st.quantization["scheme"] == quantization["scheme"]:
            quantization = st.quantization  # "int4" means the store's group size unless one is named
        _check_quantization(st, quantization)
        st.match(_expected(plans, st))
        _check_reused(st, plans, fp, _sources(model, plans, quantization))
    else:
        source = {"kind": kind, "class": type(model).__name__, "fingerprint": fp, "quantization": quantization}
        in_place = accelerate_units(plans) if kind == "accelerate" and not quantization else None
        if in_place is not None:  # read where Accelerate's offload index points: no second copy
            st = write_accelerate_index(path, in_place, source)
        else:
            st = write_store(path, _sources(model, plans, quantization), source, progress=progress,
                             extra={"quantization": quantization} if quantization else None)
        st.match(_expected(plans, st))
    return st, quantization


def _expected(plans: Sequence[UnitPlan], store: Store | None = None
              ) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """What each unit's file must hold for this model: its tensors, or for a weight the store holds
    quantized, that weight's parts (checked against the weight's own shape and dtype)."""
    from .quant import quantized_specs
    out = {}
    for p in plans:
        rec = store.by_name.get(p.name) if store is not None else None
        quantized = {q.name: q for q in rec.quantized} if rec is not None else {}
        want: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for t in p.tensors:
            q = quantized.get(t.rel)
            if q is None:
                want[t.rel] = (t.dtype, t.shape)
                continue
            if (q.torch_dtype, q.shape) != (t.dtype, t.shape):
                raise StoreMismatchError(f"store {store.path}: unit {p.name} holds {t.rel} quantized from "  # type: ignore[union-attr]
                                         f"{q.torch_dtype} {list(q.shape)}, the model has {t.dtype} {list(t.shape)}")
            qz = store.quantization or {}  # type: ignore[union-attr]
            for name, dt, shape in quantized_specs(t.rel, t.shape, t.dtype, qz.get("scheme", ""),
                                                   qz.get("group_size") or 64, transposed=q.transposed):
                want[name] = (dt, shape)
        out[p.name] = want
    return out


def _sources(model: nn.Module, plans: Sequence[UnitPlan], quantization: dict[str, Any] | None) -> list[Any]:
    """The unit sources a store is written from (and compared with): the model's tensors, quantized when asked."""
    sources = sources_from_plans(plans)
    if quantization:
        scheme, group = quantization["scheme"], quantization.get("group_size") or 64
        quantize_sources(sources, module_policy(dict(model.named_modules()), scheme, group), scheme, group)
    return sources


def _check_quantization(store: Store, want: dict[str, Any] | None) -> None:
    have = store.quantization
    same = (have is None and want is None) or (have is not None and want is not None and have.get("scheme") ==
                                                 want.get("scheme") and have.get("group_size") == want.get("group_size"))
    if not same:
        def say(q: dict[str, Any] | None) -> str:
            return "unquantized" if q is None else f"{q['scheme']}" + (f" (group {q['group_size']})" if q.get("group_size") else "")
        fix = (f"pass quantize={have['scheme']!r}" + (f", group_size={have['group_size']}" if have.get("group_size") else "")
               if have is not None else "enable without quantize=")
        raise StoreMismatchError(f"store {store.path} holds {say(have)} units but {say(want)} ones were asked for: "
                                 f"{fix} to use this store, or pass another store=")


def source_fingerprint(plans: Sequence[UnitPlan], kind: str) -> str:
    if kind == "accelerate" and all(t.source_id is not None for p in plans for t in p.tensors):
        return fingerprint((p.name, t.rel, str(t.dtype), t.shape, t.source_id) for p in plans for t in p.tensors)
    # No file identity (a plain module, or weights Accelerate keeps in RAM): the content decides,
    # through the per-unit checksums compared when a store is reused.
    return "content:" + fingerprint((p.name, t.rel, str(t.dtype), t.shape) for p in plans for t in p.tensors)


def _check_reused(store: Store, plans: Sequence[UnitPlan], fp: str, sources: Sequence[Any]) -> None:
    have = str(store.source.get("fingerprint", ""))
    if not fp.startswith("content:"):
        if have != fp:
            raise StoreMismatchError(f"store {store.path} was built from other checkpoint files than this model's "
                                     f"(source fingerprint {have[:12]} vs {fp[:12]}): delete it or pass another store=")
        return
    for p in plans:
        if any(t.owner._parameters.get(t.attr) is not None and t.owner._parameters[t.attr].device.type == "meta"
               for t in p.tensors if t.is_param):
            continue  # a model built on meta has no weights to compare: the store is its weights
        rec = store.by_name[p.name]
        src = next(u for u in sources if u.name == p.name)
        with src.open_fetch() as fetch:
            crc = unit_crc(p.name, src.specs, fetch)
        if crc != rec.crc32:
            raise StoreMismatchError(f"store {store.path}: unit {p.name} holds different weights than the model "
                                     f"(checksum {rec.crc32:08x} vs {crc:08x}): delete the store or pass another store=")
