"""Store format and conversion: aligned safetensors files, every source, streaming, atomic writes."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import offload
from offload.manifest import PAGE, TENSOR_ALIGN, TensorSpec
from offload.store import Store
from offload.writer import write_unit_file
from conftest import make_model


def test_unit_file_exact_bytes(tmp_path):
    """Pin the layout: header padded to 4096, tensors 256-aligned, explicit pad entries, data padded."""
    a = torch.arange(3, dtype=torch.float32)  # 12 bytes
    b = torch.tensor([7], dtype=torch.int16)  # 2 bytes
    rec = write_unit_file(str(tmp_path), "u.safetensors", "blk.0",
                          [TensorSpec("b", torch.int16, (1,)), TensorSpec("a", torch.float32, (3,))],
                          {"a": a, "b": b}.__getitem__)
    raw = (tmp_path / "u.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n == PAGE == rec.data_offset and len(raw) == 2 * PAGE == rec.file_bytes
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    assert header["__offload_pad_0__"] == {"dtype": "U8", "shape": [244], "data_offsets": [12, 256]}
    assert header["b"] == {"dtype": "I16", "shape": [1], "data_offsets": [256, 258]}
    assert header["__offload_pad_1__"]["data_offsets"] == [258, PAGE]
    assert raw[PAGE:PAGE + 12] == a.numpy().tobytes() and raw[PAGE + 256:PAGE + 258] == b.numpy().tobytes()
    assert raw[PAGE + 12:PAGE + 256] == bytes(244)
    with safe_open(str(tmp_path / "u.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)


def test_store_from_module_is_aligned_and_standard(tmp_path):
    model = make_model("opt")
    store = offload.convert(model, tmp_path / "s", progress=False)
    state = model.state_dict()
    assert len(store.units) == 4
    for u in store.units:
        path = store.file_path(u)
        assert u.data_offset % PAGE == 0 and os.path.getsize(path) % PAGE == 0
        with safe_open(path, "pt") as f:
            for t in u.tensors:
                assert t.offset % TENSOR_ALIGN == 0
                assert torch.equal(f.get_tensor(t.name), state[f"{u.name}.{t.name}"])
        store.verify_unit(u)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "offload-store" and manifest["version"] == 1 and manifest["source"]["fingerprint"]


def test_convert_sharded_hf_folder(tmp_path):
    model = make_model("bloom")
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    store = offload.convert(tmp_path / "ckpt", tmp_path / "s", progress=False)
    state = model.state_dict()
    assert [u.name for u in store.units] == [f"transformer.h.{i}" for i in range(4)]
    assert store.resident is not None and (tmp_path / "s" / "config.json").exists()
    for u in store.units + [store.resident]:
        prefix = "" if u is store.resident else u.name + "."
        with safe_open(store.file_path(u), "pt") as f:
            for t in u.tensors:
                assert torch.equal(f.get_tensor(t.name), state[prefix + t.name])
    bf16 = offload.convert(tmp_path / "ckpt", tmp_path / "s16", dtype="bf16", progress=False)
    assert {t.dtype for u in bf16.units for t in u.tensors} == {"BF16"}


def test_convert_accelerate_offload_folder(tmp_path):
    from accelerate.utils import offload_state_dict
    state = {"h.0.w": torch.randn(4, 8), "h.0.b": torch.randn(8).to(torch.bfloat16), "h.1.w": torch.randn(4, 8),
             "h.1.s": torch.tensor(3.0), "emb": torch.randn(2, 2)}
    offload_state_dict(str(tmp_path / "off"), state)
    store = offload.convert(tmp_path / "off", tmp_path / "s", progress=False)
    assert [u.name for u in store.units] == ["h.0", "h.1"]
    for u in store.units:
        with safe_open(store.file_path(u), "pt") as f:
            for t in u.tensors:
                assert torch.equal(f.get_tensor(t.name), state[f"{u.name}.{t.name}"])


def test_convert_refuses_non_store_folder_and_pickle(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(offload.StoreError, match="not empty and is not an offload store"):
        offload.convert(make_model("bloom"), tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    (tmp_path / "pkl").mkdir()
    torch.save({"h.0.w": torch.ones(2)}, tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(offload.CheckpointError, match="pickle"):
        offload.convert(tmp_path / "pkl", tmp_path / "s", progress=False)
    store = offload.convert(tmp_path / "pkl", tmp_path / "s", allow_pickle=True, progress=False)
    assert [u.name for u in store.units] == ["h.0"]


def test_interrupted_conversion_leaves_no_manifest_and_resumes(tmp_path, monkeypatch):
    import offload.writer as st
    model = make_model("bloom")
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    real = st.write_unit_file
    calls = []

    def failing(folder, file, name, *a, **k):
        calls.append(name)
        if name == "transformer.h.2":
            raise OSError(28, "No space left on device")
        return real(folder, file, name, *a, **k)

    monkeypatch.setattr(st, "write_unit_file", failing)
    with pytest.raises(OSError, match="No space"):
        offload.convert(tmp_path / "ckpt", tmp_path / "s", progress=False)
    left = os.listdir(tmp_path / "s")
    assert "manifest.json" not in left and not [x for x in left if ".tmp-" in x]
    with pytest.raises(offload.StoreError, match="interrupted"):
        Store.open(tmp_path / "s")
    monkeypatch.setattr(st, "write_unit_file", real)
    calls.clear()
    resumed = []
    monkeypatch.setattr(st, "write_unit_file", lambda folder, file, name, *a, **k: (resumed.append(name), real(folder, file, name, *a, **k))[1])
    store = offload.convert(tmp_path / "ckpt", tmp_path / "s", progress=False)
    assert "transformer.h.0" not in resumed and "transformer.h.2" in resumed  # finished units were kept
    for u in store.units:
        store.verify_unit(u)


def test_hf_conversion_streams(tmp_path):
    """Peak RSS of converting a 200 MB checkpoint stays near one unit, not the model."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=256, hidden_size=512, n_layer=16, n_head=8))
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    total = sum(p.numel() * 4 for p in model.parameters())
    unit = sum(p.numel() * 4 for p in model.transformer.h[0].parameters())
    del model
    code = (
        "import resource, sys, offload, safetensors, torch\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"offload.convert({str(tmp_path / 'ckpt')!r}, {str(tmp_path / 's')!r}, progress=False)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert total > 190e6
    assert growth < 3 * unit + 16e6, f"conversion grew RSS by {growth / 1e6:.0f} MB (unit {unit / 1e6:.0f} MB, model {total / 1e6:.0f} MB)"
