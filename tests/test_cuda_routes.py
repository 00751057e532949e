"""The user routes beside test_cuda.py's, on a real CUDA device: a folder through ``offload.load`` in
fp32 and fp16 with each reader, ``prefetch="auto"`` (disk and PCIe measured), int8/int4 units,
a mixture of experts (routed experts copied to a device table, and kept in its GPU tier), speculative decoding and the
continuous-batching engine. Each compares with the same model computed on the GPU without offload.

Runs only where CUDA exists; skipped (not failed) elsewhere. The CPU tests cover the same routes; these
exist because the CUDA stager, its events and the device-side binding only run here.
"""
from __future__ import annotations

import os

import pytest
import torch

import offload
from conftest import moe_config

# OFFLOAD_TEST_ROUTES_DEVICE=cpu runs the same file on the CPU: a check of the tests themselves
DEV = os.environ.get("OFFLOAD_TEST_ROUTES_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
IDS = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])
NEW = 8


def _folder(tmp_path, arch: str = "llama", dtype: torch.dtype = torch.float32, hidden: int = 64) -> str:
    import transformers as tf
    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             initializer_range=0.5)
    elif arch == "bloom":
        cfg = tf.BloomConfig(vocab_size=256, hidden_size=64, n_layer=4, n_head=4, initializer_range=0.5)
    else:
        cfg = moe_config(arch, layers=4, hidden=128)
    folder = tmp_path / f"{arch}-{str(dtype).split('.')[-1]}"
    tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval().save_pretrained(folder)
    return str(folder)


def _reference(folder: str, dtype: torch.dtype = torch.float32):
    import transformers as tf
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(DEV).eval()


def _run(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = IDS.to(DEV)
    with torch.no_grad():
        return (model(ids).logits,
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False))


@pytest.mark.parametrize("reader", ["native", "python"])
@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("bloom", torch.float16)])
def test_folder_on_cuda_is_the_model_on_the_gpu(arch, dtype, reader, tmp_path, no_thread_leak):
    folder = _folder(tmp_path, arch, dtype)
    want_logits, want_tokens = _run(_reference(folder, dtype))
    model, h = offload.load(folder, prefetch=2, device=DEV, ram_tier=0, gpu_tier=0, reader=reader,
                            dtype=dtype, progress=False)
    with h:
        assert DEV == "cpu" or all(type(hk.stager).__name__ == "CudaStager" for hk in h._hooks)
        logits, tokens = _run(model)
        assert logits.device.type == torch.device(DEV).type
        assert torch.equal(logits, want_logits)
        assert torch.equal(tokens, want_tokens)
        assert h.stats().bytes_read > 0


def test_prefetch_auto_on_cuda_measures_pcie_and_predicts(tmp_path, no_thread_leak):
    folder = _folder(tmp_path, hidden=1024)  # 4 x 12 MiB x 4 B blocks: above tune.MIN_STREAMED_BYTES
    want_logits, want_tokens = _run(_reference(folder))
    model, h = offload.load(folder, device=DEV, ram_tier=0, gpu_tier=0, progress=False)  # prefetch="auto"
    with h:
        logits, tokens = _run(model)
        assert torch.equal(logits, want_logits) and torch.equal(tokens, want_tokens)
        assert h.stats().passes >= NEW
        pred = h.predict(1)
        assert pred is not None, h.why_no_prediction
        assert pred.bound in ("disk", "compute", "pcie") and pred.s_per_pass > 0
        assert DEV == "cpu" or pred.copy_s > 0  # PCIe measured and modelled on CUDA


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_units_on_cuda_follow_the_quantized_model(scheme, tmp_path, monkeypatch, no_thread_leak):
    """Quantized units on CUDA dequantize a few rows at a time and multiply in the activations' dtype.
    The reference is the same store on the CPU through that same arithmetic (``_cpu_kernels`` off): the
    CPU's int4 kernel rounds activations to bf16, which moves fp32 logits by ~0.1 (seen on the first
    GPU run), so it is not the reference. Logits agree to rounding, tokens exactly."""
    pytest.importorskip("torchao")
    from offload.quant import tensor as qt
    folder = _folder(tmp_path)
    cpu_model, cpu_h = offload.load(folder, prefetch=1, ram_tier=0, quantize=scheme, progress=False)
    with cpu_h, torch.no_grad(), monkeypatch.context() as m:
        m.setattr(qt, "_cpu_kernels", lambda w: False)
        want_logits = cpu_model(IDS).logits
        want_tokens = cpu_model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=NEW,
                                         min_new_tokens=NEW, do_sample=False)
    model, h = offload.load(folder, prefetch=2, device=DEV, ram_tier=0, gpu_tier=0, quantize=scheme,
                            progress=False)
    with h:
        if DEV == "cpu":
            monkeypatch.setattr(qt, "_cpu_kernels", lambda w: False)
        logits, tokens = _run(model)
        torch.testing.assert_close(logits.cpu(), want_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens.cpu(), want_tokens)


def test_moe_on_cuda_copies_only_the_routed_experts_to_the_device(tmp_path, no_thread_leak):
    folder = _folder(tmp_path, "qwen3_moe")
    want_logits, want_tokens = _run(_reference(folder))
    model, h = offload.load(folder, prefetch=2, device=DEV, ram_tier=0, gpu_tier=0, progress=False)
    with h:
        logits, tokens = _run(model)
        assert torch.equal(logits, want_logits) and torch.equal(tokens, want_tokens)
        stager = next(st for st in h._stagers if hasattr(st, "tables"))
        if DEV != "cpu":
            assert stager.device is not None and 0 < stager.device.bytes_copied
            assert h.stats().expert_bytes_read > 0


def test_moe_on_cuda_keeps_experts_in_the_gpu_tier(tmp_path, no_thread_leak):
    """A GPU tier one byte short of whole blocks: blocks stream without their experts, and the room beside
    them keeps routed experts on the device; a second run takes them from there, with the same results."""
    folder = _folder(tmp_path, "qwen3_moe")
    ref = _reference(folder)
    want_logits, want_tokens = _run(ref)
    blocks = sum(p.numel() * p.element_size() for p in ref.model.layers.parameters())
    model, h = offload.load(folder, prefetch=2, device=DEV, ram_tier=0, gpu_tier=blocks - 1, progress=False)
    with h:
        for _ in range(2):
            logits, tokens = _run(model)
            assert torch.equal(logits, want_logits) and torch.equal(tokens, want_tokens)
        if DEV != "cpu":
            assert next(st for st in h._stagers if hasattr(st, "tables")).device.tier.slots > 0
            assert h.stats().expert_gpu_hits > 0


def test_speculative_ngram_on_cuda_gives_plain_greedy(tmp_path, no_thread_leak):
    from offload import speculate
    folder = _folder(tmp_path)
    ref = _reference(folder)
    ids = IDS.to(DEV)
    model, h = offload.load(folder, prefetch=2, device=DEV, ram_tier=0, gpu_tier=0, progress=False)
    with h, torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                            do_sample=False)
        out, st = speculate.generate(model, ids, speculate="ngram", max_new_tokens=16, min_new_tokens=16,
                                     handle=h)
        assert torch.equal(out, want)
        assert st.target_passes > 0


def test_engine_batches_on_cuda_like_one_prompt_at_a_time(tmp_path, no_thread_leak):
    from offload.engine import generate_many
    folder = _folder(tmp_path)
    ref = _reference(folder)
    prompts = [[3, 17, 42, 9], [120, 77, 5, 61, 8, 200], [11, 12]]
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=DEV)
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                               do_sample=False)
            want.append(out[0, len(p):].tolist())
    model, h = offload.load(folder, prefetch=2, device=DEV, ram_tier=0, gpu_tier=0, progress=False)
    with h:
        done = sorted(generate_many(model, None, prompts, batch_size=3, max_new_tokens=6,
                                      ignore_eos=True), key=lambda r: r.index)
        assert [r.token_ids for r in done] == want
