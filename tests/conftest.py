"""Tiny random-weight models of the real architectures, built from configs (no hub needed)."""
from __future__ import annotations

import os
import threading

import pytest
import torch

ARCHS = ["bloom", "opt", "gptneox", "t5"]


def make_config(arch: str):
    import transformers as tf
    if arch == "bloom":
        return tf.BloomConfig(vocab_size=256, hidden_size=64, n_layer=4, n_head=4)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, ffn_dim=128, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=64)
    if arch == "gptneox":
        return tf.GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=128)
    if arch == "t5":
        return tf.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3,
                           num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = make_config(arch)
    cls = tf.T5ForConditionalGeneration if arch == "t5" else tf.AutoModelForCausalLM
    model = cls(cfg) if arch == "t5" else cls.from_config(cfg)
    return model.eval()


def moe_config(arch: str, layers: int = 3, hidden: int = 64):
    """Tiny mixture-of-experts configs (and Llama beside them) as Transformers 5 builds them."""
    import transformers as tf
    common = dict(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=hidden * 3 // 2, max_position_embeddings=128)
    small = hidden // 2
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, moe_intermediate_size=small, num_experts=16, num_experts_per_tok=2,
                                 head_dim=hidden // 4)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=16, num_experts_per_tok=2)
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**common, moe_intermediate_size=small, n_routed_experts=16, num_experts_per_tok=2,
                                   n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                                   qk_rope_head_dim=hidden // 8, qk_nope_head_dim=hidden // 8, v_head_dim=hidden // 4,
                                   n_group=2, topk_group=1)
    if arch == "gpt_oss":
        return tf.GptOssConfig(**common, num_local_experts=8, num_experts_per_tok=2, head_dim=hidden // 4,
                               layer_types=["full_attention"] * layers)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    raise ValueError(arch)


def block_device_map(model, disk_blocks) -> dict[str, str]:
    """Every module on "cpu" except the named blocks, which go to "disk"."""
    from offload.plan import disk_device_map
    return disk_device_map(model, disk_blocks)


def inputs_for(arch: str, batch: int = 1, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 256, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def forward_logits(model, arch: str, inputs) -> torch.Tensor:
    with torch.no_grad():
        if arch == "t5":
            dec = torch.zeros((inputs["input_ids"].shape[0], 3), dtype=torch.long, device=inputs["input_ids"].device)
            return model(**inputs, decoder_input_ids=dec).logits
        return model(**inputs).logits


def greedy(model, inputs, n: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def greedy_counting(model, handle, ids, n: int) -> tuple[torch.Tensor, int]:
    """Greedy tokens and the bytes the handle read for them alone (reads left from before are drained)."""
    with torch.no_grad():
        handle._prefetcher.wait_idle()
        handle.reset_stats()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        handle._prefetcher.wait_idle()
    return out, handle.stats().bytes_read


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def no_thread_leak():
    """Fail if a test leaves an offload reader thread running."""
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("offload-")]
    assert not left, f"threads left running: {left}"


def offload_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("offload-")]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
