"""The prefetcher's promises, proved without timing anything: overlap, the memory bound, the RAM tier."""
from __future__ import annotations

import threading
import weakref

import pytest
import torch

import offload
from offload.hooks import Offloaded
from offload.io import PythonReader
from offload.staging import HostBuffer
from conftest import forward_logits, greedy, inputs_for, make_model


class RecordingReader(PythonReader):
    """A python reader that announces, per unit file, that a read of it has started."""

    def __init__(self):
        super().__init__()
        self.started: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def event(self, path: str) -> threading.Event:
        with self.lock:
            return self.started.setdefault(path, threading.Event())

    def read(self, handle, offset, dest):
        self.event(handle.path).set()
        super().read(handle, offset, dest)


def bloom(n_layer: int):
    import transformers as tf
    torch.manual_seed(0)
    return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=256, hidden_size=64, n_layer=n_layer, n_head=4)).eval()


def test_next_unit_read_is_issued_before_current_forward_returns(tmp_path, no_thread_leak):
    """Unit i's forward does not return until the read of unit i+1 has begun; without overlap it times out."""
    model = bloom(6)
    inputs = inputs_for("bloom")
    expected = forward_logits(model, "bloom", inputs)
    reader = RecordingReader()
    with offload.enable(model, prefetch=2, ram_tier=0, store=tmp_path / "s", reader=reader, progress=False) as h:
        paths = [h._store.file_path(hk.record) for hk in h._hooks]
        overlapped: list[bool] = []

        def check(i):
            def hook(module, args, output):
                # prepend=True: runs while unit i is still bound, i.e. before its forward returns.
                nxt = paths[(i + 1) % len(paths)]
                overlapped.append(reader.event(nxt).wait(timeout=10))
            return hook

        handles = [hk.module.register_forward_hook(check(i), prepend=True) for i, hk in enumerate(h._hooks)]
        assert torch.equal(forward_logits(model, "bloom", inputs), expected)
        for x in handles:
            x.remove()
    assert overlapped == [True] * len(paths)


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_memory_bound_during_generation(tmp_path, prefetch, no_thread_leak, monkeypatch):
    """At most prefetch+1 unit buffers exist, at most one unit is bound, nothing else holds streamed weights."""
    live: weakref.WeakSet[HostBuffer] = weakref.WeakSet()
    orig_init = HostBuffer.__init__

    def counting_init(self, nbytes):
        orig_init(self, nbytes)
        live.add(self)

    monkeypatch.setattr(HostBuffer, "__init__", counting_init)
    model = bloom(8)
    inputs = inputs_for("bloom")
    expected = greedy(model, inputs)
    with offload.enable(model, prefetch=prefetch, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        unit_modules = [hk.module for hk in h._hooks]
        seen_buffers, seen_bound = [], []

        def probe(module, args):
            seen_buffers.append(len(live))
            bound = [m for m in unit_modules if any(not isinstance(p, Offloaded) for p in m.parameters())]
            seen_bound.append(len(bound))

        handles = [m.register_forward_pre_hook(probe) for m in unit_modules]  # after ours: unit is bound
        assert torch.equal(greedy(model, inputs), expected)
        for x in handles:
            x.remove()
        assert max(seen_buffers) <= prefetch + 1
        assert max(seen_bound) == 1
        stats = h.stats()
        assert stats.ram_tier_bytes == 0
        assert stats.ring_bytes == (prefetch + 1) * max(hk.record.data_bytes for hk in h._hooks)
        # between forwards no streamed parameter holds storage
        with torch._C.DisableTorchFunctionSubclass():  # the stand-in's own tensor: meta, no memory
            assert all(isinstance(p, Offloaded) and p.device.type == "meta" for m in unit_modules for p in m.parameters())


def test_ram_tier_reads_fewer_bytes_by_exactly_the_ram_tier_units(tmp_path, no_thread_leak):
    model = bloom(8)
    inputs = inputs_for("bloom")
    expected = forward_logits(model, "bloom", inputs)
    store = tmp_path / "s"

    def bytes_per_pass(tier):
        with offload.enable(model, prefetch=1, ram_tier=tier, store=store, progress=False) as h:
            assert torch.equal(forward_logits(model, "bloom", inputs), expected)  # warm-up pass
            h._prefetcher.wait_idle()
            h.reset_stats()
            for _ in range(3):
                assert torch.equal(forward_logits(model, "bloom", inputs), expected)
            h._prefetcher.wait_idle()
            s = h.stats()
            resident = sum(hk.record.data_bytes for i, hk in enumerate(h._hooks) if i in h._prefetcher.ram_tier)
            assert s.misses == 0
            return s.bytes_read / 3, resident, s

    unit = None
    full, none_resident, s0 = bytes_per_pass(0)
    assert none_resident == 0
    with offload.enable(model, prefetch=1, ram_tier=0, store=store, progress=False) as h:
        unit = h._hooks[0].record.data_bytes
        assert full == sum(hk.record.data_bytes for hk in h._hooks)
    tier, resident, s1 = bytes_per_pass(3 * unit)
    assert s1.ram_tier_units == 3 and resident == 3 * unit
    assert full - tier == resident
    assert s1.ram_tier_hits == 3 * 3


def test_encoder_decoder_order_is_learned(tmp_path, no_thread_leak):
    """T5: after the first token the decoder's last block is followed by its first; no repeated misses."""
    model = make_model("t5")
    inputs = inputs_for("t5")
    expected = greedy(model, inputs)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        assert torch.equal(greedy(model, inputs), expected)
        first = h.stats().misses
        h.reset_stats()
        assert torch.equal(greedy(model, inputs), expected)
        # one generate = 1 encoder pass + 16 decoder passes; at most the wrap points miss, not every unit
        assert h.stats().misses <= 2 and first <= 3
        assert h.stats().hits > 16 * 3


def test_a_wait_on_a_held_prefetch_resumes_it(tmp_path, no_thread_leak):
    """Prefetches held for an expert batch that never comes (every unit holds, nobody resumes): the forward
    that needs a held read resumes it instead of waiting forever, and the logits are the model's."""
    from test_staging import no_hang
    model = bloom(6)
    inputs = inputs_for("bloom")
    expected = forward_logits(model, "bloom", inputs)
    with offload.enable(model, prefetch=2, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        h._prefetcher.hold_for = set(range(len(h._hooks)))
        for _ in range(2):
            assert torch.equal(no_hang(lambda: forward_logits(model, "bloom", inputs), 60), expected)
        no_hang(h._prefetcher.wait_idle, 60)


def test_held_reads_a_forward_waits_for_together_run_together(tmp_path, no_thread_leak):
    """Prefetch reads held for an expert batch, then waited for all at once (predicted experts): they are
    promoted together and run at once, not one after another as each wait would promote its own (each
    read here returns only when four run together)."""
    class Gate(PythonReader):
        barrier: threading.Barrier | None = None

        def read(self, handle, offset, dest):
            if self.barrier is not None:
                self.barrier.wait(timeout=30)
            super().read(handle, offset, dest)
    model = bloom(6)
    reader = Gate()
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", reader=reader, progress=False) as h:
        pf = h._prefetcher
        pf.wait_idle()
        records = pf.units[:4]
        buffers = [HostBuffer(r.data_bytes) for r in records]
        reader.barrier = threading.Barrier(4)
        pf._workers.hold()
        try:
            loads = pf.start_reads(list(zip(records, buffers)), urgent=False)
            pf.finish_reads(loads)  # raises the broken barrier if they ran one after another
        finally:
            reader.barrier = None
            pf._workers.resume()
        for r, b, load in zip(records, buffers, loads):
            assert load.error is None and torch.equal(b.tensor[:r.data_bytes], h._store.read_unit(r))
