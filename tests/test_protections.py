"""Protections that call-order and equivalence tests cannot see, each shown to fail when its code is removed.

Found by removing each protection of the staging core in turn and running the suite (see the closing
note of the staging-core issue): these are the ones no behaviour test caught. The waits here are
gates and hang guards, never measurements: each test's outcome does not depend on the machine's speed.
"""
from __future__ import annotations

import threading
import time

import torch

import offload
from offload.config import StagingConfig
from offload.io import PythonReader
from offload.prefetch import Prefetcher
from offload.store import Store
from offload.transfer import CudaStager
from simgpu import SimBackend
from test_staging import Stack, count_claims  # noqa: F401  (fixture)


def _prefetcher(tmp_path, n, prefetch=1, reader=None):
    store = offload.convert(Stack(n), tmp_path / "s", progress=False)
    cfg = StagingConfig(prefetch=prefetch, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=n)
    return store, Prefetcher(store, store.units, reader or PythonReader(), cfg)


# mutation 4 ------------------------------------------------------------------------------------------------
def test_demand_read_evicts_a_finished_window_read_instead_of_spinning(tmp_path, count_claims):
    """One slot leased (a unit still running), every other slot holds a *finished* read of a unit in the
    window of the unit being called: the demand read takes the farthest of them. Before, it cancelled a
    read that had already finished, waited for nothing and retried forever (5 CPU-s in 5 s)."""
    store, pf = _prefetcher(tmp_path, 6, prefetch=2)
    records = store.units
    try:
        for i in (5, 1, 2):  # teach the order 5 -> 1 -> 2
            pf.acquire(i).release()
        held = pf.acquire(0)  # slot leased, as by a forward still running (and 2 -> 0 keeps 5 -> 1 -> 2)
        pf.wait_idle()
        assert pf.window(5) == [1, 2]
        assert sorted(s.unit for s in pf.ring.slots) == [0, 1, 2] and not any(s.reading() for s in pf.ring.slots)
        count_claims["claims"] = 0
        lease = pf.acquire(5)
        assert count_claims["claims"] <= 2
        t = records[5].tensors[0]
        want = Store.open(store.path).read_tensor(records[5], t.name)
        assert torch.equal(lease.tensor[t.offset:t.offset + t.nbytes].view(want.dtype).view(want.shape), want)
        lease.release()
        held.release()
    finally:
        pf.close()


# mutation 3 ------------------------------------------------------------------------------------------------
class _SlowAtClose(PythonReader):
    """Reads of ``victim`` are still running when close() begins, and go on for a while after it."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim, self.pf = victim, None
        self.entered, self.finished, self.gate = threading.Event(), threading.Event(), threading.Event()

    def read(self, handle, offset, dest):
        if handle.path.endswith(self.victim):
            self.entered.set()
            while not self.pf.closed:
                time.sleep(0.001)
            self.gate.wait(0.5)  # nobody opens it before close() returns: close() must wait for this read
            super().read(handle, offset, dest)
            self.finished.set()
            return
        super().read(handle, offset, dest)


def test_close_waits_for_the_read_in_progress(tmp_path):
    store = offload.convert(Stack(3), tmp_path / "s", progress=False)
    reader = _SlowAtClose(store.units[1].file)
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=3)
    pf = reader.pf = Prefetcher(store, store.units, reader, cfg)
    try:
        pf.acquire(0).release()  # reads 0 and starts reading 1 (the window)
        assert reader.entered.wait(10)
        pf.close()
        assert reader.finished.is_set(), "close() returned while a reader thread was still writing into a buffer"
        assert pf._workers.alive() == []
    finally:
        reader.gate.set()
        pf.close()


# mutation 8 ------------------------------------------------------------------------------------------------
def test_host_buffer_lent_to_a_pending_copy_is_not_reused_before_it(tmp_path):
    """The copy engine is busy, so the copy of unit 0 has not read its host buffer yet; demand reads that
    need every host slot must wait for that copy rather than overwrite the buffer under it."""
    store, pf = _prefetcher(tmp_path, 4)
    backend = SimBackend()
    stager = CudaStager(backend, pf, store.units, range(4))
    gate = threading.Event()
    held: list = []
    try:
        stager.copy_stream.enqueue(gate.wait)
        lease = pf.acquire(0)
        want = lease.tensor.clone()
        slot = stager.slots[0]
        stager._copy(slot, 0, lease)  # the lease goes back fenced by the copy's event
        pf.wait_idle()
        done = threading.Event()

        def demand():
            for j in (2, 3):  # hold both host slots: one of them is the buffer unit 0 is copied from
                held.append(pf.acquire(j))
            done.set()
        t = threading.Thread(target=demand, daemon=True)
        t.start()
        # either both reads finished (the buffer was reused under the copy), or one waits on the copy's fence
        while not done.is_set() and not any(s.reserved_for is not None for s in pf.ring.slots):
            time.sleep(0.001)
        gate.set()
        t.join(30)
        assert done.is_set()
        stager.copy_stream.synchronize()
        assert torch.equal(slot.tensor[:want.numel()], want), "the host buffer was reused before its copy ran"
    finally:
        gate.set()
        for le in held:
            le.release()
        stager.close()
        pf.close()
        backend.close()


# mutation 16 -----------------------------------------------------------------------------------------------
def test_copy_into_a_device_slot_waits_for_the_forward_that_used_it(tmp_path):
    """A device slot's previous forward is still running on the (simulated) GPU: a copy into that slot is
    ordered after the forward's ``free`` event, so it cannot overwrite weights still being read."""
    store, pf = _prefetcher(tmp_path, 3)
    backend = SimBackend()
    stager = CudaStager(backend, pf, store.units, range(3))
    gate = threading.Event()
    try:
        slot = stager.slots[0]
        before = slot.tensor.clone()
        backend.compute.enqueue(gate.wait)  # the previous unit's kernels are still running ...
        slot.free.record(backend.compute)  # ... and release the slot when they finish
        lease = pf.acquire(1)
        want = lease.tensor.clone()
        stager._copy(slot, 1, lease)
        copied = threading.Event()
        stager.copy_stream.enqueue(copied.set)
        assert not copied.wait(1.0), "the copy ran before the slot's previous forward finished"
        assert torch.equal(slot.tensor, before)
        gate.set()
        stager.copy_stream.synchronize()
        assert torch.equal(slot.tensor[:want.numel()], want)
    finally:
        gate.set()
        stager.close()
        pf.close()
        backend.close()


# mutation 13 -----------------------------------------------------------------------------------------------
class _Gated(PythonReader):
    """Reads of ``victim`` block until ``gate`` is set (a slow disk for that unit)."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim, self.gate, self.entered = victim, threading.Event(), threading.Event()

    def read(self, handle, offset, dest):
        if handle.path.endswith(self.victim):
            self.entered.set()
            assert self.gate.wait(30)
        super().read(handle, offset, dest)


def test_a_stale_read_is_cancelled_and_its_slot_reads_the_new_window(tmp_path):
    """The order changes (0 -> 2) while the read of unit 1, which nobody expects any more, holds the only
    other slot: it is cancelled, and when it returns its slot reads unit 3 (window(2)), so 3 is a hit."""
    store = offload.convert(Stack(4), tmp_path / "s", progress=False)
    reader = _Gated(store.units[1].file)
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=4)
    pf = Prefetcher(store, store.units, reader, cfg)
    try:
        pf.acquire(0).release()  # reads 0, starts reading 1 (blocked)
        assert reader.entered.wait(10)
        lease = pf.acquire(2)  # 0 -> 2: window(2) = [3]; the read of 1 is stale
        reader.gate.set()
        lease.release()
        pf.wait_idle()
        assert pf.ring.find(3) is not None, "the stale read kept its slot; unit 3 was never requested"
        misses = pf.stats().misses
        pf.acquire(3).release()
        assert pf.stats().misses == misses
    finally:
        reader.gate.set()
        pf.close()


# mutation 15 -----------------------------------------------------------------------------------------------
class _Counting(_Gated):
    """Counts the loads of ``watched`` a prefetcher starts (each load takes its files' handles when it
    starts, under the prefetcher's lock: ``Prefetcher._open``)."""

    def __init__(self, victim: str, watched: str):
        super().__init__(victim)
        self.watched, self.opened = watched, 0

    def watch(self, pf):
        real = pf._open

        def counting(path):
            if path.endswith(self.watched):
                self.opened += 1
            return real(path)
        pf._open = counting


def test_a_slot_taken_from_a_running_read_stays_reserved_for_the_demand(tmp_path):
    """Unit 2 is called while the only unleased slot is still reading stale unit 1: the demand cancels that
    read and waits for it. When it returns, its completion re-plans; that must not give the slot to a
    prefetch of unit 3 (window(2)) ahead of the demand that is waiting for it."""
    store = offload.convert(Stack(4), tmp_path / "s", progress=False)
    reader = _Counting(store.units[1].file, store.units[3].file)
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=4)
    pf = Prefetcher(store, store.units, reader, cfg)
    reader.watch(pf)
    out: dict = {}
    try:
        held = pf.acquire(0)  # slot A leased (a forward still running); reads 1 into slot B (blocked)
        assert reader.entered.wait(10)

        def demand():
            try:
                out["lease"] = pf.acquire(2)
            except BaseException as e:  # noqa: BLE001
                out["error"] = e
        t = threading.Thread(target=demand, daemon=True)
        t.start()
        slot_b = next(s for s in pf.ring.slots if s.holders == 0)
        deadline = time.monotonic() + 10
        while not (slot_b.load is not None and slot_b.load.cancelled) and time.monotonic() < deadline:
            time.sleep(0.001)
        reader.gate.set()  # the cancelled read of 1 returns
        t.join(30)
        assert "lease" in out, out.get("error", "acquire(2) did not return")
        assert reader.opened == 0, "the slot reserved for unit 2's demand read was given to a prefetch of unit 3"
        out["lease"].release()
        held.release()
    finally:
        reader.gate.set()
        pf.close()


# mutation 11 (white-box: behaviourally equivalent, Binding.bind re-syncs the flag) --------------------------
def test_fresh_bound_parameter_starts_with_the_originals_requires_grad(tmp_path):
    from accelerate import dispatch_model
    from offload.plan import disk_device_map
    from test_staging import WeightAtX
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[WeightAtX() for _ in range(4)])
    model = dispatch_model(model, device_map=disk_device_map(model, ["1", "2", "3"]), offload_dir=str(tmp_path / "o"))
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        params = [b for hk in h._hooks for b in hk.bindings if b.is_param]
        assert params and all(b.live.requires_grad == b.original.requires_grad for b in params)


# found by review ----------------------------------------------------------------------------------------
def test_an_interrupted_wait_for_a_read_gives_its_lease_back(tmp_path, monkeypatch):
    """Ctrl-C while a forward waits for its unit's read: the lease taken for it must go back, or after
    prefetch+1 interrupts every slot is leased for good ("all 2 are leased ...")."""
    store, pf = _prefetcher(tmp_path, 4)
    wait = Prefetcher._wait
    calls = {"n": 0}

    def interrupted(self, what, context):
        if hasattr(what, "unit"):  # a read (not a fence)
            calls["n"] += 1
            if calls["n"] <= 2:
                raise KeyboardInterrupt
        return wait(self, what, context)
    monkeypatch.setattr(Prefetcher, "_wait", interrupted)
    try:
        for _ in range(2):
            try:
                pf.acquire(0)
            except KeyboardInterrupt:
                pass
        assert pf.ring.holders() == 0
        pf.acquire(1).release()  # and the ring still serves
    finally:
        pf.close()


def test_enable_that_fails_on_its_budget_leaves_nothing_behind(tmp_path, monkeypatch, no_thread_leak):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    model = Stack(4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    import pytest
    with pytest.raises(offload.OffloadError, match="cpu_memory=.* the minimum is"):
        offload.enable(model, prefetch=1, cpu_memory=1000, progress=False)
    assert not list((tmp_path / "cache").glob("store-*")), "the temporary store was left behind"
    assert getattr(model, "_offload_handle", None) is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
