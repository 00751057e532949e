"""Damaged stores and failing reads: a clear error naming the file, never a hang, no thread left behind."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import offload
from conftest import forward_logits, greedy, inputs_for, make_model, offload_threads, open_fds


@pytest.fixture
def built_store(tmp_path):
    model = make_model("bloom")
    store = tmp_path / "store"
    offload.enable(model, ram_tier=0, store=store, progress=False).disable()
    return model, store


def unit_files(store):
    return sorted(p for p in store.iterdir() if p.suffix == ".safetensors")


def test_truncated_unit_file_fails_at_enable(built_store, no_thread_leak):
    model, store = built_store
    victim = unit_files(store)[1]
    os.truncate(victim, victim.stat().st_size - 4096)
    with pytest.raises(offload.StoreError, match=f"{victim.name}.*4096 bytes shorter.*offload convert"):
        offload.enable(model, ram_tier=0, store=store, progress=False)
    assert getattr(model, "_offload_handle", None) is None


def test_missing_unit_file_fails_at_enable(built_store, no_thread_leak):
    model, store = built_store
    victim = unit_files(store)[2]
    victim.unlink()
    with pytest.raises(offload.StoreError, match=f"{victim.name}.*missing"):
        offload.enable(model, ram_tier=0, store=store, progress=False)


def test_longer_unit_file_fails_at_enable(built_store, no_thread_leak):
    model, store = built_store
    victim = unit_files(store)[0]
    with open(victim, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(offload.StoreError, match=f"{victim.name}.*10 bytes longer"):
        offload.enable(model, ram_tier=0, store=store, progress=False)


def test_damage_after_enable_raises_in_forward_naming_the_file(built_store, no_thread_leak):
    model, store = built_store
    inputs = inputs_for("bloom")
    fds_before = open_fds()
    h = offload.enable(model, prefetch=1, ram_tier=0, store=store, progress=False)
    victim = unit_files(store)[2]
    saved = victim.read_bytes()
    os.truncate(victim, 4096 + 100)
    with pytest.raises(offload.UnitReadError, match=f"unit transformer.h.2 from .*{victim.name}"):
        forward_logits(model, "bloom", inputs)
    # documented: the handle stays usable; once the file is back, the next forward reads it again
    victim.write_bytes(saved)
    expected = make_model("bloom")
    assert torch.equal(forward_logits(model, "bloom", inputs), forward_logits(expected, "bloom", inputs))
    h.disable()
    assert offload_threads() == []
    assert open_fds() <= fds_before


def test_a_cached_store_rebuilt_under_a_running_handle_is_not_read_by_it(tmp_path, no_thread_leak):
    """A rebuild of a cached store (another process, after the folder's weights changed) renames the old
    store away, moves the new one to its path and removes the old: the running handle keeps reading the
    files it opened at load, so it computes with the weights it loaded, never new files under its old
    manifest (its checksums are checked on a unit's first read only)."""
    import transformers as tf
    from offload.convert import cached_store
    folder = tmp_path / "m"
    make_model("bloom").save_pretrained(folder)
    ids = inputs_for("bloom")["input_ids"]
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)(ids).logits
    fds_before = open_fds()
    model, h = offload.load(folder, dtype=torch.bfloat16, prefetch=1, ram_tier=0, progress=False)  # a cast: a copy
    name = "transformer.h.2.mlp.dense_4h_to_h.weight"
    with h, torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        before = model.state_dict()[name].clone()  # a use outside the forward: read off the prefetcher
        make_model("bloom", seed=1).save_pretrained(folder)  # new weights, same shapes
        cached_store(str(folder), torch.bfloat16, progress=False)  # stale: rebuilt and swapped in
        for _ in range(2):
            assert torch.equal(model(ids).logits, want)
        assert torch.equal(model.state_dict()[name], before)
    assert open_fds() <= fds_before


def test_a_store_replaced_under_an_enabled_module_still_restores_its_weights(tmp_path, no_thread_leak):
    """The store of ``enable(module, store=S)`` swapped for another model's (renamed away, replaced,
    removed): forwards keep the module's weights, and ``disable()`` restores them from the files the
    handle holds (it refused with a checksum error when it re-read by path)."""
    model, ref = make_model("bloom"), make_model("bloom")
    inputs = inputs_for("bloom")
    store, other = tmp_path / "s", tmp_path / "other"
    with offload.enable(model, prefetch=1, ram_tier=0, store=store, progress=False):
        offload.convert(make_model("bloom", seed=1), other, progress=False)
        os.replace(store, tmp_path / "old")
        os.replace(other, store)
        shutil.rmtree(tmp_path / "old")
        assert torch.equal(forward_logits(model, "bloom", inputs), forward_logits(ref, "bloom", inputs))
    for (k, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), k


def test_a_handle_never_writes_its_checksums_into_a_store_rebuilt_since(tmp_path, no_thread_leak):
    """A folder read in place: a handle records its units' checksums on their first reads and saves them
    at disable. If the folder's weights changed and its index was rebuilt meanwhile, those checksums
    describe the old bytes and the old source: merged into the new index's file under the old source's
    fingerprint, they made later loads discard the new index's own checksums. A handle writes only into
    the folder it opened."""
    import transformers as tf
    from offload.convert import cached_store
    folder = tmp_path / "m"
    make_model("bloom").save_pretrained(folder)
    ids = inputs_for("bloom")["input_ids"]
    model, h = offload.load(folder, prefetch=1, ram_tier=0, progress=False)  # fp32 in fp32: read in place
    with torch.no_grad():
        model(ids)  # first reads: checksums recorded
    make_model("bloom", seed=1).save_pretrained(folder)
    new = cached_store(str(folder), progress=False)  # stale: a new index swapped in
    h.disable()
    sums = os.path.join(new, "checksums.json")
    if os.path.exists(sums):  # only the new index's own checksums may be there
        assert json.load(open(sums))["fingerprint"] == offload.store.Store.open(new).source["fingerprint"]
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    model, h = offload.load(folder, prefetch=1, ram_tier=0, progress=False)
    with h, torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_disable_twice_and_enable_twice(tmp_path, no_thread_leak):
    model = make_model("bloom")
    h = offload.enable(model, ram_tier=0, store=tmp_path / "s", progress=False)
    with pytest.raises(offload.OffloadError, match="already enabled"):
        offload.enable(model, ram_tier=0, progress=False)
    h.disable()
    h.disable()
    offload.disable(model)


def test_store_of_another_model_is_refused_not_rewritten(tmp_path, no_thread_leak):
    store = tmp_path / "s"
    offload.enable(make_model("bloom", seed=0), ram_tier=0, store=store, progress=False).disable()
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    with pytest.raises(offload.StoreMismatchError, match="different weights"):
        offload.enable(make_model("bloom", seed=1), ram_tier=0, store=store, progress=False)
    with pytest.raises(offload.StoreMismatchError, match="units missing"):
        offload.enable(make_model("opt"), ram_tier=0, store=store, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before


class FaultyReader:
    """Wraps a real reader; the ``fail_at``-th read of ``victim`` raises EIO (from a reader thread)."""

    def __init__(self, victim: str, fail_at: int):
        from offload.io import PythonReader
        self.inner = PythonReader()
        self.name, self.task_bytes = "faulty", self.inner.task_bytes
        self.victim, self.fail_at, self.count = victim, fail_at, 0

    def open(self, path):
        return self.inner.open(path)

    def read(self, handle, offset, dest):
        if handle.path.endswith(self.victim):
            self.count += 1
            if self.count == self.fail_at:
                raise OSError(5, "Input/output error", handle.path)
        self.inner.read(handle, offset, dest)

    def close(self, handle):
        self.inner.close(handle)


def test_eio_mid_decode_surfaces_in_forward_and_leaks_nothing(built_store, no_thread_leak):
    model, store = built_store
    inputs = inputs_for("bloom")
    expected = forward_logits(make_model("bloom"), "bloom", inputs)
    fds, threads = open_fds(), len(offload_threads())
    victim = unit_files(store)[3].name
    reader = FaultyReader(victim, fail_at=4)  # fine for three passes, then the disk fails
    h = offload.enable(model, prefetch=1, ram_tier=0, store=store, reader=reader, progress=False)
    raised = 0
    for _ in range(6):
        try:
            assert torch.equal(forward_logits(model, "bloom", inputs), expected)
        except offload.UnitReadError as e:
            raised += 1
            assert "unit transformer.h.3" in str(e) and victim in str(e) and "Input/output error" in str(e)
            assert isinstance(e.__cause__, OSError)
    assert raised == 1  # documented: the failed read is forgotten and the next forward reads it again
    h.disable()
    assert open_fds() <= fds and len(offload_threads()) <= threads


def test_keyboard_interrupt_then_disable_stops_reader_threads(built_store, no_thread_leak):
    """An interrupted generate leaves a unit bound (KeyboardInterrupt skips post-hooks); the next forward
    unbinds it and returns its lease, and disable() joins every reader thread before it returns."""
    model, store = built_store
    inputs = inputs_for("bloom")
    expected = forward_logits(make_model("bloom"), "bloom", inputs)
    h = offload.enable(model, prefetch=2, ram_tier=0, store=store, progress=False)
    calls = {"n": 0}

    def interrupt(module, args, output):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
    # a forward hook that runs after the unit's pre-hook bound it and before its post-hook unbinds it
    x = h._hooks[2].module.register_forward_hook(interrupt, prepend=True)
    with pytest.raises(KeyboardInterrupt):
        greedy(model, inputs, n=8)
    x.remove()
    assert h._hooks[2].bound and h._prefetcher.ring.holders() == 1  # left behind by the interrupt
    assert torch.equal(forward_logits(model, "bloom", inputs), expected)
    assert not any(hk.bound for hk in h._hooks) and h._prefetcher.ring.holders() == 0
    threads = h._prefetcher._workers._threads
    assert threads and all(t.is_alive() for t in threads)  # a fixed pool for the handle's life
    h.disable()
    assert not any(t.is_alive() for t in threads), "disable() returned before its reader threads exited"


def test_keyboard_interrupt_in_a_submodule_call_is_recovered_by_the_next_one(no_thread_leak):
    """Interrupted inside a unit while the caller drives an inner module (not the one enabled, so no root
    pre-hook runs): the next call of a unit unbinds what the interrupted one left, instead of finding every
    ring slot leased."""
    model = make_model("opt")
    ids = inputs_for("opt")["input_ids"]
    with torch.no_grad():
        expected = model.model.decoder(ids).last_hidden_state
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        for layer in (1, 2):
            def interrupt(module, args, output):
                raise KeyboardInterrupt
            x = model.model.decoder.layers[layer].register_forward_hook(interrupt, prepend=True)
            with pytest.raises(KeyboardInterrupt), torch.no_grad():
                model.model.decoder(ids)
            x.remove()
            assert h._hooks[layer].bound  # left behind by the interrupt
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model.model.decoder(ids).last_hidden_state, expected)
        assert not any(hk.bound for hk in h._hooks) and h._prefetcher.ring.holders() == 0


def test_a_second_threads_forward_is_refused_and_leaves_nothing_behind(no_thread_leak):
    """Two threads calling one enabled model would lease, bind and unbind units under each other (a ring
    slot leaked for good, or a unit unbound mid-forward): while one thread is inside a unit, another's
    call of the model or of a unit is an OffloadError, and the first forward is exact."""
    import threading
    model = make_model("opt")
    ids = inputs_for("opt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    inside, go = threading.Event(), threading.Event()

    def hold(module, args, output):  # thread A waits inside unit 1 until thread B has tried
        if threading.current_thread().name == "A":
            inside.set()
            assert go.wait(60), "hang guard"
    result = {}

    def run_a():
        with torch.no_grad():
            result["a"] = model(ids).logits
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        x = model.model.decoder.layers[1].register_forward_hook(hold, prepend=True)  # before the unbinding
        a = threading.Thread(target=run_a, name="A")
        a.start()
        try:
            assert inside.wait(60), "hang guard"
            with torch.no_grad():
                with pytest.raises(offload.OffloadError, match="another thread is in the forward of unit "
                                                               "model.decoder.layers.1.*one forward at a time"):
                    model(ids)
                with pytest.raises(offload.OffloadError, match="another thread"):
                    model.model.decoder.layers[2](torch.zeros(1, 8, 64))
        finally:
            go.set()
            a.join(60)
        x.remove()
        assert torch.equal(result["a"], expected)
        assert not any(hk.bound for hk in h._hooks) and h._prefetcher.ring.holders() == 0
        with torch.no_grad():  # and from this thread now that A is done
            assert torch.equal(model(ids).logits, expected)


def test_a_handle_dropped_without_disable_leaves_no_threads_files_or_store(tmp_path):
    """The model and its handle garbage-collected together, never disabled: the reader threads, the open
    files and the temporary store go with them."""
    import gc
    import time
    fds, threads = open_fds(), len(offload_threads())
    model = make_model("opt")
    h = offload.enable(model, prefetch=2, ram_tier=0, progress=False)  # a temporary store
    store = h._store.path
    with torch.no_grad():
        model(inputs_for("opt")["input_ids"])
    assert os.path.isdir(store) and len(offload_threads()) > threads
    del model, h
    gc.collect()
    deadline = time.monotonic() + 60  # hang guard: the clean-up runs on a thread of its own
    while (os.path.exists(store) or len(offload_threads()) > threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(store) and len(offload_threads()) <= threads, offload_threads()
    assert open_fds() <= fds


def test_a_submodule_kept_after_its_model_is_dropped_still_computes(no_thread_leak):
    """The dropped handle's clean-up ran once the enabled model was collected, while a unit module the user
    kept (model.model) still had offload's hooks: its next call said the handle was closed, its store gone."""
    import gc
    model = make_model("opt")
    ids = inputs_for("opt")["input_ids"]
    with torch.no_grad():
        expected = model.model.decoder(ids).last_hidden_state
    offload.enable(model, prefetch=1, ram_tier=0, progress=False)
    inner = model.model.decoder
    del model
    gc.collect()
    with torch.no_grad():
        assert torch.equal(inner(ids).last_hidden_state, expected)
    unit_hook = next(iter(inner.layers[0]._forward_pre_hooks.values())).__self__
    offload.disable(unit_hook.handle)


def test_two_models_in_one_process_do_not_interfere(tmp_path, no_thread_leak):
    a, b = make_model("bloom", seed=0), make_model("opt", seed=1)
    ia, ib = inputs_for("bloom"), inputs_for("opt")
    ea, eb = forward_logits(a, "bloom", ia), forward_logits(b, "opt", ib)
    ta, tb = greedy(a, ia), greedy(b, ib)
    with offload.enable(a, prefetch=1, ram_tier=0, store=tmp_path / "a", progress=False), \
            offload.enable(b, prefetch=2, ram_tier=0, store=tmp_path / "b", progress=False):
        for _ in range(2):
            assert torch.equal(forward_logits(a, "bloom", ia), ea)
            assert torch.equal(forward_logits(b, "opt", ib), eb)
        assert torch.equal(greedy(a, ia), ta) and torch.equal(greedy(b, ib), tb)


def test_source_checkpoint_is_only_read(tmp_path):
    model = make_model("bloom")
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    files = sorted((tmp_path / "ckpt").iterdir())
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    for f in files:
        f.chmod(0o444)
    (tmp_path / "ckpt").chmod(0o555)
    try:
        offload.convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    finally:
        (tmp_path / "ckpt").chmod(0o755)
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted((tmp_path / "ckpt").iterdir())} == before


def test_a_forward_that_raised_is_no_pass_of_the_meter(no_thread_leak):
    """The pass meter timed forwards that raised as passes: a decode step failing halfway gave tuning a
    per-unit compute of half a pass."""
    model = make_model("opt")
    one = inputs_for("opt", length=1)["input_ids"]
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        boom = model.model.decoder.layers[2].register_forward_pre_hook(lambda *_: 1 / 0)
        for _ in range(3):
            with pytest.raises(ZeroDivisionError), torch.no_grad():
                model(one)
        boom.remove()
        assert h.stats().passes == 0 and h._meter.decode == {}
        with torch.no_grad():
            for _ in range(2):
                model(one)
        assert h.stats().passes == 2 and h._meter.compute(1) is not None


def test_a_reader_whose_close_fails_neither_hangs_a_forward_nor_fails_it(monkeypatch, no_thread_leak):
    """A load closes the files it opened itself (past the prefetcher's open-file cap) when its reads are in;
    a close raising anything but OSError escaped before the waiter was woken and ended the reader thread:
    the forward waited forever. The bytes are in, so the forward is exact."""
    import threading
    import offload.prefetch as prefetch_mod
    from offload.io import PythonReader

    class BadClose(PythonReader):
        def close(self, h):
            super().close(h)
            raise RuntimeError("close failed")
    monkeypatch.setattr(prefetch_mod, "_MAX_OPEN", 0)  # every load opens (and closes) its own files
    model = make_model("opt")
    ids = inputs_for("opt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    out = {}
    with offload.enable(model, prefetch=1, ram_tier=0, reader=BadClose(), progress=False):
        def run():
            with torch.no_grad():
                out["logits"] = model(ids).logits
        t = threading.Thread(target=run)
        t.start()
        t.join(60)  # hang guard
        assert not t.is_alive(), "the forward hangs"
        assert torch.equal(out["logits"], expected)
