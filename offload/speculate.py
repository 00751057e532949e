"""Several tokens per disk pass: speculative decoding with a resident draft, the verify passes' greedy tokens.

When every block streams, one target forward costs one pass over the streamed bytes whether it scores
one position or nine. A resident *draft* proposes ``K`` tokens; the streamed target scores them all in
one forward over ``K + 1`` positions and keeps the longest prefix that equals its own greedy choice,
plus its own next token. Every kept token is the target's argmax *in that verify pass*. What is
guaranteed: in fp32, the target's plain greedy tokens (identical in every case tried); in bf16/fp16,
the tokens of the verify passes, exactly what Transformers' assisted generation gives, which can
differ from plain greedy decoding after a near-tie (see "Exactness" below).

    ids, stats = offload.speculate.generate(model, input_ids, speculate="int4", max_new_tokens=64)
    spec = Speculator(model, "int4")                   # build the draft once, generate many times
    ids, stats = spec.generate(input_ids, max_new_tokens=64)

Drafts (``speculate=``)
-----------------------
``"ngram"``   prompt lookup: the continuation of the last n-gram's earlier occurrence (no model, 0 bytes).
FOLDER        a separate small model with the same vocabulary (``from_pretrained``), held in RAM.
``"int8"``    a self-draft: the target's own blocks, each read once from the handle's store, their
``"int4"``    linear weights quantized with ``offload.quant`` (``QuantizedWeight``, which ``F.linear``
              dispatches on), held in RAM; embeddings, norms and head are the target's own tensors,
              shared, not copied. ``draft_bytes()`` says what it costs before it is built.

What runs the loop: Transformers' assisted generation, unchanged
----------------------------------------------------------------
``model.generate(assistant_model=draft)`` (and ``prompt_lookup_num_tokens=`` for ``"ngram"``) composes
with offload's hooks: the target's units are bound and unbound per forward whatever the number of
positions, the KV cache is cropped after a rejection, and the tokens equal plain greedy decoding of the
same offloaded target on every case tested (tiny BLOOM / Llama / OPT, fp32, 32 tokens, several
prompts, every mode; ``tests/test_speculate.py``) and in ``benchmarks/bench_speculate.py``. No own
draft/verify loop was written: no case failed, and what Transformers' loop costs beside the forwards
themselves (the draft's ``generate`` call per pass, cache cropping, acceptance) measured 3-15 ms per pass
with the bloom-1b7 int4 draft, under 1% of a 1.4 s streamed pass, so a loop of our own could win at most
that. What is added around it:

* K from measured costs. Transformers' own schedules are a fixed K or a +2/-1 heuristic that ignores
  what a draft step and a target pass cost. Here the candidate generator Transformers builds is given a
  controller (``_get_candidate_generator`` is wrapped on the instance for the call): after every pass
  it records the draft's forward times, the target's forward time and how many candidates were kept,
  and sets the next pass's K to the one maximising expected tokens per second (``choose_k``)::

      E[tokens/pass](K) = (1 - a^(K+1)) / (1 - a)
      seconds/pass(K)   = draft_overhead + K * draft_step + verify_base + verify_per_position * (K + 1)

  ``a`` is the per-token acceptance, estimated as (accepted + 1) / (accepted + rejections + 2);
  the times are medians, the verify cost a median-slope line over the passes seen (a streamed pass is
  nearly flat in K, an in-memory one is not; medians, because on a shared 2-core machine another
  process stretched single draft calls by seconds and a mean followed them). K = 0 (no drafting:
  plain decoding) is allowed when drafting does not pay; after ``PROBE_EVERY`` such passes one pass
  drafts again, so a K chosen on early noise is revisited. ``draft_tokens=K`` fixes K instead. For
  ``"ngram"`` the K is Transformers' ``PromptLookupCandidateGenerator.num_output_tokens``, for a model
  draft ``AssistedCandidateGenerator.num_assistant_tokens``, set before each pass.
* The draft's confidence threshold is off (``assistant_confidence_threshold=0``), so a pass drafts
  exactly K tokens and the cost model holds; Transformers' default (0.4) stops drafting early.
* Statistics (``SpecStats``): target passes, drafted, accepted, tokens per pass, acceptance rate,
  draft time share, the Ks used, the draft's bytes, the measured costs.

Exactness, numerically: a verify forward over K+1 positions computes each position with other
matrix shapes than a one-position step, so its logits differ in the last bits. In fp32 a flipped
argmax needs two logits within ~1e-6 of each other; in bf16 (8 bits of mantissa) it happens: 7 of 50
random prompts on a tiny bf16 Llama with the int8 self-draft diverged from plain greedy decoding
(``benchmarks/bench_spec_divergence.py``, figures in the README), always at a near-tie, and from there
on the text is another, equally greedy, continuation. int8 units above 16 rows also take another
kernel than one-row steps (``offload.quant``), so their verify passes differ the same way. A mode
that keeps plain greedy's tokens at near-ties is not offered: the verify pass also wrote the KV
cache of every position it scored, so recomputing one position alone would still not give
one-position-step numerics, and each recomputation costs a whole streamed pass.

Greedy, decoder-only, batch 1 (Transformers' assisted generation is batch-1 only).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import OffloadError

MODES = ("ngram", "int8", "int4")
INITIAL_K = 4  # drafted tokens per pass before any cost is measured
MAX_K = 16  # the largest K the cost model may choose
MIN_FIT = 4  # target passes (3+ different lengths) before the verify cost gets a per-position slope
WINDOW = 64  # the costs are estimated from the last WINDOW measurements of each kind
PROBE_EVERY = 8  # after this many passes at K = 0, draft once more (costs and acceptance are re-measured)
INT4_GROUP_SIZE = 64


# --------------------------------------------------------------------------------------------------
# the cost model


def expected_tokens(k: int, a: float) -> float:
    """Expected tokens per target pass with ``k`` drafted tokens of per-token acceptance ``a`` (i.i.d.):
    the accepted prefix plus the target's own next token, ``(1 - a^(k+1)) / (1 - a)``."""
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclasses.dataclass
class Costs:
    """Measured seconds: one draft forward for one token, the draft's fixed cost per pass, and a target
    pass as ``verify_base + verify_per_position * positions``."""
    draft_step: float = 0.0
    draft_overhead: float = 0.0
    verify_base: float = 0.0
    verify_per_position: float = 0.0

    def pass_seconds(self, k: int) -> float:
        draft = (self.draft_overhead + k * self.draft_step) if k > 0 else 0.0
        return draft + self.verify_base + self.verify_per_position * (k + 1)

    def tokens_per_second(self, k: int, a: float) -> float:
        s = self.pass_seconds(k)
        return expected_tokens(k, a) / s if s > 0 else math.inf

    def speedup(self, k: int, a: float) -> float:
        """Tokens per second with ``k`` drafted at acceptance ``a``, over plain decoding (k = 0)."""
        return self.tokens_per_second(k, a) / self.tokens_per_second(0, a)


def choose_k(a: float, costs: Costs, k_max: int = MAX_K, k_min: int = 0) -> int:
    """The K in ``[k_min, k_max]`` with the most expected tokens per second (the smallest on a tie)."""
    best, best_rate = k_min, -1.0
    for k in range(k_min, k_max + 1):
        rate = costs.tokens_per_second(k, a)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best


# --------------------------------------------------------------------------------------------------
# statistics


@dataclasses.dataclass
class SpecStats:
    """What one speculative ``generate`` did."""
    mode: str
    new_tokens: int = 0
    target_passes: int = 0  # target forwards, the prefill included (each pass yields >= 1 token)
    drafted: int = 0  # candidate tokens proposed
    accepted: int = 0  # candidate tokens the target kept
    draft_seconds: float = 0.0  # wall time producing candidates
    target_seconds: float = 0.0  # wall time in target forwards
    total_seconds: float = 0.0
    draft_bytes: int = 0  # the draft's own memory (shared tensors not counted)
    k_fixed: bool = False
    ks: list[int] = dataclasses.field(default_factory=list)  # K asked for, per pass
    costs: Costs = dataclasses.field(default_factory=Costs)
    acceptance_estimate: float = 0.0  # the smoothed per-token acceptance the cost model used last
    bytes_read: int = 0  # from the offload handle, if any

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_time_share(self) -> float:
        return self.draft_seconds / self.total_seconds if self.total_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(tokens_per_pass=self.tokens_per_pass, acceptance_rate=self.acceptance_rate,
                 draft_time_share=self.draft_time_share, tokens_per_second=self.tokens_per_second)
        return d

    def summary(self) -> str:
        """One line for a run summary."""
        k = (f"K={self.ks[-1]} fixed" if self.k_fixed else
             f"K chosen {min(self.ks)}-{max(self.ks)} (last {self.ks[-1]})") if self.ks else "K -"
        return (f"speculate {self.mode}: {self.target_passes} target passes for {self.new_tokens} tokens "
                f"({self.tokens_per_pass:.2f} tokens/pass), drafted {self.drafted}, accepted {self.accepted} "
                f"({self.acceptance_rate:.0%}), draft {self.draft_time_share:.0%} of the time, {k}, "
                f"draft memory {self.draft_bytes / 2**20:.1f} MiB")


# --------------------------------------------------------------------------------------------------
# draft memory, before building it


def _quantizable(module: nn.Module, attr: str, dtype: torch.dtype, shape: Sequence[int], scheme: str,
                 group_size: int) -> bool:
    from . import quant
    probe = torch.empty(tuple(shape), dtype=dtype, device="meta")
    return quant.is_quantizable("", attr, probe, module, scheme=scheme, group_size=group_size)


def _quantized_bytes(module: nn.Module, attr: str, dtype: torch.dtype, shape: Sequence[int], scheme: str,
                     group_size: int) -> int:
    """Bytes one unit tensor takes in the self-draft: quantized if it is a quantizable linear weight."""
    from . import quant
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
    from .plan import find_units
    from .runtime import Handle
    if isinstance(target, Handle) or (isinstance(target, nn.Module) and _handle_of(target) is not None):
        handle = target if isinstance(target, Handle) else _handle_of(target)
        assert handle is not None
        model = handle.model
        names = {id(m): n for n, m in model.named_modules()}
        out = []
        for h in handle.hooks:
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
        from .runtime import build_on_meta
        from .manifest import MANIFEST
        from .store import Store
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
        from .sources import checkpoint_dtype, checkpoint_sources
        dt = dtype or checkpoint_dtype(path) or torch.float32
        units, _, _ = checkpoint_sources(path, dt)
        return build_on_meta(path, dt), [(f"{u.name}.{s.name}", s.dtype, tuple(s.shape)) for u in units
                                         for s in u.specs]
    if hasattr(target, "to_dict") and hasattr(target, "model_type"):  # a transformers config
        from .runtime import build_on_meta
        model = build_on_meta(target, dtype or torch.float32)  # the library never imports the CLI
        return _unit_tensors_of(model, None)
    raise TypeError(f"draft_bytes: expected a Handle, a model, a store or checkpoint folder, or a transformers config; "
                    f"got {type(target).__name__}")


def folder_bytes(folder: str | os.PathLike[str], dtype: torch.dtype | None = None) -> int:
    """Weight bytes of a Hugging Face folder's safetensors files (from their headers), in ``dtype`` when given."""
    from .integrity import read_safetensors_header
    from .manifest import DTYPES
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

    from . import quant
    if scheme not in ("int8", "int4"):
        raise ValueError(f"self-draft scheme must be 'int8' or 'int4', got {scheme!r}")
    if model.config.is_encoder_decoder:
        raise OffloadError("a self-draft is built for decoder-only models")
    handle = handle if handle is not None else _handle_of(model)
    device = _device_of(model)
    float_dtype = next((b.dtype for h in handle.hooks for b in h.bindings if b.dtype.is_floating_point),
                       torch.float32) if handle is not None else _float_dtype(model)

    # Per unit: how to load its bytes once, and for each tensor (target module, attr, is_param, view(bytes)).
    units: list[tuple[Callable[[], Any], list[tuple[nn.Module, str, bool, Callable[[Any], torch.Tensor]]]]] = []
    if handle is not None:
        for h in handle.hooks:
            def loader(rec: Any = h.record) -> Any:
                return _read_unit(handle.store, rec)
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
        from .plan import find_units
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
    from . import quant
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


# --------------------------------------------------------------------------------------------------
# the controller: measure costs, choose K, count


def _clock(device: torch.device | None) -> float:
    """``perf_counter`` once the device has finished what was queued: on CUDA the forwards only enqueue
    kernels, and K chosen from launch times would be chosen from nothing."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Controller:
    def __init__(self, mode: str, stats: SpecStats, fixed_k: int | None, k_max: int, stop_len: int):
        self.mode, self.stats, self.fixed_k, self.k_max, self.stop_len = mode, stats, fixed_k, k_max, stop_len
        self.k = fixed_k if fixed_k is not None else INITIAL_K
        self.rejections = 0
        self._plain_run = 0  # consecutive passes chosen with K = 0
        self.draft_fw: list[float] = []  # one-step draft forwards (1-2 new positions)
        self.draft_calls: list[tuple[float, int, float]] = []  # (call seconds, drafted, forward seconds)
        self.verify: list[tuple[int, float]] = []  # (positions, seconds), prefill excluded
        self.prefill_seconds: float | None = None
        self._fw_in_call = 0.0
        self._device: torch.device | None = None
        self._t0 = 0.0
        self._d0 = 0.0

    # -- hooks on the target and on the draft
    def target_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        self._positions = int(x.shape[1]) if x is not None else 1
        self._device = getattr(x, "device", None)
        self._t0 = _clock(self._device)

    def target_post(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        dt = _clock(self._device) - self._t0
        self.stats.target_seconds += dt
        self.stats.target_passes += 1
        if self.prefill_seconds is None:
            self.prefill_seconds = dt
        else:
            self.verify.append((self._positions, dt))

    def draft_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        self._dpos = int(x.shape[1]) if x is not None else 1
        self._device = getattr(x, "device", None)
        self._d0 = _clock(self._device)

    def draft_post(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        dt = _clock(self._device) - self._d0
        self._fw_in_call += dt
        if self._dpos <= 2:
            self.draft_fw.append(dt)

    # -- the candidate generator Transformers built
    def attach(self, gen: Any) -> Any:
        get = gen.get_candidates
        update = gen.update_candidate_strategy

        def get_candidates(input_ids: torch.Tensor, *a: Any, **kw: Any) -> Any:
            self.stats.ks.append(self.k)
            if self.k == 0:  # drafting does not pay now: a plain target step
                return input_ids, None
            self._set_k(gen, self.k)
            self._fw_in_call = 0.0
            t0 = _clock(input_ids.device)
            out = get(input_ids, *a, **kw)
            dt = _clock(input_ids.device) - t0
            self.stats.draft_seconds += dt
            n = int(out[0].shape[1] - input_ids.shape[1])
            self.draft_calls.append((dt, n, self._fw_in_call))
            return out

        def update_candidate_strategy(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: int) -> None:
            drafted = int(scores.shape[1]) - 1
            m = int(num_matches)
            self.stats.drafted += drafted
            self.stats.accepted += m
            if m < drafted and int(input_ids.shape[1]) < self.stop_len:  # a real rejection, not the length cut
                self.rejections += 1
            update(input_ids, scores, num_matches)
            self._choose()

        gen.get_candidates = get_candidates
        gen.update_candidate_strategy = update_candidate_strategy
        return gen

    def _set_k(self, gen: Any, k: int) -> None:
        if hasattr(gen, "num_assistant_tokens"):
            gen.num_assistant_tokens = k
        if hasattr(gen, "num_output_tokens"):
            gen.num_output_tokens = k

    def acceptance(self) -> float:
        return (self.stats.accepted + 1) / (self.stats.accepted + self.rejections + 2)

    def costs(self) -> Costs:
        """Medians and a median-slope line (Theil-Sen): a pass slowed by another process, or a first call
        that warms caches up, moves them little (a mean moved by seconds on a busy 2-core machine)."""
        c = Costs()
        fw = self.draft_fw[1:][-WINDOW:] or self.draft_fw  # the very first forward warms up
        if fw:
            c.draft_step = statistics.median(fw)
        calls = (self.draft_calls[1:] or self.draft_calls)[-WINDOW:]  # the first call is the draft's prefill
        if calls:
            c.draft_overhead = max(0.0, statistics.median(t - n * c.draft_step for t, n, _ in calls))
        verify = self.verify[-WINDOW:]
        if verify:
            # A line through two or three noisy points is noise (one run fitted 0 s + 0.36 s/position to a
            # streamed pass): until MIN_FIT passes at 3+ different lengths are seen, the cost is flat in K.
            slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(verify) for x2, y2 in verify[i + 1:]
                      if x2 != x1] if len(verify) >= MIN_FIT and len({x for x, _ in verify}) >= 3 else []
            slope = max(0.0, statistics.median(slopes)) if slopes else 0.0
            c.verify_per_position = slope
            c.verify_base = max(0.0, statistics.median(y - slope * x for x, y in verify))
        elif self.prefill_seconds is not None:
            c.verify_base = self.prefill_seconds  # an upper bound for a step until one is measured
        return c

    def _choose(self) -> None:
        a = self.acceptance()
        self.stats.acceptance_estimate = a
        self.stats.costs = self.costs()
        if self.fixed_k is not None:
            return
        self.k = choose_k(a, self.stats.costs, self.k_max)
        # K = 0 stops the measurements that chose it: every PROBE_EVERY plain passes, draft once more.
        self._plain_run = self._plain_run + 1 if self.k == 0 else 0
        if self._plain_run >= PROBE_EVERY:
            self.k, self._plain_run = choose_k(a, self.stats.costs, self.k_max, k_min=1), 0


# --------------------------------------------------------------------------------------------------
# generation


class Speculator:
    """A target (offloaded or not) and its draft, built once; ``generate`` as many times as wanted.

    ``speculate``: ``"ngram"``, ``"int8"``, ``"int4"`` or a draft model folder. ``draft_tokens``: a fixed K
    (default: chosen from measured costs each pass, at most ``max_draft_tokens``). ``draft``: a ready draft
    model instead of building one (a FOLDER or int8/int4 mode). ``group_size``: int4 groups.
    ``draft_dtype``: a FOLDER draft's dtype (default: its checkpoint's). ``quantize_head``: see
    ``build_self_draft``."""

    def __init__(self, model: nn.Module, speculate: str, *, handle: Any = None, draft_tokens: int | None = None,
                 max_draft_tokens: int = MAX_K, draft: nn.Module | None = None, group_size: int = INT4_GROUP_SIZE,
                 draft_dtype: torch.dtype | str | None = None, ngram_size: int = 2, quantize_head: bool = False):
        if getattr(model.config, "is_encoder_decoder", False):
            raise OffloadError("speculative decoding is implemented for decoder-only models")
        if draft_tokens is not None and (not isinstance(draft_tokens, int) or draft_tokens < 0):
            raise ValueError(f"draft_tokens must be an integer >= 0, got {draft_tokens!r}")
        if not isinstance(max_draft_tokens, int) or max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be an integer >= 1, got {max_draft_tokens!r}")
        self.model, self.mode, self.speculate = model, _mode(speculate), os.fspath(speculate)
        self.handle = handle if handle is not None else _handle_of(model)
        self.draft_tokens, self.max_draft_tokens, self.ngram_size = draft_tokens, max_draft_tokens, ngram_size
        self.build_seconds = 0.0
        t0 = time.perf_counter()
        if self.mode == "ngram":
            self.draft = None
        elif draft is not None:
            self.draft = draft
        elif self.mode == "folder":
            self.draft = load_folder_draft(self.speculate, model, draft_dtype)
        else:
            self.draft = build_self_draft(model, self.mode, handle=self.handle, group_size=group_size,
                                          quantize_head=quantize_head)
        self.build_seconds = time.perf_counter() - t0
        self.draft_bytes = _own_bytes(self.draft, model) if self.draft is not None else 0

    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int, **kw: Any) -> tuple[torch.Tensor, SpecStats]:
        """Greedy generation with speculation: ``(output ids, SpecStats)``; in fp32 the ids are what
        ``model.generate(input_ids, max_new_tokens=..., do_sample=False, **kw)`` returns, in bf16/fp16
        the verify passes' greedy tokens (see the module docstring)."""
        if kw.get("do_sample") or kw.get("num_beams", 1) != 1:
            raise ValueError("speculative decoding here is greedy: do_sample=True and num_beams > 1 are not supported")
        if any(k in kw for k in ("assistant_model", "prompt_lookup_num_tokens", "num_assistant_tokens")):
            raise ValueError("speculate= chooses the draft and K: do not pass assistant_model / prompt_lookup_num_tokens")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"speculative decoding takes one sequence (batch 1), got input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        model, draft = self.model, self.draft
        stats = SpecStats(mode=self.speculate if self.mode != "folder" else f"folder:{self.speculate}",
                          draft_bytes=self.draft_bytes, k_fixed=self.draft_tokens is not None)
        k_max = self.draft_tokens if self.draft_tokens is not None else self.max_draft_tokens
        ctl = _Controller(self.mode, stats, self.draft_tokens, k_max, input_ids.shape[1] + max_new_tokens)
        gen_kw: dict[str, Any] = dict(do_sample=False, max_new_tokens=max_new_tokens)
        gen_kw.update(kw)
        gen_kw.setdefault("attention_mask", torch.ones_like(input_ids))
        saved_draft_cfg = None
        if self.mode == "ngram":
            gen_kw["prompt_lookup_num_tokens"] = max(1, ctl.k)
            gen_kw["max_matching_ngram_size"] = self.ngram_size
        else:
            assert draft is not None
            gen_kw["assistant_model"] = draft
            saved_draft_cfg = copy.deepcopy(draft.generation_config)
            draft.generation_config.num_assistant_tokens = max(1, ctl.k)
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.assistant_confidence_threshold = 0.0  # draft exactly K (the cost model's K)
        orig = model._get_candidate_generator

        def get_candidate_generator(*a: Any, **k: Any) -> Any:
            return ctl.attach(orig(*a, **k))

        hooks = [model.register_forward_pre_hook(ctl.target_pre, with_kwargs=True),
                 model.register_forward_hook(ctl.target_post, with_kwargs=True)]
        if draft is not None:
            hooks += [draft.register_forward_pre_hook(ctl.draft_pre, with_kwargs=True),
                      draft.register_forward_hook(ctl.draft_post, with_kwargs=True)]
        read0 = self.handle.stats().bytes_read if self.handle is not None else 0
        model._get_candidate_generator = get_candidate_generator  # this call only; removed below
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = model.generate(input_ids, **gen_kw)
        finally:
            stats.total_seconds = time.perf_counter() - t0
            with contextlib.suppress(AttributeError):
                del model._get_candidate_generator
            for h in hooks:
                h.remove()
            if saved_draft_cfg is not None and draft is not None:
                draft.generation_config = saved_draft_cfg
        if self.handle is not None:
            stats.bytes_read = self.handle.stats().bytes_read - read0
        stats.new_tokens = int(out.shape[1] - input_ids.shape[1])
        stats.costs = ctl.costs()
        stats.acceptance_estimate = ctl.acceptance()
        return out, stats

    def agreement(self, sequences: Iterable[torch.Tensor], skip: int = 1) -> dict[str, float]:
        """Teacher-forced top-1 agreement of draft and target (see ``agreement``)."""
        if self.draft is None:
            raise OffloadError("agreement needs a draft model (not 'ngram')")
        return agreement(self.model, self.draft, sequences, skip)


def agreement(target: nn.Module, draft: nn.Module, sequences: Iterable[torch.Tensor], skip: int = 1
              ) -> dict[str, float]:
    """Teacher-forced top-1 agreement of ``draft`` and ``target`` over token sequences (``[1, L]`` ids, one
    target pass each), the first ``skip`` positions left out. On text the target would generate, ``top1``
    is the acceptance a drafted token sees. Also: ``target_copies_input``, the share of positions where the
    target's top-1 is the input token itself (random-weight models mostly predict that, which makes any
    draft agree), and ``top1_input_masked``, the agreement with that token's logit masked in both (how
    well the draft ranks everything else)."""
    same = copies = same_masked = total = 0
    with torch.no_grad():
        for seq in sequences:
            seq = seq.reshape(1, -1)
            t = target(seq, use_cache=False).logits[0, skip:].float()
            d = draft(seq.to(_device_of(draft)), use_cache=False).logits[0, skip:].float().to(t.device)
            cur = seq[0, skip:].to(t.device)
            tt, dd = t.argmax(-1), d.argmax(-1)
            same += int((tt == dd).sum())
            copies += int((tt == cur).sum())
            rows = torch.arange(cur.numel(), device=t.device)
            t[rows, cur] = d[rows, cur] = float("-inf")
            same_masked += int((t.argmax(-1) == d.argmax(-1)).sum())
            total += cur.numel()
    n = max(total, 1)
    return {"top1": same / n, "target_copies_input": copies / n, "top1_input_masked": same_masked / n,
            "positions": float(total)}


def generate(model: nn.Module, input_ids: torch.Tensor, *, speculate: str, max_new_tokens: int,
             draft_tokens: int | None = None, handle: Any = None, **kw: Any) -> tuple[torch.Tensor, SpecStats]:
    """Greedy generation with a draft (``Speculator`` built for one call): ``(output ids, SpecStats)``.

    In fp32 the ids equal ``model.generate(input_ids, max_new_tokens=..., do_sample=False)``'s; in
    bf16/fp16 they are the verify passes' greedy tokens (module docstring). ``speculate``:
    ``"ngram"``, ``"int8"``, ``"int4"`` or a draft model folder; ``draft_tokens``: fixed K (default: chosen
    from measured costs). Speculator keywords (``draft=``, ``group_size=``, ``draft_dtype=``,
    ``max_draft_tokens=``, ``ngram_size=``, ``quantize_head=``) are taken from ``kw``; the rest go to
    ``model.generate``.
    """
    names = ("draft", "group_size", "draft_dtype", "max_draft_tokens", "ngram_size", "quantize_head")
    skw = {k: kw.pop(k) for k in names if k in kw}
    spec = Speculator(model, speculate, handle=handle, draft_tokens=draft_tokens, **skw)
    out, stats = spec.generate(input_ids, max_new_tokens=max_new_tokens, **kw)
    return out, stats
