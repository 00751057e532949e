"""``offload run`` and ``offload bench``: load a checkpoint or store with a memory budget and generate.

Random-weight models of real architectures (``--random bloom-7b1``) are written once to the cache as a
normal Hugging Face folder, shard by shard, so no hub is needed and the bytes, shapes and compute
are those of the real model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ._memory import available_memory, format_bytes, parse_bytes
from .io import READERS

# Real architectures' shapes (from their published configs). family → transformers config class.
RANDOM_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "bloom-560m": ("bloom", dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)),
    "bloom-1b7": ("bloom", dict(vocab_size=250880, hidden_size=2048, n_layer=24, n_head=16)),
    "bloom-7b1": ("bloom", dict(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32)),
    "bloom": ("bloom", dict(vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112)),
    "opt-1.3b": ("opt", dict(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                             ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048)),
    "opt-30b": ("opt", dict(vocab_size=50272, hidden_size=7168, num_hidden_layers=48, num_attention_heads=56,
                            ffn_dim=28672, max_position_embeddings=2048, word_embed_proj_dim=7168)),
    "gpt-neox-20b": ("gpt_neox", dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                                      intermediate_size=24576, max_position_embeddings=2048, rotary_pct=0.25)),
    "gpt-j-6b": ("gptj", dict(vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048)),
    "t0pp": ("t5", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)),
    "tiny-bloom": ("bloom", dict(vocab_size=1024, hidden_size=64, n_layer=4, n_head=4)),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _config(name: str) -> Any:
    import transformers as tf
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown --random model {name!r}: choose one of {', '.join(RANDOM_MODELS)}")
    family, kw = RANDOM_MODELS[name]
    cls = {"bloom": tf.BloomConfig, "opt": tf.OPTConfig, "gpt_neox": tf.GPTNeoXConfig, "gptj": tf.GPTJConfig,
           "t5": tf.T5Config}[family]
    return cls(**kw)


def _model_class(config: Any) -> Any:
    import transformers as tf
    return tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM


def _meta_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The model's modules with parameters on meta and (non-persistent) buffers real."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        model = _model_class(config).from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def random_checkpoint(name: str, dtype: torch.dtype, folder: str, progress: bool = True,
                      shard_bytes: int = 2 << 30) -> str:
    """Write a random-weight HF checkpoint of architecture ``name`` (once; reused if complete)."""
    from safetensors.torch import save_file
    from .convert import _progress
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        return folder
    config = _config(name)
    model = _meta_model(config, dtype)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    params = [(k, p) for k, p in model.state_dict().items() if k not in tied]
    os.makedirs(folder, exist_ok=True)
    tmp = folder + ".partial"
    os.makedirs(tmp, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0
    bar = _progress(sum(p.numel() * p.element_size() for _, p in params), f"writing random {name}", progress)

    def flush() -> None:
        nonlocal shard, size, index
        if not shard:
            return
        fname = f"model-{index:05d}.safetensors"
        save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        shard, size, index = {}, 0, index + 1

    for k, p in params:
        t = torch.empty(p.shape, dtype=torch.float32)
        if k.endswith("bias"):
            t.zero_()
        elif "norm" in k or k.endswith("ln_f.weight") or "layer_norm" in k:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shard[k] = t.to(dtype) if p.dtype.is_floating_point else t.to(p.dtype)
        size += shard[k].numel() * shard[k].element_size()
        bar.update(shard[k].numel() * shard[k].element_size())
        if size >= shard_bytes:
            flush()
    flush()
    bar.close()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(p.numel() * p.element_size() for _, p in params)},
                   "weight_map": weight_map}, f)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(tmp)
    for fname in os.listdir(tmp):
        os.replace(os.path.join(tmp, fname), os.path.join(folder, fname))
    os.rmdir(tmp)
    return folder


def resolve_model(spec: str | None, random_name: str | None, dtype: torch.dtype, progress: bool) -> tuple[str, str]:
    """(HF folder or None, store folder) for a MODEL argument or a --random name; converts if needed."""
    from .convert import convert
    from .runtime import cache_dir
    from .store import MANIFEST
    tag = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    if random_name:
        _config(random_name)  # validate the name before writing gigabytes
        folder = random_checkpoint(random_name, dtype, os.path.join(cache_dir(), "random", f"{random_name}-{tag}"), progress)
    else:
        assert spec is not None
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"{spec} is not a folder: pass a Hugging Face model folder or an offload store")
        if os.path.exists(os.path.join(spec, MANIFEST)):
            return "", spec
        folder = spec
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json: pass a Hugging Face model folder or an offload store")
    store = os.path.join(cache_dir(), "stores", f"{os.path.basename(os.path.abspath(folder))}-{tag}")
    if not os.path.exists(os.path.join(store, MANIFEST)):
        convert(folder, store, dtype=dtype, progress=progress)
    return folder, store


def load_offloaded(store_path: str, dtype: torch.dtype, prefetch: int, cpu_memory: int | None,
                   reader: str | None = None, progress: bool = True) -> tuple[torch.nn.Module, Any]:
    """Build the model on meta, load the resident weights, stream the blocks from the store."""
    import transformers as tf
    from safetensors.torch import load_file
    from . import enable
    from .store import Store
    store = Store.open(store_path)
    config = tf.AutoConfig.from_pretrained(store_path)
    model = _meta_model(config, dtype)
    if store.resident is not None:
        state = load_file(store.file_path(store.resident))
        state = {k: v for k, v in state.items() if not k.startswith("__offload_pad_")}
        model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"
               and not any(n.startswith(u.name + ".") for u in store.units)]
    if missing:
        raise ValueError(f"store {store_path} has no weights for {missing[:3]}: re-run `offload convert`")
    ring = (prefetch + 1) * max(u.data_bytes for u in store.units)
    tier = tier_budget(cpu_memory, store.resident.data_bytes if store.resident else 0, ring)
    handle = enable(model, prefetch=prefetch, store=store_path, cpu_memory=tier, units=[u.name for u in store.units],
                    reader=reader, progress=progress)
    return model, handle


def tier_budget(cpu_memory: int | None, resident_bytes: int, ring_bytes: int) -> int:
    """``--cpu-memory`` is the RAM for all weights (resident + ring + RAM tier); the tier gets what is left.

    Without it: free memory (container limit included) minus 1 GiB of head-room.
    """
    from .runtime import DEFAULT_MARGIN_BYTES
    total = cpu_memory if cpu_memory is not None else max(0, available_memory() - DEFAULT_MARGIN_BYTES)
    return max(0, total - resident_bytes - ring_bytes)


def plan_table(store_path: str, cpu_memory: int | None, prefetch: int) -> str:
    from .plan import choose_resident
    from .store import Store
    store = Store.open(store_path, check_files=False)
    sizes = [u.data_bytes for u in store.units]
    ring = (prefetch + 1) * max(sizes)
    resident_bytes = store.resident.data_bytes if store.resident else 0
    res = choose_resident(sizes, tier_budget(cpu_memory, resident_bytes, ring))
    gb = lambda n: f"{n / 1e9:8.2f} GB"  # noqa: E731
    rows = [("resident (embeddings, norms, head)", "RAM", resident_bytes, 1 if store.resident else 0),
            ("RAM tier (read once)", "RAM", sum(sizes[i] for i in res), len(res)),
            ("streamed from disk", "disk", sum(s for i, s in enumerate(sizes) if i not in res), len(sizes) - len(res)),
            (f"staging ring (prefetch {prefetch} + 1)", "RAM", ring, prefetch + 1)]
    out = [f"{'placement':36s} {'where':5s} {'size':>11s} {'units':>6s}"]
    out += [f"{a:36s} {b:5s} {gb(c)} {d:6d}" for a, b, c, d in rows]
    return "\n".join(out)


class _Streamer:
    """Prints tokens as generate() produces them and records when each arrived."""

    def __init__(self, decode: Callable[[list[int]], str], skip: int, out: Any = sys.stdout):
        self.decode, self.skip, self.out = decode, skip, out
        self.times: list[float] = []
        self._seen = 0

    def put(self, value: torch.Tensor) -> None:
        self._seen += 1
        if self._seen == 1 and self.skip:
            return  # the prompt
        self.times.append(time.perf_counter())
        self.out.write(self.decode(value.reshape(-1)[:1].tolist()))
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _prompt_ids(folder: str, prompt: str, vocab: int, batch: int) -> tuple[torch.Tensor, Callable[[list[int]], str]]:
    with contextlib.suppress(Exception):
        import transformers as tf
        tok = tf.AutoTokenizer.from_pretrained(folder)
        ids = tok(prompt, return_tensors="pt").input_ids
        return ids.repeat(batch, 1), lambda t: tok.decode(t)
    # No tokenizer (random models): bytes stand in for tokens, ids are printed.
    ids = torch.tensor([[b % vocab for b in prompt.encode()]], dtype=torch.long)
    return ids.repeat(batch, 1), lambda t: "".join(f" {i}" for i in t)


def cmd_run(a: argparse.Namespace) -> int:
    if not a.model and not a.random:
        raise ValueError("pass MODEL (a Hugging Face folder or a store) or --random NAME")
    dtype = DTYPES[a.dtype]
    if a.gpu_memory is not None and not torch.cuda.is_available():
        print("note: --gpu-memory ignored: no CUDA device; units compute on the CPU", file=sys.stderr)
    if a.dry_run and a.random:
        from .plan import find_units
        model = _meta_model(_config(a.random), dtype)
        units = find_units(model)
        unit_bytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for _, m in units]
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"{a.random} ({a.dtype}): {total / 1e9:.1f} GB, {len(units)} units of {max(unit_bytes) / 1e9:.2f} GB; "
              f"resident {(total - sum(unit_bytes)) / 1e9:.2f} GB")
        from .plan import choose_resident
        ring = (a.prefetch + 1) * max(unit_bytes)
        res = choose_resident(unit_bytes, tier_budget(a.cpu_memory, total - sum(unit_bytes), ring))
        streamed = sum(b for i, b in enumerate(unit_bytes) if i not in res)
        print(f"plan: {len(res)} units in RAM ({sum(unit_bytes[i] for i in res) / 1e9:.1f} GB), "
              f"{len(units) - len(res)} streamed ({streamed / 1e9:.1f} GB read per token), ring {ring / 1e9:.2f} GB")
        return 0
    folder, store = resolve_model(a.model, a.random, dtype, not a.quiet)
    print(plan_table(store, a.cpu_memory, a.prefetch))
    if a.dry_run:
        return 0
    model, handle = load_offloaded(store, dtype, a.prefetch, a.cpu_memory, a.reader, not a.quiet)
    try:
        ids, decode = _prompt_ids(folder or store, a.prompt, model.config.vocab_size, a.batch_size)
        streamer = _Streamer(decode, skip=0 if model.config.is_encoder_decoder else 1)
        handle.reset_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                                 min_new_tokens=a.max_new_tokens, do_sample=False, streamer=streamer)
        total = time.perf_counter() - t0
        s = handle.stats()
        n = out.shape[1] - (0 if model.config.is_encoder_decoder else ids.shape[1])
        decode_s = (streamer.times[-1] - streamer.times[0]) / (len(streamer.times) - 1) if len(streamer.times) > 1 else total
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        gpu = f", peak GPU {format_bytes(torch.cuda.max_memory_allocated())}" if torch.cuda.is_available() else ""
        print(f"{n} tokens x batch {a.batch_size}: {decode_s:.3f} s/token (decode), {s.bytes_read / max(n, 1) / 1e9:.2f} GB "
              f"read/token, waited on I/O {s.wait_seconds / total:.0%} of {total:.1f} s, misses {s.misses}, "
              f"peak RSS {format_bytes(rss)}{gpu}")
    finally:
        handle.disable()
    return 0


def add_parsers(sub: Any) -> None:
    def mem(text: str) -> int:
        try:
            return parse_bytes(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    r = sub.add_parser("run", help="generate with a model bigger than memory (converts it first if needed)")
    r.add_argument("model", nargs="?", help="Hugging Face model folder or offload store")
    r.add_argument("--random", metavar="NAME", help=f"random weights of a real architecture: {', '.join(RANDOM_MODELS)}")
    r.add_argument("--prompt", default="The quick brown fox")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--gpu-memory", type=mem)
    r.add_argument("--cpu-memory", type=mem, help="RAM for weights: resident + staging ring + RAM tier "
                   "(default: free memory, container limit included, minus 1 GiB)")
    r.add_argument("--prefetch", type=int, default=2)
    r.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--reader", choices=READERS)
    r.add_argument("--dry-run", action="store_true", help="print the placement plan and stop")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=cmd_run)

    from .bench import add_parser
    add_parser(sub, mem)
