"""Differential tests: offloaded models give the same tokens and bit-identical logits as in memory."""
from __future__ import annotations

import pytest
import torch

import offload
from conftest import ARCHS, block_device_map, forward_logits, greedy, inputs_for, make_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefetch", [1, 2])
def test_plain_module_matches_in_memory(arch, prefetch, tmp_path, no_thread_leak):
    model = make_model(arch)
    inputs = inputs_for(arch)
    expected_logits = forward_logits(model, arch, inputs)
    expected_tokens = greedy(model, inputs)
    with offload.enable(model, prefetch=prefetch, ram_tier=0, store=tmp_path / "store", progress=False) as h:
        assert torch.equal(forward_logits(model, arch, inputs), expected_logits)
        assert torch.equal(greedy(model, inputs), expected_tokens)
        stats = h.stats()
        assert stats.streamed_units >= 4 and stats.ram_tier_units == 0
        assert stats.bytes_read > 0
    # disable gives the module its weights back
    assert torch.equal(forward_logits(model, arch, inputs), expected_logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_dispatched_to_disk_matches_in_memory(arch, tmp_path, no_thread_leak):
    import transformers as tf

    model = make_model(arch)
    inputs = inputs_for(arch)
    expected_logits = forward_logits(model, arch, inputs)
    expected_tokens = greedy(model, inputs)
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    units = [n for n, _ in offload.plan.find_units(model)]
    device_map = block_device_map(model, units)
    cls = tf.T5ForConditionalGeneration if arch == "t5" else tf.AutoModelForCausalLM
    dispatched = cls.from_pretrained(tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "off").eval()
    assert offload.plan.is_accelerate_offloaded(dispatched)
    with offload.enable(dispatched, prefetch=2, ram_tier=0, progress=False) as h:
        assert sorted(hk.record.name for hk in h._hooks) == sorted(units)
        assert h.stats().store == str(tmp_path / "off" / "offload-store")
        assert torch.equal(forward_logits(dispatched, arch, inputs), expected_logits)
        assert torch.equal(greedy(dispatched, inputs), expected_tokens)
        assert h.stats().bytes_read > 0
    # Accelerate's own offloading is back in charge after disable
    assert torch.equal(forward_logits(dispatched, arch, inputs), expected_logits)


def test_load_checkpoint_and_dispatch_dat_files(tmp_path, no_thread_leak):
    """Accelerate's other route: one .dat memmap per tensor in the offload folder."""
    import accelerate
    import transformers as tf

    model = make_model("bloom")
    inputs = inputs_for("bloom")
    expected = forward_logits(model, "bloom", inputs)
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=False)  # .bin forces the .dat rewrite
    units = [n for n, _ in offload.plan.find_units(model)]
    with accelerate.init_empty_weights():
        empty = tf.AutoModelForCausalLM.from_config(model.config)
    empty.tie_weights()
    dispatched = accelerate.load_checkpoint_and_dispatch(
        empty, str(tmp_path / "ckpt"), device_map=block_device_map(model, units), offload_folder=str(tmp_path / "off"))
    dispatched.eval()
    assert any(p.suffix == ".dat" for p in (tmp_path / "off").iterdir())
    with offload.enable(dispatched, prefetch=2, ram_tier=0, progress=False):
        assert torch.equal(forward_logits(dispatched, "bloom", inputs), expected)
