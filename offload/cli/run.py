"""``offload run``: generate with a checkpoint, a store or a random model, within a memory budget.

Order: check every argument and the budget against the plan (from the safetensors headers, the
store's manifest or the random model's config: no data read), load the tokenizer, and only then
convert (once; a cached store is reused while its source files and dtype match), load and generate.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import measure, tune
from .._memory import available_memory, format_bytes
from .models import (DTYPES, RANDOM_MODELS, config_for, dtype_tag, meta_model, random_checkpoint,
                     random_checkpoint_bytes, random_complete, random_name)
from .options import (UsageError, add_command, at_least, byte_size, default_device, depth, device, input_file,
                      nonempty, output_file, positive_int, require, require_reader)

BYTES_FALLBACK = "bytes"  # no tokenizer: the prompt's UTF-8 bytes are the ids, ids are printed
DEFAULT_PROMPT = "The quick brown fox"


# ------------------------------------------------------------------------------ what to run


class Target:
    """What ``run`` was pointed at, resolved without converting anything.

    ``kind`` is ``"store"``, ``"folder"`` or ``"random"``; ``path`` the store or folder (for a random
    model, the folder it is or will be written to); ``dtype`` what the weights run in; ``units`` and
    ``resident_bytes`` the plan's sizes, exactly as the store lays them out; ``quant`` the blocks' linear
    weights' quantization (``"int8"``/``"int4"``, None: stored in ``dtype``).
    """

    def __init__(self, kind: str, path: str, dtype: torch.dtype, unit_bytes: list[int], resident_bytes: int,
                 label: str, quant: str | None = None):
        self.kind, self.path, self.dtype = kind, path, dtype
        self.unit_bytes, self.resident_bytes, self.label, self.quant = unit_bytes, resident_bytes, label, quant


def resolve(a: argparse.Namespace) -> Target:
    from ..sources import checkpoint_dtype, checkpoint_sources, source_kind
    from ..config import cache_dir
    from ..manifest import MANIFEST
    from ..store import Store
    from ..writer import plan_layout
    if bool(a.model) == bool(a.random):  # every command that resolves a model (run, serve, tune) asks this first
        raise UsageError("pass MODEL (a Hugging Face folder or a store) or --random NAME" +
                         (", not both" if a.model else ""))
    want = DTYPES[a.dtype] if a.dtype else None
    if a.random:
        dtype = want or torch.bfloat16
        units, resident = _random_specs(a.random, dtype)
        folder = os.path.join(cache_dir(), "random", f"{a.random}-{dtype_tag(dtype)}")
        specs = _quantized_plan(a, meta_model(config_for(a.random), dtype), units)
        return Target("random", folder, dtype, [plan_layout(s)[1] for s in specs],
                      plan_layout(resident)[1] if resident else 0, a.random, a.quantize)
    if not os.path.isdir(a.model):
        raise UsageError(f"{a.model} is not a folder: pass a Hugging Face model folder or an offload store")
    if os.path.exists(os.path.join(a.model, MANIFEST)):
        store = Store.open(a.model)
        held = store.dtype or torch.float32
        if want is not None and want != held:
            src = store.source.get("path") or "CHECKPOINT_FOLDER"
            dst = f"{os.path.abspath(a.model).rstrip('/')}-{a.dtype}"
            raise UsageError(f"store {a.model} holds {dtype_tag(held)} weights, not {a.dtype}: run it without --dtype, "
                             f"or convert the checkpoint to {a.dtype} with `offload convert {shlex.quote(src)} "
                             f"{shlex.quote(dst)} --dtype {a.dtype}` and run that store")
        if a.rebuild or a.allow_pickle:
            raise UsageError(f"{a.model} is a store: --rebuild and --allow-pickle apply to a checkpoint folder")
        held_q = (store.quantization or {}).get("scheme")
        if a.quantize and a.quantize != held_q:
            raise UsageError(f"store {a.model} holds {held_q or 'unquantized'} units, not {a.quantize}: run it without "
                             f"--quantize, or convert the checkpoint with `offload convert CHECKPOINT STORE "
                             f"--quantize {a.quantize}`")
        if not os.path.exists(os.path.join(a.model, "config.json")):
            raise UsageError(f"store {a.model} has no config.json: convert the checkpoint folder again with this "
                             f"offload (`offload convert`), which copies it")
        _text_model(a.model)
        return Target("store", a.model, held, [u.data_bytes for u in store.units],
                      store.resident.data_bytes if store.resident else 0, a.model, held_q)
    if not os.path.exists(os.path.join(a.model, "config.json")):
        raise UsageError(f"{a.model} has no config.json: pass a Hugging Face model folder or an offload store")
    _text_model(a.model)
    if source_kind(a.model) == "pickle" and not a.allow_pickle:
        checkpoint_sources(a.model)  # the pickle refusal, before anything cached is looked at
    dtype = want or checkpoint_dtype(a.model)
    if dtype is None:
        raise UsageError(f"{a.model}: cannot tell its dtype (config.json has none): pass --dtype")
    units_, resident, _ = checkpoint_sources(a.model, dtype, a.allow_pickle)
    specs = _quantized_plan(a, meta_model(a.model, dtype) if a.quantize else None, {u.name: u.specs for u in units_})
    return Target("folder", a.model, dtype, [plan_layout(s)[1] for s in specs],
                  plan_layout(resident.specs)[1] if resident else 0, a.model, a.quantize)


def _text_model(folder: str) -> None:
    """``run`` generates from text: a model whose input is not token ids (Whisper's audio features, a vision
    model's pixels; its class's ``main_input_name``) is refused in one line before anything is read."""
    import transformers as tf
    for name in getattr(tf.AutoConfig.from_pretrained(folder), "architectures", None) or []:
        main = getattr(getattr(tf, name, None), "main_input_name", "input_ids")
        if main != "input_ids":
            raise UsageError(f"{folder} is a {name}, whose input is {main}, not text: offload run generates from "
                             f"text prompts; load it with offload.load() and call it from Python")


def _quantized_plan(a: argparse.Namespace, meta: Any, units: dict[str, list[Any]]) -> list[list[Any]]:
    """Each unit's tensor specs as the store will hold them: with ``--quantize``, the linear weights'
    parts (planned from metadata, nothing quantized)."""
    if not a.quantize:
        return list(units.values())
    from ..convert import module_policy, quantize_sources
    from ..writer import UnitSource
    sources = [UnitSource(name, specs, lambda: None) for name, specs in units.items()]  # type: ignore[arg-type, return-value]
    quantize_sources(sources, module_policy(dict(meta.named_modules()), a.quantize, a.group_size), a.quantize,
                     a.group_size)
    return [u.specs for u in sources]


def _random_specs(name: str, dtype: torch.dtype) -> tuple[dict[str, list[Any]], list[Any]]:
    """The tensors ``convert`` will put in each unit of a random model, from its meta model (no data)."""
    from ..manifest import TensorSpec
    from ..sources import unit_of_key
    config = config_for(name)
    model = meta_model(config, dtype)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    units: dict[str, list[Any]] = {}
    resident: list[Any] = []
    for k, p in model.state_dict().items():
        if k in tied:
            continue
        unit = unit_of_key(k)
        spec = TensorSpec(k if unit is None else k[len(unit) + 1:], p.dtype, tuple(p.shape))
        (resident if unit is None else units.setdefault(unit, [])).append(spec)
    return units, resident


def store_builds(t: Target, a: argparse.Namespace) -> bool:
    """Whether this run writes a store: a folder or random model whose cached store is missing or stale
    (``offload._cache.store_state``, convert's own check), or ``--rebuild``. A store argument never is."""
    if t.kind == "store":
        return False
    if a.rebuild or (t.kind == "random" and not random_complete(t.path)):
        return True
    from .._cache import store_state
    from ..convert import store_cache_path
    from ..manifest import MANIFEST
    path = store_cache_path(t.path, t.dtype, a.quantize)
    return not os.path.exists(os.path.join(path, MANIFEST)) or store_state(path)[0] != "current"


def _read_in_place(t: Target, a: argparse.Namespace) -> bool:
    """Will ``cached_store`` index this checkpoint rather than copy it (``convert.in_place_units``)? A
    safetensors folder in its own dtype, unquantized (it still copies a layout too scattered to read in
    place; that write checks free space itself)."""
    from ..sources import checkpoint_dtype, source_kind
    if t.quant or a.quantize:
        return False
    if t.kind == "random":
        return True  # written in the dtype it runs in
    return source_kind(t.path) == "hf-safetensors" and checkpoint_dtype(t.path) == t.dtype


def check_disk(t: Target, a: argparse.Namespace, builds: bool, refuse: bool = True) -> str | None:
    """Refuse a run whose writes cannot fit in the cache folder, before any of them: the random checkpoint
    (until it is written once) and the store (when it is built). ``refuse=False`` (``--dry-run``) returns
    the refusal's text instead (None: it fits)."""
    from .._memory import ensure_free_space
    from ..config import cache_dir
    from ..errors import OffloadError
    from ..manifest import PAGE
    parts = []
    if t.kind == "random" and not random_complete(t.path):
        parts.append((random_checkpoint_bytes(a.random, t.dtype), f"the random {a.random} checkpoint"))
    if builds and _read_in_place(t, a):  # an index: a page per unit at most, and the config/tokenizer files
        from ..sources import side_files
        side = sum(os.path.getsize(f) for f in side_files(t.path)) if os.path.isdir(t.path) else 64 << 10
        parts.append((side + PAGE * (len(t.unit_bytes) + 1), "its index (read in place)"))
    elif builds:  # a copy: each unit file is its data, a header page, at most a page of padding
        parts.append((sum(t.unit_bytes) + t.resident_bytes + 2 * PAGE * (len(t.unit_bytes) + 1), "its store"))
    if not parts:
        return None
    what = f"{t.label}: writing " + " and ".join(f"{w} ({format_bytes(n)})" for n, w in parts)
    try:
        ensure_free_space(os.path.join(cache_dir(), "stores"), sum(n for n, _ in parts), what)
    except OffloadError as e:
        if refuse:
            raise
        return str(e)
    return None


# ------------------------------------------------------------------------------ budget and plan


def speculate_mode(text: str) -> str:
    """``--speculate``: int4, int8, ngram or a draft model folder (checked as it is parsed)."""
    if text in ("int4", "int8", "ngram"):
        return text
    if os.path.isdir(text) and os.path.exists(os.path.join(text, "config.json")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not int4, int8, ngram or a model folder with a config.json")


def draft_plan(a: argparse.Namespace, t: Target) -> int:
    """Bytes the ``--speculate`` draft will hold where the resident weights are (0 without it), from
    metadata only, with the checks that can refuse it before anything is loaded."""
    if not a.speculate:
        if a.draft_tokens is not None:
            raise UsageError("--draft-tokens applies with --speculate")
        return 0
    if a.batch_size != 1:
        raise UsageError("--speculate generates one sequence (Transformers' assisted generation is batch 1): "
                         "drop --batch-size")
    import transformers as tf
    config = config_for(a.random) if t.kind == "random" else tf.AutoConfig.from_pretrained(t.path)
    if config.is_encoder_decoder:
        raise UsageError(f"--speculate works with decoder-only models; {t.label} is an encoder-decoder model")
    if a.speculate in ("int4", "int8"):
        require("torchao", "quant", f"--speculate {a.speculate} (the draft is quantized with torchao)")
    elif a.speculate != "ngram":
        dv = tf.AutoConfig.from_pretrained(a.speculate).get_text_config().vocab_size
        if dv != config.get_text_config().vocab_size:
            raise UsageError(f"--speculate {a.speculate}: its vocabulary has {dv} tokens, {t.label}'s "
                             f"{config.get_text_config().vocab_size}: the draft must use the same tokenizer")
    from ..speculate import draft_bytes
    return draft_bytes(t.path if t.kind == "store" else config, a.speculate, dtype=t.dtype)


def check_budget(t: Target, cpu_memory: int | None, prefetch: int, device: str = "cpu",
                 gpu_memory: int | None = None, draft: int = 0) -> None:
    """``--cpu-memory`` is all RAM for weights (resident + host staging ring + RAM tier), ``--gpu-memory``
    all GPU memory for weights (resident + device slot ring + GPU tier); a ``--speculate`` draft counts
    where the resident weights are. Below the part that cannot be left out (resident + ring + draft),
    nothing can run: say the minimum."""
    from ..budget import min_room
    sizes, experts = unit_sizes(t, device)
    ring = min_room(sizes, prefetch)  # what enable requires, from the same function
    table = _device_table(experts) if device != "cpu" else 0
    slots = f"{min(prefetch + 1, len(sizes))} x the largest unit {format_bytes(max(sizes, default=0))}"
    more = ", or a smaller --prefetch" if prefetch > 1 else ""
    with_draft = f" + the --speculate draft {format_bytes(draft)}" if draft else ""
    on_gpu = device != "cpu"
    host_need = ring + (0 if on_gpu else t.resident_bytes + draft)
    if cpu_memory is not None and cpu_memory < host_need:
        what = (f"the host staging ring {format_bytes(ring)} ({slots}; resident weights are on the GPU)" if on_gpu else
                f"resident weights {format_bytes(t.resident_bytes)} + staging ring {format_bytes(ring)} ({slots})"
                f"{with_draft}")
        raise UsageError(f"--cpu-memory {format_bytes(cpu_memory)} is below the {format_bytes(host_need)} this model "
                         f"needs at --prefetch {prefetch}: {what}; pass --cpu-memory {_round_up(host_need)} or more{more}")
    gpu_need = t.resident_bytes + ring + draft + table
    if on_gpu and gpu_memory is not None and gpu_memory < gpu_need:
        with_table = f" + the routed experts' device table {format_bytes(table)}" if table else ""
        raise UsageError(f"--gpu-memory {format_bytes(gpu_memory)} is below the {format_bytes(gpu_need)} this model "
                         f"needs on {device} at --prefetch {prefetch}: resident weights {format_bytes(t.resident_bytes)} "
                         f"+ device slot ring {format_bytes(ring)} ({slots}){with_draft}{with_table}; pass --gpu-memory "
                         f"{_round_up(gpu_need)} or more{more}")


def _device_table(experts: Any) -> int:
    """GPU bytes of the routed experts' device table (``experts.DeviceTable``): one layer's experts."""
    if experts is None:
        return 0
    return experts.table_bytes or max(experts.unit_expert_bytes, default=0)


def _round_up(n: int) -> str:
    """A budget a user can type, not below ``n``: 1.01 GiB → ``1.1GiB``."""
    import math
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{math.ceil(n / scale * 10) / 10:g}{unit}"
    return str(n)


def ram_room(cpu_memory: int | None, resident_bytes: int) -> int:
    """What ``--cpu-memory`` leaves for the RAM tier and the host ring together (``plan_memory``'s room).
    Without it: free memory (container limit included) minus 1 GiB, minus the resident weights."""
    from ..placement import DEFAULT_MARGIN_BYTES
    total = cpu_memory if cpu_memory is not None else max(0, available_memory() - DEFAULT_MARGIN_BYTES)
    return max(0, total - resident_bytes)


def plan_table(t: Target, cpu_memory: int | None, prefetch: int, device: str = "cpu",
               gpu_memory: int | None = None, draft: int = 0, speculate: str | None = None) -> str:
    """Where every byte of the weights goes: GPU (resident, GPU tier, device ring), RAM (resident on the
    CPU, RAM tier, host ring) and disk (streamed per token), with the budgets they come from; the
    ``--speculate`` draft beside the resident weights. The split is ``plan_memory``'s, as ``enable`` makes it."""
    from ..budget import plan_memory
    from ..experts import reads_per_forward
    sizes = t.unit_bytes
    on_gpu = device != "cpu"
    sizes, experts = unit_sizes(t, device)
    gpu_room = None
    table = _device_table(experts) if on_gpu else 0
    if on_gpu:
        gpu_room = max(0, (gpu_memory if gpu_memory is not None else _free_gpu(device)) - t.resident_bytes - draft
                       - table)
    host_resident = 0 if on_gpu else t.resident_bytes + draft
    mp = plan_memory(sizes, prefetch, ram_room=ram_room(cpu_memory, host_resident), gpu_room=gpu_room,
                     ram_reserve=reads_per_forward(experts.top_k, experts.expert_bytes) if experts is not None else 0)
    gpu_tier, ram_tier, streamed = mp.gpu_tier, mp.ram_tier, mp.streamed
    slots, slot_bytes = mp.host_ring
    ring = slots * slot_bytes
    dslots, dslot_bytes = mp.device_ring
    rows = []
    if on_gpu:
        rows += [("resident (embeddings, norms, head)", "GPU", t.resident_bytes, 1 if t.resident_bytes else 0),
                 ("GPU tier (copied once)", "GPU", sum(sizes[i] for i in gpu_tier), len(gpu_tier)),
                 (f"device slot ring (prefetch {prefetch} + 1)", "GPU", dslots * dslot_bytes, dslots)]
        if table:
            rows.append(("experts' device table (one layer)", "GPU", table, 1))
        if experts is not None and gpu_room is not None:  # what the tier and the ring leave (experts.DeviceTier)
            one = max(experts.expert_bytes, default=0)
            left = max(0, gpu_room - sum(sizes[i] for i in gpu_tier) - dslots * dslot_bytes)
            held = min(left // one * one, sum(experts.unit_expert_bytes)) if one else 0
            rows.append(("experts kept on the GPU", "GPU", held, held // one if one else 0))
    else:
        rows.append(("resident (embeddings, norms, head)", "RAM", t.resident_bytes, 1 if t.resident_bytes else 0))
    rows += [("RAM tier (read once)", "RAM", sum(sizes[i] for i in ram_tier), len(ram_tier)),
             ("streamed from disk, per token", "disk", sum(sizes[i] for i in streamed), len(streamed)),
             (f"host staging ring (prefetch {prefetch} + 1)", "RAM", ring, slots)]
    if experts is not None:
        rows.append((f"routed experts, per token ({experts.top_k} a layer)", "disk", experts.routed_per_token(),
                     sum(1 for b in experts.expert_bytes if b)))
    if speculate:
        label = {"int4": "int4 self-draft (shares resident)", "int8": "int8 self-draft (shares resident)",
                 "ngram": "ngram draft (prompt lookup)"}.get(speculate, "draft model (--speculate FOLDER)")
        rows.append((label, "GPU" if on_gpu else "RAM", draft, len(sizes) if speculate in ("int4", "int8") else 0))
    out = [f"{'placement':36s} {'where':5s} {'size':>11s} {'units':>6s}"]
    out += [f"{a:36s} {b:5s} {format_bytes(c):>11s} {d:6d}" for a, b, c, d in rows]
    ram = host_resident + sum(sizes[i] for i in ram_tier) + ring
    budget = (f"--cpu-memory {format_bytes(cpu_memory)}" if cpu_memory is not None
              else "default budget: free memory - 1 GiB")
    held = (f"{t.quant} weights (the blocks' linear layers; the rest {dtype_tag(t.dtype)})" if t.quant
            else f"{dtype_tag(t.dtype)} weights")
    line = (f"{held} {format_bytes(t.resident_bytes + sum(t.unit_bytes))} in {len(sizes)} units; "
            f"RAM for weights {format_bytes(ram)} ({budget})")
    if on_gpu:
        gpu = sum(c for a, b, c, d in rows if b == "GPU")
        line += (f"; {device} for weights {format_bytes(gpu)} ("
                 + (f"--gpu-memory {format_bytes(gpu_memory)}" if gpu_memory is not None else
                    "default: free GPU memory - 2 GiB") + ")")
    out.append(line)
    if experts is not None:
        whole = sum(t.unit_bytes[i] for i in streamed) + sum(experts.unit_expert_bytes[i] for i in ram_tier)
        cache = experts.cache_budget(max(0, ram_room(cpu_memory, host_resident) - sum(sizes[i] for i in ram_tier) - ring))
        out.append(f"mixture of experts: a token reads at most {format_bytes(experts.routed_per_token())} of experts "
                   f"(less when the expert cache, up to {format_bytes(cache)}, holds them) beside the blocks' other "
                   f"{format_bytes(sum(sizes[i] for i in streamed))}; streaming whole blocks would read "
                   f"{format_bytes(whole)} per token")
    return "\n".join(out)


def unit_sizes(t: Target, device: str) -> tuple[list[int], Any]:
    """The bytes each unit streams, and the routed-experts plan: a mixture-of-experts block streams without
    its experts (read on routing) where ``enable`` does that (unquantized units), else whole."""
    experts = _routed(t) if not t.quant else None
    if experts is None:
        return t.unit_bytes, None
    return [b - e for b, e in zip(t.unit_bytes, experts.unit_expert_bytes)], experts


def _routed(t: Target) -> Any:
    """The routed-experts plan of the target (None for a model without experts)."""
    import transformers as tf

    from ..experts import routed_plan
    from ..plan import find_units
    if t.kind != "random" and not os.path.isfile(os.path.join(t.path, "config.json")):
        return None  # a store made from a module: no config to plan experts from (enable still finds them)
    config = config_for(t.label) if t.kind == "random" else tf.AutoConfig.from_pretrained(t.path)
    model = meta_model(config, t.dtype)
    names = [n for n, _ in find_units(model)]
    plan = routed_plan(model, names)
    return plan if plan is not None and len(names) == len(t.unit_bytes) else None


def _free_gpu(device: str) -> int:
    from ..placement import DEFAULT_MARGIN_BYTES
    if not torch.cuda.is_available():
        return 0
    return max(0, int(torch.cuda.mem_get_info(torch.device(device))[0]) - 2 * DEFAULT_MARGIN_BYTES)


# ------------------------------------------------------------------------------ tokenizer and streaming


def load_tokenizer(path: str) -> Any:
    """The folder's (or store's) tokenizer; None when it has no tokenizer files at all.

    Tokenizer files that fail to load are an error, never a silent fall-back to bytes."""
    from ..sources import tokenizer_files
    files = tokenizer_files(path)
    if not files:
        return None
    import transformers as tf
    try:
        return tf.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any failure of the user's tokenizer files is reported in one line
        names = ", ".join(os.path.basename(f) for f in files[:4])
        raise UsageError(f"{path}: its tokenizer files ({names}) fail to load: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


class ByteIds:
    """Stands in for a tokenizer when a model has none: UTF-8 bytes in, token ids printed."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids: Any, **_: Any) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return "".join(f" {i}" for i in ids)


def make_streamer(tokenizer: Any, skip_prompt: bool, out: Any = None) -> Any:
    """A ``transformers.TextStreamer`` that prints to ``out`` (default: stdout at print time) and records
    when each new token arrived (``.times``)."""
    import transformers as tf

    class TimedStreamer(tf.TextStreamer):
        """Transformers' TextStreamer (it re-decodes the tokens since the last printed word, so the pieces
        add up to ``tokenizer.decode(ids, skip_special_tokens=True)``: no half characters, no lost
        spaces), plus the time each token arrived; with a batch, the first row is printed."""

        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.times.append(time.perf_counter())
            super().put(value[:1] if value.dim() > 1 else value[:1].reshape(1, 1))

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            f = out or sys.stdout
            f.write(text + ("\n" if stream_end else ""))
            f.flush()

    return TimedStreamer()


# ------------------------------------------------------------------------------ a file of prompts


class Job(NamedTuple):
    """One prompt of a ``--prompts`` file: its place among the prompts, its line, its own token limit."""
    index: int
    line: int
    prompt: str
    max_new_tokens: int | None
    ids: tuple[int, ...] = ()


JOB_KEYS = ("prompt", "max_new_tokens")


def read_prompts(path: str) -> list[Job]:
    """The whole ``--prompts`` file, checked before anything is loaded: JSON lines (``{"prompt": ...,
    "max_new_tokens": N}``) when its first non-blank line starts with ``{``, else one prompt per line.
    Blank lines are skipped. A bad line is a one-line error naming it."""
    try:
        # utf-8-sig: a byte-order mark (Notepad, PowerShell) is not part of the first prompt, nor hides its "{"
        with open(path, encoding="utf-8-sig", newline="") as f:  # lines end at "\n" only (CRLF too): str.splitlines
            lines = [x.removesuffix("\r") for x in f.read().split("\n")]  # would also split at U+2028, NEL, \f
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise UsageError(f"{path} holds no prompts: write one per line, or JSON lines with \"prompt\"")
    if not numbered[0][1].lstrip().startswith("{"):
        return [Job(i, n, line, None) for i, (n, line) in enumerate(numbered)]
    jobs = []
    for i, (n, line) in enumerate(numbered):
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not JSON ({e.msg} at column {e.colno}): the file is JSON lines (its first "
                             f"line is), so every line must be an object like {{\"prompt\": \"...\"}}") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: a JSON {type(row).__name__}, not an object like {{\"prompt\": \"...\"}}")
        if unknown := sorted(set(row) - set(JOB_KEYS)):
            raise UsageError(f"{where}: unknown key {unknown[0]!r}: a line may have {' and '.join(JOB_KEYS)}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UsageError(f"{where}: \"prompt\" must be a non-empty string, got {json.dumps(prompt)}")
        limit = row.get("max_new_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UsageError(f"{where}: \"max_new_tokens\" must be a whole number >= 1, got {json.dumps(limit)}")
        jobs.append(Job(i, n, prompt, limit))
    return jobs


def encode_jobs(jobs: list[Job], tokenizer: Any, a: argparse.Namespace, config: Any) -> list[Job]:
    """Each prompt's token ids, checked against the model (``engine.check_prompt``) before anything is
    converted or loaded; ``config`` is the model's config or its folder."""
    from ..engine import check_prompt
    if isinstance(config, str):
        import transformers as tf
        config = tf.AutoConfig.from_pretrained(config)
    tok = tokenizer or ByteIds(config.get_text_config().vocab_size)
    out = []
    for j in jobs:
        ids = tuple(tok.encode(j.prompt))
        try:
            check_prompt(ids, j.max_new_tokens or a.max_new_tokens, config)
        except ValueError as e:
            raise UsageError(f"{a.prompts}:{j.line}: {e}") from None
        out.append(j._replace(ids=ids))
    return out


def _source(a: argparse.Namespace) -> str:
    """What generated a prompts run's rows, as its rows record it: the model (folder or store, absolute) or
    the --random name, and the dtype and quantization asked."""
    model = f"random:{a.random}" if a.random else os.path.abspath(a.model)
    return " ".join(x for x in (model, getattr(a, "dtype", None), getattr(a, "quantize", None)) if x)


def finished_rows(path: str, jobs: list[Job], prompts_file: str, source: str,
                  limit: int) -> dict[int, dict[str, Any]]:
    """Rows an earlier run of the same job wrote to ``path`` (by index). A last line cut short by an
    interrupt is dropped; a row for another prompt, model or token limit means ``path`` belongs to
    another job: refused (a rerun with another model reused the first one's rows)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows: dict[int, dict[str, Any]] = {}
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == last and n == len(lines):  # no newline after it: the write an interrupt cut short
                continue
            raise UsageError(f"{path}:{n}: not a JSON line: this file is not an --output of offload run; pass "
                             f"another --output, or delete it to start over") from None
        i = row.get("index") if isinstance(row, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(jobs) or row.get("prompt") != jobs[i].prompt:
            raise UsageError(f"{path}:{n}: its row does not match prompt {i} of {prompts_file} (line "
                             f"{jobs[i].line if isinstance(i, int) and 0 <= i < len(jobs) else '?'}): it was written "
                             f"for another prompts file; pass another --output, or delete it to start over")
        want = {"source": source, "max_new_tokens": jobs[i].max_new_tokens or limit}
        if other := [k for k, v in want.items() if k in row and row[k] != v]:  # rows of older versions lack them
            raise UsageError(f"{path}:{n}: its row was written with {other[0]} {row.get(other[0])!r}, this run has "
                             f"{want[other[0]]!r}: pass another --output, or delete it to start over")
        rows[i] = row
    return rows


def write_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with these rows, atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_prompts(jobs: list[Job], a: argparse.Namespace, model: Any, handle: Any, tokenizer: Any,
                device: torch.device) -> int:
    """Every prompt of the file through one ``Engine`` (``--batch-size`` rows per streamed pass). With
    ``--output``, each finished row is appended as one line when it finishes (so Ctrl-C keeps it and a
    rerun skips it), and the file is rewritten in input order at the end; without, rows go to stdout in
    input order as soon as every row before them is done."""
    from tqdm import tqdm

    from ..engine import Engine
    out_path = a.output
    source = _source(a)
    done = finished_rows(out_path, jobs, a.prompts, source, a.max_new_tokens) if out_path else {}
    todo = [j for j in jobs if j.index not in done]
    if out_path:
        write_rows(out_path, [done[i] for i in sorted(done)])  # drops a line an interrupt cut short
        if done:
            _say(f"{out_path}: {len(done)} of {len(jobs)} prompts already done, {len(todo)} to go")
    engine = Engine(model, tokenizer or ByteIds(model.config.get_text_config().vocab_size), batch_size=a.batch_size)
    for j in todo:
        engine.submit(list(j.ids), max_new_tokens=j.max_new_tokens or a.max_new_tokens, index=j.index)
    sink = open(out_path, "a", encoding="utf-8") if out_path else sys.stdout
    pending: dict[int, dict[str, Any]] = {}
    next_out = 0  # stdout: the next index to print
    bar = tqdm(total=len(jobs), initial=len(done), unit="prompt", desc="prompts", file=sys.stderr,
               disable=a.quiet or not todo, dynamic_ncols=True)
    handle.reset_stats()
    t0 = time.perf_counter()
    try:
        while engine.busy:
            for r in engine.step():
                j = jobs[r.index]
                row = {"index": j.index, "line": j.line, "prompt": j.prompt, "completion": r.text,
                       "tokens": len(r.token_ids), "finish_reason": r.finish_reason, "source": source,
                       "max_new_tokens": j.max_new_tokens or a.max_new_tokens}
                if out_path:
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per row, then flushed
                    sink.flush()
                    done[j.index] = row
                else:
                    pending[j.index] = row
                    while next_out in pending:
                        sink.write(json.dumps(pending.pop(next_out), ensure_ascii=False) + "\n")
                        next_out += 1
                    sink.flush()
                bar.update(1)
                bar.set_postfix_str(f"{engine.stats()['tokens'] / (time.perf_counter() - t0):.2f} tokens/s",
                                    refresh=False)
    except KeyboardInterrupt:
        bar.close()
        finished = len(done) if out_path else next_out
        _say(f"interrupted: {finished} of {len(jobs)} prompts done" + (
            f" and kept in {out_path}; run the same command again to do the other {len(jobs) - finished}"
            if out_path else ""))
        raise
    finally:
        bar.close()
        if out_path:
            sink.close()
    total = time.perf_counter() - t0
    if out_path:
        write_rows(out_path, [done[i] for i in sorted(done)])
    st, s = engine.stats(), handle.stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = (f"{len(todo)} prompts, {st['tokens']} tokens in {st['passes']} passes (batch {a.batch_size}): "
               f"{st['tokens'] / max(total, 1e-9):.2f} tokens/s, {format_bytes(s.bytes_read / max(st['tokens'], 1))} "
               f"read/token, waited on I/O {s.wait_seconds / max(total, 1e-9):.0%} of {total:.1f} s, peak RSS "
               f"{format_bytes(rss)}" + (f"; {out_path}: {len(done)} rows in input order" if out_path else ""))
    print(summary, file=sys.stdout if out_path else sys.stderr)
    return 0


# ------------------------------------------------------------------------------ loading


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_run(a: argparse.Namespace, work: Callable[..., int] | None = None, target: Target | None = None) -> int:
    """Check, plan, convert once, load, then ``work(a, model, handle, tokenizer, device)`` (default: generate
    from --prompt, or the --prompts file); ``offload serve`` passes its server as ``work``, ``offload tune`` the
    target it resolved already."""
    jobs = read_prompts(a.prompts) if getattr(a, "prompts", None) else None  # the whole file, before any work
    if jobs is None and getattr(a, "output", None):
        raise UsageError("--output applies with --prompts FILE")
    if jobs is not None and (a.prompt is not None or a.speculate):
        raise UsageError(f"--prompts {a.prompts} runs every prompt in the file: drop "
                         + ("--prompt" if a.prompt is not None else "--speculate (one sequence at a time)"))
    if not a.verbose:
        import transformers as tf
        tf.logging.set_verbosity_error()  # generate()'s notes about pad tokens are not the user's business
    device = a.device or default_device()
    if a.gpu_memory is not None and device == "cpu":
        _say("note: --gpu-memory ignored: units compute on the CPU" + ("" if torch.cuda.is_available() else
                                                                       " (no CUDA device)"))
    # 1. Everything that can be refused, before anything is written or loaded.
    target = target if target is not None else resolve(a)
    require_reader(a.reader)
    if a.plot:
        require("matplotlib", "plot", "--plot")
    builds = store_builds(target, a)
    if a.quantize and builds:
        require("torchao", "quant", f"--quantize {a.quantize}")
    draft = draft_plan(a, target)
    auto = a.prefetch == "auto"
    check_budget(target, a.cpu_memory, 1 if auto else a.prefetch, device, a.gpu_memory, draft)
    space = check_disk(target, a, builds, refuse=not a.dry_run)
    table_out = sys.stderr if jobs is not None and not a.output else sys.stdout  # stdout: the results' JSON lines
    if not auto or a.dry_run:  # auto: the depth is chosen at load (the disk measured if it never was), table then
        print(plan_table(target, a.cpu_memory, tune.DEFAULT_PREFETCH if auto else a.prefetch, device, a.gpu_memory,
                         draft, a.speculate), file=table_out)
    if a.dry_run:
        if space:
            _say(f"note: {space}")
        return 0
    tokenizer = load_tokenizer(target.path) if target.kind != "random" else None
    if tokenizer is None:
        _say(f"note: {'random models have' if target.kind == 'random' else target.path + ' has'} no tokenizer "
             f"files: the prompt's bytes are the token ids, and ids are printed")
    if jobs is not None:
        config = config_for(a.random) if target.kind == "random" else None
        jobs = encode_jobs(jobs, tokenizer, a, config or target.path)
        work = functools.partial(run_prompts, jobs)
    # 2. Convert (once) and load.
    from ..convert import cached_store
    if target.kind == "store":
        store = target.path
    else:
        folder = target.path
        if target.kind == "random":
            folder = random_checkpoint(a.random, target.dtype, folder, not a.quiet)
        store = cached_store(folder, target.dtype, rebuild=a.rebuild, allow_pickle=a.allow_pickle,
                             progress=not a.quiet, note=_say, quantize=a.quantize, group_size=a.group_size)
    import offload
    trace = a.trace or (os.path.splitext(a.plot)[0] + ".trace.json" if a.plot else None)
    # The --speculate draft lives beside the resident weights: its bytes come out of that budget's tier.
    memory: dict[str, Any] = {"cpu_memory": a.cpu_memory, "gpu_memory": a.gpu_memory if device != "cpu" else None}
    if draft and device != "cpu":
        memory["gpu_memory"] = max(0, (a.gpu_memory if a.gpu_memory is not None else _free_gpu(device)) - draft)
    elif draft and a.cpu_memory is not None:
        memory["cpu_memory"] = a.cpu_memory - draft
    elif draft:  # the default budget (free memory - 1 GiB) less the draft
        memory["cpu_memory"] = ram_room(None, draft)
    model, handle = offload.load(store, a.prefetch, device=device, **memory, trace=trace, reader=a.reader,
                                 verify=not a.no_verify, progress=not a.quiet, tune=not a.no_tune)
    if auto:
        print(plan_table(target, a.cpu_memory, handle.stats().prefetch, device, a.gpu_memory, draft, a.speculate),
              file=table_out)
    pred = handle.predict(a.batch_size)
    _say(prediction_line(pred, handle.stats().prefetch, auto, a.batch_size, handle.why_no_prediction))
    try:
        rc = (work or _generate)(a, model, handle, tokenizer, torch.device(device))
    finally:
        handle.disable()  # writes the trace
    if trace:
        _say(f"trace: {trace} (open in https://ui.perfetto.dev)")
    if a.plot:
        from ..trace import plot
        _say(f"timeline: {plot(trace, a.plot)}")
    return rc


def prediction_line(pred: Any, depth: int, auto: bool, batch: int, why: str = "") -> str:
    """The plan's forecast: seconds per decode pass, what bounds it, and where the numbers came from."""
    how = "auto" if auto else "--prefetch"
    if pred is None:
        return f"prefetch {depth} ({how}); no prediction: {why or 'nothing measured'}"
    floors = f"disk {pred.read_s:.3f} s, compute {pred.compute_s:.3f} s" + (f", PCIe {pred.copy_s:.3f} s"
                                                                           if pred.copy_s else "")
    return (f"prefetch {depth} ({how}): predicted {pred.s_per_pass:.3f} s/token at batch {batch}, {pred.bound}-bound "
            f"(floors: {floors}); {pred.basis}")


def _generate(a: argparse.Namespace, model: Any, handle: Any, tokenizer: Any, device: torch.device) -> int:
    tok = tokenizer or ByteIds(model.config.vocab_size)
    prompt = a.prompt or DEFAULT_PROMPT
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
    if ids.shape[1] == 0:
        raise UsageError(f"--prompt {prompt!r} encodes to no tokens")
    ids = ids.repeat(a.batch_size, 1).to(device)
    streamer = make_streamer(tok, skip_prompt=not model.config.is_encoder_decoder)
    spec = spec_stats = None
    if a.speculate:
        from ..speculate import Speculator
        t0 = time.perf_counter()
        spec = Speculator(model, a.speculate, handle=handle, draft_tokens=a.draft_tokens)
        _say(f"draft {a.speculate}: {format_bytes(spec.draft_bytes)}, ready in {time.perf_counter() - t0:.1f} s")
    handle.reset_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        if spec is not None:
            out, spec_stats = spec.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                                            min_new_tokens=a.max_new_tokens, streamer=streamer)
        else:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                                 min_new_tokens=a.max_new_tokens, do_sample=False, streamer=streamer)
    total = time.perf_counter() - t0
    s = handle.stats()
    n = out.shape[1] - (1 if model.config.is_encoder_decoder else ids.shape[1])  # enc-dec: less the start token
    times = streamer.times
    decode_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else total
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = f", peak GPU {format_bytes(torch.cuda.max_memory_allocated())}" if torch.cuda.is_available() else ""
    print(f"{n} tokens x batch {a.batch_size}: {decode_s:.3f} s/token (decode), {format_bytes(s.bytes_read / max(n, 1))} "
          f"read/token, waited on I/O {s.wait_seconds / total:.0%} of {total:.1f} s, misses {s.misses}, "
          f"peak RSS {format_bytes(rss)}{gpu}")
    pred = handle.prediction if spec is None else None  # speculation changes what a pass is
    if pred is not None and s.s_per_pass:
        print(f"measured {s.s_per_pass:.3f} s/pass (median decode pass) vs predicted {pred.s_per_pass:.3f} "
              f"({s.s_per_pass / pred.s_per_pass - 1:+.0%}; {pred.bound}-bound)")
    if spec_stats is not None:
        print(spec_stats.summary())
    return 0


def add_model_options(r: Any) -> None:
    """MODEL and how to load it within what memory: the options ``offload run`` and ``offload serve`` share
    (``cmd_run`` reads them)."""
    from ..io import READERS
    r.add_argument("model", nargs="?", help="Hugging Face model folder or offload store")
    r.add_argument("--random", metavar="NAME", type=random_name,
                   help=f"random weights of a real architecture instead of MODEL: {', '.join(RANDOM_MODELS)}")
    r.add_argument("--cpu-memory", type=byte_size, metavar="BYTES",
                   help="RAM for all weights: resident + staging ring + RAM tier, e.g. 8GiB (default: free memory, "
                        "container limit included, minus 1 GiB)")
    r.add_argument("--gpu-memory", type=byte_size, metavar="BYTES",
                   help="CUDA: GPU memory for all weights: resident + device slot ring + GPU tier, as "
                        "offload.enable(gpu_memory=) (default: free GPU memory minus 2 GiB)")
    r.add_argument("--device", type=device, metavar="DEVICE",
                   help="where the model computes: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    r.add_argument("--trace", type=output_file, metavar="FILE",
                   help="write a Chrome/Perfetto trace of reads, copies, forwards and waits to FILE")
    r.add_argument("--prefetch", type=depth, default="auto", metavar="N",
                   help="units read ahead while one computes (default: auto, chosen from this disk's measured rate "
                        "and the units' compute; the plan prints the prediction)")
    r.add_argument("--no-tune", action="store_true",
                   help="with --prefetch auto, never measure the disk: use a cached measurement, else depth 2")
    r.add_argument("--dtype", choices=sorted(DTYPES),
                   help="dtype to run in (default: the checkpoint's own, from config.json or its weights; a store's "
                        "own; bf16 for --random)")
    r.add_argument("--reader", choices=READERS, help="disk reader (default: native when built, else python)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the placement plan (from the safetensors headers: nothing converted) and stop")
    r.add_argument("--quantize", choices=("int8", "int4"),
                   help="stream the blocks' linear weights int8 or int4 (a quantized store of its own is cached; a "
                        "store argument is used as it was converted)")
    r.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="int4 group size")
    r.add_argument("--rebuild", action="store_true", help="convert the folder again even if its cached store is current")
    r.add_argument("--allow-pickle", action="store_true", help="accept *.bin pickle checkpoints (torch.load(weights_only=True))")
    r.add_argument("--no-verify", action="store_true",
                   help="skip checking each unit's checksum the first time it is read (default: checked)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_parser(sub: Any) -> None:
    r = add_command(sub, "run", "generate with a model bigger than memory (converts it first if needed)",
                    "Generate with a Hugging Face folder, an offload store or a random model, streaming its blocks "
                    "from disk within a memory budget. A folder is converted once into a cached store, reused while "
                    "its files and dtype are unchanged.")
    add_model_options(r)
    r.add_argument("--prompt", type=nonempty, metavar="TEXT", help=f"text to continue (default: {DEFAULT_PROMPT!r})")
    r.add_argument("--prompts", type=input_file, metavar="FILE",
                   help="a batch job: one prompt per line, or JSON lines with \"prompt\" (and optional "
                        "\"max_new_tokens\"); continuous batching, --batch-size rows per pass; results as JSON lines "
                        "in input order (to --output, else stdout)")
    r.add_argument("--output", type=output_file, metavar="OUT.jsonl",
                   help="with --prompts: write results here as each finishes (a rerun skips the prompts already in "
                        "it; Ctrl-C keeps every finished row), in input order at the end")
    r.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N", help="tokens to generate")
    r.add_argument("--plot", type=output_file, metavar="PNG",
                   help="draw the trace as a PNG timeline (needs matplotlib)")
    r.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="rows generated at once (the prompt repeated; with --prompts, prompts sharing each pass)")
    r.add_argument("--speculate", type=speculate_mode, metavar="int4|int8|ngram|FOLDER",
                   help="several tokens per disk pass: a resident draft proposes tokens that one streamed pass "
                        "verifies; fp32 gives plain greedy's tokens, bf16/fp16 the verify passes' (they can differ "
                        "after a near-tie, as in Transformers' assisted generation). int4/int8: the model's blocks "
                        "quantized in memory (sharing its embeddings and head); ngram: prompt lookup; FOLDER: a small "
                        "model with the same tokenizer. Its memory counts in --cpu-memory (--gpu-memory on a GPU)")
    r.add_argument("--draft-tokens", type=positive_int, metavar="K",
                   help="tokens drafted per pass with --speculate (default: chosen each pass from the measured "
                        "draft and pass times and the acceptance)")
    r.set_defaults(fn=cmd_run)


def _tune_work(a: argparse.Namespace, model: Any, handle: Any, tokenizer: Any, device: torch.device) -> int:
    """``offload tune``'s work: a short greedy generation at --batch-size, then measured vs predicted. The
    decode compute it measures is cached when the handle is disabled, for every later plan of this store."""
    before = handle.predict(a.batch_size)
    ids = torch.tensor([[(17 * i + 3) % model.config.vocab_size for i in range(16)]] * a.batch_size, device=device)
    handle.reset_stats()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                       min_new_tokens=a.max_new_tokens, do_sample=False)
    s = handle.stats()
    after = handle.predict(a.batch_size)
    print(f"measured {s.s_per_pass:.3f} s per decode pass at batch {a.batch_size} (median of {a.max_new_tokens - 1}), "
          f"prefetch {s.prefetch}")
    if before is not None:
        print(f"predicted before: {before.s_per_pass:.3f} s ({s.s_per_pass / before.s_per_pass - 1:+.0%}); {before.basis}")
    if after is not None:
        print(f"predicted now:    {after.s_per_pass:.3f} s ({s.s_per_pass / after.s_per_pass - 1:+.0%}), "
              f"{after.bound}-bound; {after.basis}")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    """Measure this disk afresh (the model's own files, read only), load with ``prefetch="auto"``, run a
    few decode passes and cache their compute: later runs of this store plan from measurements."""
    if a.prefetch != "auto" or a.no_tune or a.dry_run:  # it measures, and plans the depth itself
        raise UsageError("offload tune measures the disk and picks the depth itself: --prefetch N, --no-tune and "
                         "--dry-run do not apply (use them with offload run)")
    from ..tune import DEFAULT_PREFETCH, MIN_STREAMED_BYTES
    t = resolve(a)
    sizes, experts = unit_sizes(t, "cpu")  # what enable weighs: a MoE block without its routed experts
    streamed = sum(sizes)
    if streamed < MIN_STREAMED_BYTES:  # nothing would be measured: the cached profiles stay
        _say(f"offload tune: {t.label}'s units total {format_bytes(streamed)}"
             f"{' besides their routed experts (read as routed)' if experts is not None else ''} (< "
             f"{format_bytes(MIN_STREAMED_BYTES)}), too little for the look-ahead depth to matter: nothing measured, "
             f"nothing forgotten (runs of it use prefetch {DEFAULT_PREFETCH})")
        return 0
    removed = measure.forget_disks()
    if removed:
        _say(f"offload tune: forgot {removed} cached disk measurement(s) of this machine")
    a.prefetch, a.no_tune, a.prompt, a.prompts, a.output, a.speculate, a.plot = "auto", False, None, None, None, None, None
    a.draft_tokens = None
    t0 = time.perf_counter()
    rc = cmd_run(a, work=_tune_work, target=t)
    _say(f"offload tune: {time.perf_counter() - t0:.1f} s; measurements cached under {measure.cache_root()}")
    return rc


def add_tune_parser(sub: Any) -> None:
    t = add_command(sub, "tune", "measure the disk and the model's compute once; later runs plan from them",
                    "Measure this disk's read rate with the run's reader on the model's own files (read only, O_DIRECT), "
                    "load the model with --prefetch auto, and time a few decode passes at --batch-size: the disk "
                    "profile and the compute are cached (OFFLOAD_CACHE/tune) and every later `offload run`, "
                    "offload.load and offload.enable with prefetch='auto' plans from them. Prints the depth chosen "
                    "and predicted vs measured seconds per pass.")
    add_model_options(t)
    t.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="rows per pass to measure")
    t.add_argument("--max-new-tokens", type=at_least(3), default=3, metavar="N",
                   help="tokens to generate (all but the first are the decode passes measured; two are enough "
                        "for the compute, more only take longer on a slow disk)")
    t.set_defaults(fn=cmd_tune)
