"""Drafts: what a draft costs in RAM before it is built, and building one (a quantized self-draft, a folder).

One concept: the draft model of speculative decoding. ``draft_bytes`` counts a draft's own memory
from metadata (a handle, a model, a store or checkpoint folder, a transformers config);
``build_self_draft`` quantizes the target's streamed units into a second module tree that shares
every resident tensor; ``load_folder_draft`` loads a separate small model with the target's vocabulary.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import OffloadError

MODES = ("ngram", "int8", "int4")
INT4_GROUP_SIZE = 64


# --------------------------------------------------------------------------------------------------
# draft memory, before building it


def _quantizable(module: nn.Module, attr: str, dtype: torch.dtype, shape: Sequence[int], scheme: str,
                 group_size: int) -> bool:
    from .. import quant
    probe = torch.empty(tuple(shape), dtype=dtype, device="meta")
    return quant.is_quantizable("", attr, probe, module, scheme=scheme, group_size=group_size)


def _quantized_bytes(module: nn.Module, attr: str, dtype: torch.dtype, shape: Sequence[int], scheme: str,
                     group_size: int) -> int:
    """Bytes one unit tensor takes in the self-draft: quantized if it is a quantizable linear weight."""
    from .. import quant
    if _quantizable(module, attr, dtype, shape, scheme, group_size):
        specs = quant.quantized_specs(attr, tuple(shape), dtype, scheme, group_size,
                                      transposed=quant.is_transposed_linear(module))
        return sum(math.prod(sh) * dt.itemsize for _, dt, sh in specs)
    return math.prod(shape) * dtype.itemsize


def _owner(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    mod, _, attr = dotted.rpartition(".")
    return (model.get_submodule(mod) if mod else model), attr


def _unit_tensors_of(target: Any, dtype: torch.dtype | None) -> tuple[nn.Module, list[tuple[str, torch.dtype,
                                                                                             tuple[int, ...]]]]:
    """(a model whose modules tell which tensors are linear weights, [(full name, dtype, shape)] of every
    tensor in a streamed unit) for a handle, an enabled or plain model, a store, a checkpoint folder or a
    transformers config."""
    from ..plan import find_units
    from ..handle import Handle
    if isinstance(target, Handle) or (isinstance(target, nn.Module) and _handle_of(target) is not None):
        handle = target if isinstance(target, Handle) else _handle_of(target)
        assert handle is not None
        model = handle._model
        names = {id(m): n for n, m in model.named_modules()}
        out = []
        for h in handle._hooks:
            for b in h.bindings:
                n = names[id(b.owner)]
                out.append((f"{n}.{b.attr}" if n else b.attr, b.dtype, tuple(b.shape)))
        return model, out
    if isinstance(target, nn.Module):
        out = []
        for uname, unit in find_units(target):
            for rel, t in list(unit.named_parameters()) + list(unit.named_buffers()):
                out.append((f"{uname}.{rel}", t.dtype, tuple(t.shape)))
        return target, out
    if isinstance(target, (str, os.PathLike)):
        from ..meta import build_on_meta
        from ..manifest import MANIFEST
        from ..store import Store
        path = os.fspath(target)
        if os.path.exists(os.path.join(path, MANIFEST)):
            st = Store.open(path, check_files=False)
            dt = dtype or st.dtype or torch.float32
            model = build_on_meta(path, dt)
            out = []
            for u in st.units:
                quantized = list(getattr(u, "quantized", ()))  # a quantized store: the weights, not their parts
                out += [(f"{u.name}.{q.name}", q.torch_dtype, tuple(q.shape)) for q in quantized]
                out += [(f"{u.name}.{t.name}", t.torch_dtype, tuple(t.shape)) for t in u.tensors
                        if not t.name.startswith("__offload_pad_")
                        and not any(t.name.startswith(q.name + ".") for q in quantized)]
            return model, [(n, dtype if (dtype and d.is_floating_point) else d, sh) for n, d, sh in out]
        from ..sources import checkpoint_dtype, checkpoint_sources
        dt = dtype or checkpoint_dtype(path) or torch.float32
        units, _, _ = checkpoint_sources(path, dt)
        return build_on_meta(path, dt), [(f"{u.name}.{s.name}", s.dtype, tuple(s.shape)) for u in units
                                         for s in u.specs]
    if hasattr(target, "to_dict") and hasattr(target, "model_type"):  # a transformers config
        from ..meta import build_on_meta
        model = build_on_meta(target, dtype or torch.float32)  # the library never imports the CLI
        return _unit_tensors_of(model, None)
    raise TypeError(f"draft_bytes: expected a Handle, a model, a store or checkpoint folder, or a transformers config; "
                    f"got {type(target).__name__}")


def folder_bytes(folder: str | os.PathLike[str], dtype: torch.dtype | None = None) -> int:
    """Weight bytes of a Hugging Face folder's safetensors files (from their headers), in ``dtype`` when given."""
    from ..integrity import read_safetensors_header
    from ..manifest import DTYPES
    folder = os.fspath(folder)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise OffloadError(f"draft folder {folder} has no *.safetensors weights")
    total = 0
    for f in files:
        header, _ = read_safetensors_header(os.path.join(folder, f))
        for name, h in header.items():
            if name == "__metadata__" or not isinstance(h, dict):
                continue
            dt = DTYPES.get(h["dtype"], torch.uint8)
            if dtype is not None and dt.is_floating_point:
                dt = dtype
            total += math.prod(h["shape"]) * dt.itemsize
    return total


def draft_bytes(target: Any, speculate: str, *, group_size: int = INT4_GROUP_SIZE,
                dtype: torch.dtype | None = None, quantize_head: bool = False) -> int:
    """Bytes of RAM the draft for ``speculate`` will hold, computed without building it.

    ``target`` is the offload ``Handle``, the (enabled) model, its store or checkpoint folder, or its
    transformers config. ``"ngram"``: 0. ``"int8"``/``"int4"``: every tensor of the streamed units, the
    linear weights quantized (``offload.quant``'s stored tensors), the rest (norms, biases) in their
    dtype; the embeddings, norms and head outside the units are the target's, shared, so not counted.
    FOLDER: its safetensors weights (in ``dtype`` if given). ``dtype`` overrides the target's dtype for
    a folder or config target. ``quantize_head``: the self-draft's own quantized head is counted too.
    """
    mode = _mode(speculate)
    if mode == "ngram":
        return 0
    if mode == "folder":
        return folder_bytes(speculate, dtype)
    model, tensors = _unit_tensors_of(target, dtype)
    total = 0
    for full, dt, shape in tensors:
        owner, attr = _owner(model, full)
        total += _quantized_bytes(owner, attr, dt, shape, mode, group_size)
    if quantize_head:
        head = model.get_output_embeddings()
        w = head.weight
        total += _quantized_bytes(head, "weight", dtype if (dtype and w.dtype.is_floating_point) else w.dtype,
                                  tuple(w.shape), mode, group_size)
    return total


# --------------------------------------------------------------------------------------------------
# building drafts


def _mode(speculate: str) -> str:
    if not isinstance(speculate, (str, os.PathLike)):
        raise TypeError(f"speculate must be 'ngram', 'int8', 'int4' or a model folder, got {type(speculate).__name__}")
    s = os.fspath(speculate)
    if s in MODES:
        return s
    if os.path.isdir(s):
        if not os.path.exists(os.path.join(s, "config.json")):
            raise OffloadError(f"draft folder {s} has no config.json: pass a Hugging Face model folder")
        return "folder"
    raise OffloadError(f"speculate={s!r}: expected 'ngram', 'int8', 'int4' or a draft model folder (not found)")


def _handle_of(model: nn.Module) -> Any:
    h = getattr(model, "_offload_handle", None)
    return h if h is not None and not h.closed else None


def _device_of(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    for t in model.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def load_folder_draft(folder: str | os.PathLike[str], target: nn.Module, dtype: torch.dtype | str | None = None
                      ) -> nn.Module:
    """A separate draft model, fully in RAM (``from_pretrained``), checked to share the target's vocabulary."""
    import transformers as tf
    folder = os.fspath(folder)
    config = tf.AutoConfig.from_pretrained(folder)
    if config.is_encoder_decoder:
        raise OffloadError(f"draft {folder} is an encoder-decoder model: speculative decoding here drafts with a "
                           f"decoder-only model")
    tv, dv = target.config.get_text_config().vocab_size, config.get_text_config().vocab_size
    if tv != dv:
        raise OffloadError(f"draft {folder} has a vocabulary of {dv} tokens, the target {tv}: the draft must use the "
                           f"target's tokenizer (same token ids)")
    draft = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto")
    return draft.to(_device_of(target)).eval()


def _read_unit(store: Any, rec: Any) -> torch.Tensor:
    """One unit's bytes, read once, checked against its checksum, then dropped from the page cache
    (a later cold pass must not find it there)."""
    try:
        return store.read_verified(rec, evict=True)
    except OffloadError as e:
        raise OffloadError(f"building the draft: {e}") from e


def build_self_draft(model: nn.Module, scheme: str, *, handle: Any = None, group_size: int = INT4_GROUP_SIZE,
                     quantize_head: bool = False, progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """The target quantized, in RAM: a second module tree of the same class whose units' linear weights
    are ``QuantizedWeight``s (``scheme`` ``"int8"`` or ``"int4"``) and whose other unit tensors are float
    copies; every tensor outside the units (embeddings, norms, head, buffers) is the target's own object.

    With offload enabled (``handle``, or the model's own), each unit is read once from the store; a plain
    model is quantized from its own weights (its repeated blocks are the units). ``quantize_head``: the
    draft gets its own quantized copy of the output head instead of sharing the target's (more memory,
    counted by ``draft_bytes``; the head is most of a draft step for a large vocabulary)."""
    from accelerate import init_empty_weights

    from .. import quant
    if scheme not in ("int8", "int4"):
        raise ValueError(f"self-draft scheme must be 'int8' or 'int4', got {scheme!r}")
    if model.config.is_encoder_decoder:
        raise OffloadError("a self-draft is built for decoder-only models")
    handle = handle if handle is not None else _handle_of(model)
    device = _device_of(model)
    float_dtype = next((b.dtype for h in handle._hooks for b in h.bindings if b.dtype.is_floating_point),
                       torch.float32) if handle is not None else _float_dtype(model)

    # Per unit: how to load its bytes once, and for each tensor (target module, attr, is_param, view(bytes)).
    units: list[tuple[Callable[[], Any], list[tuple[nn.Module, str, bool, Callable[[Any], torch.Tensor]]]]] = []
    if handle is not None:
        for h in handle._hooks:
            def loader(rec: Any = h.record) -> Any:
                return _read_unit(handle._store, rec)
            entries = []
            for b in h.bindings:
                def view(data: Any, b: Any = b) -> torch.Tensor:
                    if hasattr(b, "parts") and hasattr(b, "scheme"):  # hooks.QuantBinding: a quantized store
                        parts = {k: data[o:o + n].view(dt).view(sh) for k, (o, n, dt, sh) in b.parts.items()}
                        return quant.from_stored(parts, b.shape, b.dtype, b.scheme, b.group_size,
                                                 transposed=b.transposed, layout=b.layout)
                    return data[b.offset:b.offset + b.nbytes].view(b.dtype).view(b.shape)
                entries.append((b.owner, b.attr, b.is_param, view))
            units.append((loader, entries))
    else:
        from ..plan import find_units
        for _, unit in find_units(model):
            entries = []
            for m in unit.modules():
                for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
                    if t is None:
                        continue
                    entries.append((m, attr, attr in m._parameters, lambda _d, t=t: t.detach()))
            units.append((lambda: None, entries))
    streamed = {(id(m), attr) for _, entries in units for m, attr, _, _ in entries}

    config = copy.deepcopy(model.config)
    with init_empty_weights(include_buffers=False):
        draft = type(model)._from_config(config, dtype=float_dtype)
    draft.eval()
    tmods = dict(model.named_modules())
    dmods = dict(draft.named_modules())
    if set(tmods) != set(dmods):
        raise OffloadError(f"{type(model).__name__} built from its config has other modules than the target: "
                           f"cannot build a self-draft of it")
    names = {id(m): n for n, m in tmods.items()}
    # Share everything outside the units: the very same tensor objects (tied weights stay tied).
    for name, dm in dmods.items():
        tm = tmods[name]
        for table, ttable in ((dm._parameters, tm._parameters), (dm._buffers, tm._buffers)):
            for attr in list(table):
                if (id(tm), attr) in streamed:
                    continue
                t = ttable.get(attr)
                if t is not None and t.device.type == "meta":
                    raise OffloadError(f"{name}.{attr} of the target is on the meta device (not loaded): the "
                                       f"self-draft shares the target's resident weights, so they must be loaded")
                table[attr] = t  # type: ignore[assignment]
    # Quantize the units, one at a time.
    for i, (load, entries) in enumerate(units):
        data = load()
        for owner, attr, is_param, view in entries:
            dm = dmods[names[id(owner)]]
            t = view(data)
            if is_param and _quantizable(dm, attr, t.dtype, tuple(t.shape), scheme, group_size):
                transposed = quant.is_transposed_linear(dm)
                if isinstance(t, quant.QuantizedWeight) and t.scheme == scheme and (
                        scheme == "int8" or t.group_size == group_size):
                    stored = {k: v.clone() for k, v in t.stored().items()}  # the target's own quantization
                else:
                    dense = t.dequantize() if isinstance(t, quant.QuantizedWeight) else t
                    stored = quant.quantize_linear(dense, scheme, group_size, transposed=transposed)
                stored = {k: v.to(device) for k, v in stored.items()}
                dm._parameters[attr] = quant.from_stored(stored, tuple(t.shape), t.dtype, scheme, group_size,
                                                         transposed=transposed)  # type: ignore[assignment]
            else:
                if isinstance(t, quant.QuantizedWeight):  # quantized in the store, not in the draft's scheme
                    t = t.dequantize()
                value = t.to(device=device, copy=True)
                if is_param:
                    dm._parameters[attr] = nn.Parameter(value, requires_grad=False)
                else:
                    dm._buffers[attr] = value
        del data
        if progress is not None:
            progress(i + 1, len(units))
    if quantize_head:
        head = draft.get_output_embeddings()
        w = head.weight if head is not None else None
        if w is None or not _quantizable(head, "weight", w.dtype, tuple(w.shape), scheme, group_size):
            raise OffloadError(f"quantize_head: the output head of {type(model).__name__} is not a linear layer "
                               f"{scheme} can quantize")
        transposed = quant.is_transposed_linear(head)
        stored = {k: v.to(device) for k, v in quant.quantize_linear(w, scheme, group_size,
                                                                     transposed=transposed).items()}
        head._parameters["weight"] = quant.from_stored(stored, tuple(w.shape), w.dtype, scheme, group_size,
                                                       transposed=transposed)  # type: ignore[assignment]
    left = [f"{n}.{a}" for n, m in dmods.items() for a, t in list(m._parameters.items()) + list(m._buffers.items())
            if t is not None and t.device.type == "meta"]
    if left:
        raise OffloadError(f"self-draft: tensors left unloaded: {left[:4]}")
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _own_bytes(draft: nn.Module, target: nn.Module) -> int:
    """Bytes the draft holds that the target does not (shared tensors counted once, by the target)."""
    from .. import quant
    shared = {id(t) for t in list(target.parameters()) + list(target.buffers())}
    seen: set[int] = set()
    total = 0
    for m in draft.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is None or id(t) in shared or id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, quant.QuantizedWeight):
                total += sum(v.numel() * v.element_size() for v in t.stored().values())
            else:
                total += t.numel() * t.element_size()
    return total
