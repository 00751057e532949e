"""Quantized units: int8/int4 linear weights in the store, streamed with prefetch, bit-exact against the
same quantized model in memory (not against fp32: quantization changes the numbers, not the runtime)."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import offload
from offload.quant import QuantizedWeight, is_quantizable, is_transposed_linear
from offload.store import Store
from conftest import greedy_counting

pytest.importorskip("torchao")  # the quantization arithmetic (offload[quant])
GROUP = 32


def tiny(arch: str):
    import transformers as tf
    torch.manual_seed(0)
    if arch == "bloom":
        cfg = tf.BloomConfig(vocab_size=256, hidden_size=64, n_layer=3, n_head=4)
    elif arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = tf.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=64)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def quantized_in_memory(model, units, scheme):
    """The reference: the same model with its blocks' linear weights replaced by QuantizedWeight, in RAM."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        w = mod._parameters.get("weight")
        if any(name.startswith(u + ".") for u in units) and w is not None and \
                is_quantizable(name, "weight", w, mod, scheme=scheme, group_size=GROUP):
            mod._parameters["weight"] = QuantizedWeight.from_float(w.detach(), scheme, GROUP,
                                                                   transposed=is_transposed_linear(mod))
    return ref


def run(model, ids):
    with torch.no_grad():
        return model(ids).logits, model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["bloom", "llama", "opt"])
def test_quantized_store_generates_like_the_quantized_model_in_memory(arch, scheme, tmp_path, no_thread_leak):
    model = tiny(arch)
    model.save_pretrained(tmp_path / "ckpt")
    st = offload.convert(tmp_path / "ckpt", tmp_path / "store", quantize=scheme, group_size=GROUP, progress=False)
    ref = quantized_in_memory(model, [u.name for u in st.units], scheme)
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    want_logits, want_tokens = run(ref, ids)
    m, h = offload.load(tmp_path / "store", prefetch=1, ram_tier=0, progress=False)
    with h:
        with torch.no_grad():
            assert torch.equal(m(ids).logits, want_logits)
        tokens, bytes_read = greedy_counting(m, h, ids, 12)
        assert torch.equal(tokens, want_tokens)
        per_pass = sum(u.data_bytes for u in st.units)  # the quantized units, read once per forward
        assert 12 * per_pass <= bytes_read <= 13 * per_pass
        assert isinstance(m.get_submodule(f"{st.units[0].name}").get_submodule(
            st.units[0].quantized[0].name.rsplit(".", 1)[0]).weight, offload.hooks.Offloaded)
    plain = offload.convert(tmp_path / "ckpt", tmp_path / "plain", progress=False)
    ratio = sum(u.data_bytes for u in st.units) / sum(u.data_bytes for u in plain.units)
    assert ratio < (0.40 if scheme == "int8" else 0.30)  # fp32 tiny blocks: norms and biases stay fp32


def test_format_round_trips_and_stays_standard_safetensors(tmp_path):
    from safetensors import safe_open
    model = tiny("bloom")
    st = offload.convert(model, tmp_path / "s", quantize="int4", group_size=GROUP, progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "int4" and manifest["quantization"]["group_size"] == GROUP
    assert manifest["source"]["quantization"] == manifest["quantization"]
    again = Store.open(tmp_path / "s")
    unit = again.units[0]
    assert unit.quantized == st.units[0].quantized and unit.quantized
    names = {t.name for t in unit.tensors}
    q = unit.quantized[0]
    assert {f"{q.name}.qweight", f"{q.name}.scales_and_zeros"} <= names and q.name not in names
    # norms and biases are stored as they are
    assert {"input_layernorm.weight", "self_attention.dense.bias"} <= names
    with safe_open(str(again.file_path(unit)), framework="pt") as f:
        assert f.get_tensor(f"{q.name}.qweight").dtype == torch.uint8


def test_a_quantized_store_refuses_unquantized_use_and_the_reverse(tmp_path, no_thread_leak):
    model = tiny("opt")
    offload.convert(model, tmp_path / "q", quantize="int8", progress=False)
    offload.convert(model, tmp_path / "plain", progress=False)
    with pytest.raises(offload.StoreMismatchError, match="holds int8 units but unquantized ones.*quantize='int8'"):
        offload.enable(model, ram_tier=0, store=tmp_path / "q", progress=False)
    with pytest.raises(offload.StoreMismatchError, match="holds unquantized units but int8 ones.*without quantize="):
        offload.enable(model, ram_tier=0, store=tmp_path / "plain", quantize="int8", progress=False)
    with pytest.raises(offload.StoreMismatchError, match="holds int8 units but int4"):
        offload.enable(model, ram_tier=0, store=tmp_path / "q", quantize="int4", progress=False)
    with pytest.raises(offload.StoreMismatchError, match="not int4"):
        offload.load(tmp_path / "q", quantize="int4", progress=False)
    assert getattr(model, "_offload_handle", None) is None


def test_enable_quantize_on_a_live_model_and_disable_gives_it_back_dequantized(tmp_path, caplog, no_thread_leak):
    """Tied embeddings and every non-linear parameter stay as they are; disable() can only hand back the
    quantized values (the originals were freed), and says so."""
    model = tiny("bloom")
    units = [f"transformer.h.{i}" for i in range(3)]
    ref = quantized_in_memory(model, units, "int8")
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    want_logits, want_tokens = run(ref, ids)
    emb = model.transformer.word_embeddings.weight
    original = model.transformer.h[1].mlp.dense_h_to_4h.weight
    with caplog.at_level(logging.WARNING, logger="offload"):
        with offload.enable(model, prefetch=2, ram_tier=0, quantize="int8", store=tmp_path / "s", progress=False):
            logits, tokens = run(model, ids)
            assert original.untyped_storage().nbytes() == 0  # the float weights are freed, not kept beside
            assert model.lm_head.weight is emb  # the tie is untouched (resident)
        assert "dequantized" in caplog.text
    assert torch.equal(logits, want_logits) and torch.equal(tokens, want_tokens)
    w = model.transformer.h[1].mlp.dense_h_to_4h.weight
    assert type(w) is torch.nn.Parameter and w.shape == (256, 64)
    assert torch.equal(w, ref.transformer.h[1].mlp.dense_h_to_4h.weight.dequantize())
