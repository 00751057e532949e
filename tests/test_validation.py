"""Store validation: every damaged or hostile store gets a specific exception naming the file and the fix.

Each test here fails if its protection is removed. The fuzz tests run a few thousand cases by default;
set OFFLOAD_FUZZ_EXAMPLES for a longer run.
"""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offload
from offload.integrity import read_safetensors_header
from offload.manifest import MANIFEST
from offload.store import Store
from conftest import forward_logits, inputs_for, make_model

FUZZ = int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "1500"))


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "store"
    offload.convert(make_model("bloom"), path, progress=False)
    return path


def copy_store(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def edit_manifest(path, fn):
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    (path / MANIFEST).write_text(json.dumps(m))


def test_missing_manifest(good_store, tmp_path):
    s = copy_store(good_store, tmp_path / "s")
    (s / MANIFEST).unlink()
    with pytest.raises(offload.StoreError, match="manifest.json is missing.*offload convert"):
        Store.open(s)


def test_newer_format_version(good_store, tmp_path):
    s = copy_store(good_store, tmp_path / "s")
    edit_manifest(s, lambda m: m.update(version=99))
    with pytest.raises(offload.StoreError, match="format version 99.*upgrade offload"):
        Store.open(s)


def test_corrupted_safetensors_header(good_store, tmp_path):
    s = copy_store(good_store, tmp_path / "s")
    victim = sorted(s.glob("00001.*"))[0]
    raw = bytearray(victim.read_bytes())
    raw[10:14] = b"\xff\xfe{{"
    victim.write_bytes(bytes(raw))
    with pytest.raises(offload.StoreError, match=f"{victim.name}.*not valid JSON"):
        Store.open(s)


def test_header_entry_differs_from_manifest(good_store, tmp_path):
    s = copy_store(good_store, tmp_path / "s")
    edit_manifest(s, lambda m: m["units"][2]["tensors"][0].update(name="renamed.weight"))
    with pytest.raises(offload.StoreError, match="header entry for renamed.weight differs"):
        Store.open(s)


@pytest.mark.parametrize("prefetch,tier", [(1, 0), (2, None)])
def test_damaged_unit_is_a_named_error_on_first_read(good_store, tmp_path, prefetch, tier, no_thread_leak):
    """One flipped bit of tensor data (sizes and header intact): the first read of that unit fails its CRC
    and the forward raises ChecksumError naming the file and the unit; verify=False would compute with it."""
    s = copy_store(good_store, tmp_path / "s")
    victim = sorted(s.glob("00003.*"))[0]
    raw = bytearray(victim.read_bytes())
    raw[4096 + 5] ^= 0x01
    victim.write_bytes(bytes(raw))
    model = make_model("bloom")
    inputs = inputs_for("bloom")
    expected = forward_logits(model, "bloom", inputs)
    Store.open(s)  # cheap validation cannot see it
    try:
        h = offload.enable(model, prefetch=prefetch, ram_tier=tier, store=s, progress=False)
    except offload.ChecksumError as e:  # the RAM tier reads every unit at enable time
        assert tier is None and victim.name in str(e) and "transformer.h.3" in str(e)
        assert getattr(model, "_offload_handle", None) is None
        return
    with pytest.raises(offload.ChecksumError, match=f"{victim.name}: unit transformer.h.3 is damaged"):
        forward_logits(model, "bloom", inputs)
    assert h.stats().verified_units >= 3
    with pytest.raises(offload.ChecksumError, match="cannot be restored"):
        h.disable()
    model = make_model("bloom")
    with offload.enable(model, prefetch=prefetch, ram_tier=0, store=s, verify=False, progress=False):
        assert not torch.equal(forward_logits(model, "bloom", inputs), expected)  # what verify protects from
        with pytest.raises(offload.ChecksumError, match=f"cannot be restored: .*{victim.name}"):
            offload.disable(model)  # the store holds the only copy: a damaged unit is not put back silently


def test_shape_and_dtype_mismatch_named(good_store, tmp_path):
    model = make_model("bloom").to(torch.bfloat16)
    with pytest.raises(offload.StoreMismatchError, match="tensor .* store has torch.float32 .* model has torch.bfloat16"):
        offload.enable(model, ram_tier=0, store=good_store, progress=False)
    import transformers as tf
    torch.manual_seed(0)
    wider = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=256, hidden_size=128, n_layer=4, n_head=4)).eval()
    with pytest.raises(offload.StoreMismatchError, match=r"store has torch.float32 \[.*\], model has torch.float32 \["):
        offload.enable(wider, ram_tier=0, store=good_store, progress=False)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x", "a\\b", ""])
def test_manifest_paths_outside_store_refused(good_store, tmp_path, name):
    s = copy_store(good_store, tmp_path / "s")
    edit_manifest(s, lambda m: m["units"][0].update(file=name))
    with pytest.raises(offload.StoreError, match="outside the store folder"):
        Store.open(s)


def test_symlink_out_of_store_refused(good_store, tmp_path):
    s = copy_store(good_store, tmp_path / "s")
    victim = sorted(s.glob("00000.*"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    victim.rename(outside)
    victim.symlink_to(outside)
    with pytest.raises(offload.StoreError, match="link that leaves the store folder"):
        Store.open(s)


# ------------------------------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["name", "file", "file_bytes", "data_offset", "data_bytes", "crc32", "tensors"]),
       tensor_field=st.sampled_from([None, "name", "dtype", "shape", "offset", "nbytes"]), value=json_values)
def test_fuzz_manifest_fields(good_store, tmp_path_factory, field, tensor_field, value):
    s = tmp_path_factory.mktemp("fz") / "s"
    copy_store(good_store, s)

    def mutate(m):
        unit = m["units"][1]
        if tensor_field is None:
            unit[field] = value
        else:
            unit["tensors"][0][tensor_field] = value
    edit_manifest(s, mutate)
    try:
        Store.open(s)
    except offload.StoreError:
        pass


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values)
def test_fuzz_whole_manifest(tmp_path_factory, doc):
    s = tmp_path_factory.mktemp("fzm")
    (s / MANIFEST).write_text(json.dumps({"format": "offload-store", "version": 1, "units": doc})
                              if isinstance(doc, list) else json.dumps(doc))
    try:
        Store.open(s)
    except offload.StoreError:
        pass


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(declared=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 64)), body=st.binary(max_size=200))
def test_fuzz_safetensors_header(tmp_path_factory, declared, body):
    """Any bytes, any declared header size (2**64-1 included): a StoreError, never a crash or a giant allocation."""
    f = tmp_path_factory.mktemp("fzh") / "x.safetensors"
    f.write_bytes(struct.pack("<Q", declared) + body)
    try:
        header, data_offset = read_safetensors_header(str(f))
        assert isinstance(header, dict) and data_offset == 8 + declared
    except offload.StoreError:
        pass
