"""A Transformers model with no weights: the model of a config or a checkpoint folder, built on meta.

``offload.load`` fills one from a store; converting, reading a checkpoint in place and sizing a draft
use one for its names and shapes. It imports nothing of offload, so any module may use it.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def build_on_meta(config: Any, dtype: torch.dtype) -> nn.Module:
    """The Transformers model of ``config`` (a config, or a folder with config.json and maybe
    generation_config.json), parameters on meta, buffers real: nothing the size of the weights."""
    import transformers as tf
    from accelerate import init_empty_weights
    folder = None
    if isinstance(config, (str, os.PathLike)):
        folder = os.fspath(config)
        config = tf.AutoConfig.from_pretrained(folder)
    # The folder's own class (config.json's ``architectures``: a Whisper, ViT or BertForMaskedLM folder is
    # that model, not a causal LM), else the generic causal / seq2seq LM of the config.
    named = [getattr(tf, a, None) for a in (getattr(config, "architectures", None) or [])]
    own = next((c for c in named if isinstance(c, type) and hasattr(c, "_from_config")), None)
    cls = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = own._from_config(config, dtype=dtype) if own is not None else cls.from_config(config, dtype=dtype)
    model.tie_weights()
    if folder is not None and os.path.exists(os.path.join(folder, "generation_config.json")):
        model.generation_config = tf.GenerationConfig.from_pretrained(folder)
    return model.eval()
