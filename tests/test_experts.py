"""Issue 20: a mixture-of-experts block reads only the experts its router picks.

Exactness is against the model in memory (``from_pretrained`` of the same folder, or the module
itself); the routing is counted by a hook of the test's own on the experts modules.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers as tf

import offload
from conftest import moe_config
from offload.experts import experts_modules

IDS = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])


ARCHS = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"] + (["gpt_oss"] if hasattr(tf, "GptOssConfig") else [])


def make(arch: str, folder=None, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(moe_config(arch, layers=6, hidden=128)).eval()
    if folder is None:
        return model
    model.save_pretrained(folder)
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def count_routing(model) -> tuple[list, list]:
    """Per experts forward: (its module, the distinct experts routed); the hook is the test's own."""
    seen: list = []
    handles = []
    for m in model.modules():
        if any(name == "" for name, _, _ in experts_modules(m)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: seen.append((mod, sorted({int(x) for x in args[1].flatten().tolist()
                                                            if 0 <= int(x) < mod.num_experts})))))
    return seen, handles


def decode_step(model, h=None) -> tuple[list, torch.Tensor]:
    """The prompt, then one decode step with the routing counted (and the handle's stats reset between)."""
    cache = tf.DynamicCache(config=model.config)
    nxt = model(IDS, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    if h is not None:
        h.prefetcher.wait_idle()
        h.reset_stats()
    seen, hooks = count_routing(model)
    logits = model(nxt, past_key_values=cache, use_cache=True).logits
    if h is not None:
        h.prefetcher.wait_idle()
    for x in hooks:
        x.remove()
    return seen, logits


def expert_bytes(module) -> int:
    return sum(p.numel() * p.element_size() // module.num_experts for p in module.parameters(recurse=False))


def dense_bytes(model) -> int:
    """Bytes of the blocks without their routed experts' tensors."""
    blocks = model.model.layers
    experts = {id(p) for b in blocks for _, m, _ in experts_modules(b) for p in m.parameters(recurse=False)}
    return sum(p.numel() * p.element_size() for b in blocks for p in b.parameters() if id(p) not in experts)


@pytest.mark.parametrize("arch", ARCHS)
def test_routed_experts_from_a_folder_are_exact_and_read_only_what_is_routed(arch, tmp_path, no_thread_leak):
    ref = make(arch, tmp_path / arch)
    model, h = offload.load(tmp_path / arch, prefetch=1, ram_tier=0, progress=False, predict_experts=False)
    try:
        assert h.experts is not None, "the experts modules were not found"
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            assert torch.equal(model.generate(IDS, max_new_tokens=6, do_sample=False),
                               ref.generate(IDS, max_new_tokens=6, do_sample=False))
            seen, _ = decode_step(model, h)  # every block streamed, no expert cached
        routed = sum(len(experts) * expert_bytes(m) for m, experts in seen)
        stats = h.stats()
        assert seen and stats.expert_bytes_read == routed  # exactly the routed experts, each once
        assert stats.bytes_read <= 1.2 * (dense_bytes(model) + routed), (stats.bytes_read, dense_bytes(model), routed)
    finally:
        h.disable()


def test_in_memory_enable_is_exact_and_the_cache_serves_repeats(tmp_path, no_thread_leak):
    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, cpu_memory="64MiB", store=tmp_path / "s", progress=False) as h:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            first = h.stats()
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
        again = h.stats()
        assert first.expert_misses > 0 and again.expert_misses == first.expert_misses  # all from the cache
        # a store's expert tensors are one range each: every expert is read as whole pages (O_DIRECT)
        tables = next(st for st in h.stagers if hasattr(st, "tables")).tables.values()
        reads = [x for t in tables for rec in t.group.experts for x in rec.extents]
        assert reads and all(x.offset % 4096 == 0 and x.into % 4096 == 0 for x in reads)
        assert again.expert_hits > first.expert_hits and again.expert_cache_bytes > 0
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), f"{name} changed after disable()"


def test_prefill_reads_each_routed_expert_once(tmp_path, no_thread_leak):
    model = make("olmoe")
    ids = torch.randint(0, 256, (2, 40))
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        seen, hooks = count_routing(model)
        with torch.no_grad():
            model(ids)
        h.prefetcher.wait_idle()
        assert h.stats().expert_misses == sum(len(e) for _, e in seen)


def test_whole_blocks_when_asked_or_when_routed_reads_cannot_serve(tmp_path, caplog, no_thread_leak):
    model = make("mixtral")
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False,
                        routed_experts=False) as h:
        assert h.experts is None
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    pytest.importorskip("torchao")
    with caplog.at_level(logging.INFO, logger="offload"):
        with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "q", progress=False, quantize="int8") as h:
            assert h.experts is None
    assert any("reading whole blocks" in r.message for r in caplog.records)


def test_predicted_experts_are_either_used_or_counted_as_wasted(tmp_path, no_thread_leak):
    """With prediction on, every expert read is one the step routed to or a prediction
    that missed, and the predictions that hit are served without a demand read; outputs stay exact."""
    ref = make("qwen3_moe", tmp_path / "q")
    model, h = offload.load(tmp_path / "q", prefetch=1, ram_tier=0, progress=False, predict_experts=True)
    try:
        with torch.no_grad():
            seen, got = decode_step(model, h)
            assert torch.equal(got, decode_step(ref)[1])
        s = h.stats()
        routed = sum(len(experts) * expert_bytes(m) for m, experts in seen)
        wasted = s.expert_predicted_bytes - s.expert_predicted_used_bytes
        assert s.expert_predicted_bytes > 0 and s.expert_predicted_used_bytes > 0
        assert s.expert_bytes_read == routed + wasted
    finally:
        h.disable()


def test_a_dispatched_moe_model_reads_routed_experts_where_accelerate_put_them(tmp_path, no_thread_leak):
    """from_pretrained(device_map=blocks on "disk", offload_folder=...) then enable(): exact, experts read on
    routing, from the files Accelerate's index names (no copy)."""
    from conftest import block_device_map
    ref = make("qwen3_moe", tmp_path / "q")
    disk = [f"model.layers.{i}" for i in range(len(ref.model.layers))]
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=block_device_map(ref, disk),
                                                    offload_folder=str(tmp_path / "off")).eval()
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        assert h.experts is not None and all(u.extents for u in h.store.units)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False),
                               ref.generate(IDS, max_new_tokens=4, do_sample=False))
        assert h.stats().expert_misses > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_offload_run_folder_prints_the_greedy_tokens_of_the_model_in_memory(arch, tmp_path, capsys):
    """``offload run FOLDER`` on a mixture of experts: routed experts, read in place, the same greedy ids."""
    from offload.cli import main
    ref = make(arch, tmp_path / arch)
    assert main(["run", str(tmp_path / arch), "--prompt", "hello", "--max-new-tokens", "6", "-q"]) == 0
    out = capsys.readouterr().out
    ids = torch.tensor([list(b"hello")])
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    printed = next(line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()
                   and len(line.split()) == 6)
    assert [int(x) for x in printed.split()] == want
