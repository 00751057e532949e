"""``torch.compile`` of an enabled model: each unit's hooks run eagerly (a graph break), its forward compiled.

Without ``hooks.eagerly`` dynamo traces into the pre-hook, meets the streamed weights' stand-ins (no storage)
and fails inside torch (``Expected meta != nullptr``). Inductor on the CPU needs a C++ compiler: skipped
without one.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

import offload
from offload.errors import OffloadError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


def _llama(layers: int = 3) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def test_compiled_streamed_model_matches_the_compiled_model_in_memory():
    torch._dynamo.reset()
    model = _llama()
    reference = copy.deepcopy(model)
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.compile(reference)(x).logits
    handle = offload.enable(model, prefetch=1, ram_tier=0, progress=False, tune=False)
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            for _ in range(2):  # the second call runs the cached graphs, with the ring's other slots
                assert torch.equal(compiled(x).logits, want)
        stats = handle.stats()
        assert stats.streamed_units == 3 and stats.bytes_read >= 2 * stats.ring_bytes > 0
    finally:
        offload.disable(model)
        torch._dynamo.reset()


def test_compiled_moe_reads_routed_experts_and_generates_the_same_tokens():
    """The experts modules' hooks (read on routing) under compile: close to eager (the graph breaks around the
    experts move inductor's fusions), the same greedy tokens, and only routed experts read."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=256)
    model = Qwen3MoeForCausalLM(cfg).eval()
    reference = copy.deepcopy(model)
    x = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(x).logits
        want_tokens = reference.generate(x, max_new_tokens=3, do_sample=False)
    handle = offload.enable(model, prefetch=1, ram_tier=0, progress=False, tune=False)
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x).logits, want, rtol=0, atol=1e-5)
            assert torch.equal(compiled.generate(x, max_new_tokens=3, do_sample=False), want_tokens)
        stats = handle.stats()
        assert stats.expert_bytes_read > 0 and stats.expert_misses > 0
    finally:
        offload.disable(model)
        torch._dynamo.reset()


def test_compile_is_refused_where_units_compute_on_a_gpu(monkeypatch):
    """CUDA graphs would replay the first forward's slot addresses: refused, nothing bound (the check runs
    before the pre-hook, here with the stager's device faked)."""
    torch._dynamo.reset()
    model = _llama(2)
    x = torch.randint(0, 256, (1, 4))
    handle = offload.enable(model, prefetch=1, ram_tier=0, progress=False, tune=False)
    try:
        hooks = [h for h in handle._hooks]
        for h in hooks:
            monkeypatch.setattr(h.stager, "device", torch.device("cuda", 0), raising=False)
        with pytest.raises(OffloadError, match="torch.compile .* compute on cuda:0"), torch.no_grad():
            torch.compile(model)(x)
        assert not any(h.bound for h in hooks)
        monkeypatch.undo()
        with torch.no_grad():  # and the model still runs uncompiled
            model(x)
    finally:
        offload.disable(model)
        torch._dynamo.reset()
