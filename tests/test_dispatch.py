"""Models dispatched by Transformers/Accelerate with ``device_map="auto"``: units follow the repeated blocks
whatever the map's granularity, so a merged ``model.layers: "disk"`` (or ``"": "disk"``) still streams one
block per unit with prefetch, and a module shared by two blocks is read once and kept."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import offload
from conftest import greedy_counting


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "ckpt"
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def _layer_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("max_memory,expect_key", [("60KB", ""), ("300KB", "model.layers")])
def test_device_map_auto_with_merged_disk_entries_streams_block_by_block(llama_folder, tmp_path, caplog, max_memory,
                                                                          expect_key, no_thread_leak):
    import transformers as tf
    ref = tf.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_logits = ref(ids).logits
        expected_tokens = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    model = tf.AutoModelForCausalLM.from_pretrained(llama_folder, device_map="auto", max_memory={"cpu": max_memory},
                                                    offload_folder=str(tmp_path / "off")).eval()
    assert model.hf_device_map.get(expect_key) == "disk"  # the merged entry this test is about
    with caplog.at_level(logging.WARNING, logger="offload"):
        with offload.enable(model, prefetch=2, ram_tier=0, progress=False) as h:
            names = [hk.record.name for hk in h._hooks]
            assert [f"model.layers.{i}" for i in range(4)] == [n for n in names if n.startswith("model.layers")]
            with torch.no_grad():
                assert torch.equal(model(ids).logits, expected_logits)
            out, bytes_read = greedy_counting(model, h, ids, 8)
            assert torch.equal(out, expected_tokens)
            s = h.stats()
            assert s.streamed_units == len(names) and s.hits > 0
            # each step reads every streamed unit once: bytes = units x steps (the prefetch of the step
            # after the last one included at most once)
            per_step = sum(e.length for hk in h._hooks for e in hk.record.reads)
            assert per_step * 8 <= bytes_read <= per_step * 9
    assert "outside its unit" not in caplog.text


class Hybrid(nn.Module):
    """A block that also calls a module shared by every block (Zamba-style shared attention)."""

    def __init__(self, shared: nn.Module):
        super().__init__()
        self.own = nn.Linear(32, 32)
        self.shared = shared

    def forward(self, x):
        return x + torch.tanh(self.own(x)) + 0.5 * self.shared(x)


class SharedStack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        shared = nn.Linear(32, 32)
        self.blocks = nn.ModuleList(Hybrid(shared) for _ in range(4))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_module_shared_by_several_blocks_is_read_once_and_kept(tmp_path, caplog, no_thread_leak):
    from accelerate import dispatch_model
    from offload.plan import disk_device_map
    model = SharedStack().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = ref(x)
    model = dispatch_model(model, device_map=disk_device_map(model, [f"blocks.{i}" for i in range(4)]),
                           offload_dir=str(tmp_path / "off"))
    with caplog.at_level(logging.WARNING, logger="offload"):
        with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
            hooks, todo = [], [model.blocks[0].shared._hf_hook]  # one per block, SequentialHooks nested
            while todo:
                hk = todo.pop()
                todo += list(getattr(hk, "hooks", []))
                hooks += [] if hasattr(hk, "hooks") else [hk]
            assert len(hooks) == 4 and not any(hk.offload for hk in hooks)  # none loads weights meanwhile
            shared_w = model.blocks[0].shared.weight
            assert shared_w.device.type == "cpu" and not isinstance(shared_w, offload.hooks.Offloaded)
            assert all("shared" not in t.name for hk in h._hooks for t in hk.record.tensors)
            with torch.no_grad():
                for _ in range(2):
                    assert torch.equal(model(x), expected)
        assert model.blocks[1].shared.weight.device.type == "meta"  # Accelerate's placeholder is back
        with torch.no_grad():
            assert torch.equal(model(x), expected)  # and Accelerate's own offload works again
    assert "outside its unit" not in caplog.text
