"""The random-model zoo: real architectures' shapes with random weights, so nothing is downloaded.

``--random bloom-7b1`` is written once to the cache as a normal Hugging Face folder, shard by shard;
the bytes, shapes and compute are those of the real model, only the values differ.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import torch

log = logging.getLogger("offload")

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
    # Mixtures of experts (per token a layer reads num_experts_per_tok of its experts; offload reads only those)
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False)),
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6,
                                     tie_word_embeddings=False)),
    "olmoe-1b-7b": ("olmoe", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                                  max_position_embeddings=4096, tie_word_embeddings=False)),
    "tiny-qwen3-moe": ("qwen3_moe", dict(vocab_size=1024, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         num_experts=16, num_experts_per_tok=2, tie_word_embeddings=False)),
}
_LAYERS = {"bloom": "n_layer", "gptj": "n_layer", "t5": "num_layers"}  # else num_hidden_layers
# The CLI's dtype names; the store's manifest records the torch name ("bfloat16").
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_TAGS = {v: k for k, v in DTYPES.items()}


def dtype_tag(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"`` (the ``--dtype`` spelling); other dtypes by their torch name."""
    return DTYPE_TAGS.get(dtype, str(dtype).removeprefix("torch."))


def _split(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:LAYERS`` (the first LAYERS blocks only, so a big model's shapes fit a small disk)."""
    name, _, layers = text.partition(":")
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(RANDOM_MODELS)} (NAME:LAYERS keeps the "
                         f"first LAYERS blocks, e.g. qwen3-30b-a3b:4)")
    if not layers:
        return name, None
    if not layers.isdigit() or int(layers) < 1:
        raise ValueError(f"{text!r}: after ':' give how many blocks to keep, e.g. {name}:4")
    return name, int(layers)


def random_name(text: str) -> str:
    """``--random NAME`` or ``NAME:LAYERS``, checked as it is parsed (an argparse type)."""
    try:
        _split(text)
    except ValueError as e:
        import argparse
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def config_for(name: str) -> Any:
    """The transformers config of a ``--random`` model."""
    import transformers as tf
    base, layers = _split(name)
    family, kw = RANDOM_MODELS[base]
    cls = {"bloom": tf.BloomConfig, "opt": tf.OPTConfig, "gpt_neox": tf.GPTNeoXConfig, "gptj": tf.GPTJConfig,
           "t5": tf.T5Config, "qwen3_moe": tf.Qwen3MoeConfig, "mixtral": tf.MixtralConfig,
           "olmoe": tf.OlmoeConfig}[family]
    if layers is not None:
        key = _LAYERS.get(family, "num_hidden_layers")
        kw = dict(kw, **{key: min(layers, kw[key])})
        if family == "t5":
            kw["num_decoder_layers"] = kw[key]
    return cls(**kw)


def model_class(config: Any) -> Any:
    import transformers as tf
    return tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM


def meta_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The model of a config (or a folder's config.json): parameters on meta, (non-persistent) buffers real."""
    from ..meta import build_on_meta
    return build_on_meta(config, dtype)


def random_complete(folder: str) -> bool:
    """Whether ``folder`` holds a finished random checkpoint (its index is written last)."""
    return os.path.exists(os.path.join(folder, "model.safetensors.index.json"))


def _random_params(name: str, dtype: torch.dtype) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """The config of ``name`` and the (meta) tensors its checkpoint holds (a tied head is not written)."""
    config = config_for(name)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    return config, [(k, p) for k, p in meta_model(config, dtype).state_dict().items() if k not in tied]


HEADERS_BYTES = 1 << 20  # room for the shards' headers, the index and config.json


def random_checkpoint_bytes(name: str, dtype: torch.dtype) -> int:
    """Bytes ``random_checkpoint`` writes for ``name`` in ``dtype`` (tensors + HEADERS_BYTES)."""
    return sum(p.numel() * p.element_size() for _, p in _random_params(name, dtype)[1]) + HEADERS_BYTES


def random_checkpoint(name: str, dtype: torch.dtype, folder: str, progress: bool = True,
                      shard_bytes: int = 2 << 30) -> str:
    """Write a random-weight HF checkpoint of architecture ``name`` (once; reused if complete; one writer at a
    time, under the same lock as a store's build). A checkpoint the disk cannot hold is refused before
    anything is written (``OffloadError`` naming both sizes)."""
    from ..convert import _build_lock
    if random_complete(folder):
        return folder
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else log.info  # noqa: E731
    with _build_lock(folder, say):  # two processes writing it at once removed each other's .partial
        if not random_complete(folder):  # the other process wrote it while this one waited
            _write_random(name, dtype, folder, progress, shard_bytes)
    return folder


def _write_random(name: str, dtype: torch.dtype, folder: str, progress: bool, shard_bytes: int) -> None:
    from safetensors.torch import save_file

    from .._memory import ensure_free_space
    from ..writer import _progress
    config, params = _random_params(name, dtype)
    total = sum(p.numel() * p.element_size() for _, p in params)
    ensure_free_space(folder, total + HEADERS_BYTES, f"the random {name} checkpoint {folder}")
    os.makedirs(folder, exist_ok=True)
    tmp = folder + ".partial"
    os.makedirs(tmp, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0
    bar = _progress(total, f"writing random {name}", progress)

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
        json.dump({"metadata": {"total_size": total},
                   "weight_map": weight_map}, f)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(tmp)
    # The index is what marks the folder complete: it moves last.
    for fname in sorted(os.listdir(tmp), key=lambda n: n == "model.safetensors.index.json"):
        os.replace(os.path.join(tmp, fname), os.path.join(folder, fname))
    os.rmdir(tmp)
