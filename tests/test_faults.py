"""Damaged stores and failing reads: a clear error naming the file, never a hang, no thread left behind."""
from __future__ import annotations

import os

import pytest
import torch

import offload
from conftest import forward_logits, inputs_for, make_model, offload_threads, open_fds


@pytest.fixture
def built_store(tmp_path):
    model = make_model("bloom")
    store = tmp_path / "store"
    offload.enable(model, cpu_memory=0, store=store, progress=False).disable()
    return model, store


def unit_files(store):
    return sorted(p for p in store.iterdir() if p.suffix == ".safetensors")


def test_truncated_unit_file_fails_at_enable(built_store, no_thread_leak):
    model, store = built_store
    victim = unit_files(store)[1]
    os.truncate(victim, victim.stat().st_size - 4096)
    with pytest.raises(offload.StoreError, match=f"{victim.name}.*4096 bytes shorter.*offload convert"):
        offload.enable(model, cpu_memory=0, store=store, progress=False)
    assert getattr(model, "_offload_handle", None) is None


def test_missing_unit_file_fails_at_enable(built_store, no_thread_leak):
    model, store = built_store
    victim = unit_files(store)[2]
    victim.unlink()
    with pytest.raises(offload.StoreError, match=f"{victim.name}.*missing"):
        offload.enable(model, cpu_memory=0, store=store, progress=False)


def test_longer_unit_file_fails_at_enable(built_store, no_thread_leak):
    model, store = built_store
    victim = unit_files(store)[0]
    with open(victim, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(offload.StoreError, match=f"{victim.name}.*10 bytes longer"):
        offload.enable(model, cpu_memory=0, store=store, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "unlink"])
def test_damage_after_enable_raises_in_forward_naming_the_file(built_store, damage, no_thread_leak):
    model, store = built_store
    inputs = inputs_for("bloom")
    fds_before = open_fds()
    h = offload.enable(model, prefetch=1, cpu_memory=0, store=store, progress=False)
    victim = unit_files(store)[2]
    saved = victim.read_bytes()
    if damage == "truncate":
        os.truncate(victim, 4096 + 100)
    else:
        victim.unlink()
    with pytest.raises(offload.UnitReadError, match=f"unit transformer.h.2 from .*{victim.name}"):
        forward_logits(model, "bloom", inputs)
    # documented: the handle stays usable; once the file is back, the next forward reads it again
    victim.write_bytes(saved)
    expected = make_model("bloom")
    assert torch.equal(forward_logits(model, "bloom", inputs), forward_logits(expected, "bloom", inputs))
    h.disable()
    assert offload_threads() == []
    assert open_fds() <= fds_before


def test_disable_twice_and_enable_twice(tmp_path, no_thread_leak):
    model = make_model("bloom")
    h = offload.enable(model, cpu_memory=0, store=tmp_path / "s", progress=False)
    with pytest.raises(offload.OffloadError, match="already enabled"):
        offload.enable(model, cpu_memory=0, progress=False)
    h.disable()
    h.disable()
    offload.disable(model)


def test_store_of_another_model_is_refused_not_rewritten(tmp_path, no_thread_leak):
    store = tmp_path / "s"
    offload.enable(make_model("bloom", seed=0), cpu_memory=0, store=store, progress=False).disable()
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    with pytest.raises(offload.StoreMismatchError, match="different weights"):
        offload.enable(make_model("bloom", seed=1), cpu_memory=0, store=store, progress=False)
    with pytest.raises(offload.StoreMismatchError, match="units missing"):
        offload.enable(make_model("opt"), cpu_memory=0, store=store, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before
