"""The staging core under call orders other than a fixed cycle, on the CPU and on a simulated GPU.

Every case is exact against the model in memory, bounded in memory (the ring never grows, no lease is
left behind) and bounded in work: the demand path's loop is counted, so a spin fails the test instead
of hanging it. Nothing here measures time; the simulated GPU's delays only reorder completions.
"""
from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch
from torch import nn

import offload
import offload.placement
from offload.config import StagingConfig
from offload.io import PythonReader
from offload.prefetch import Prefetcher
from offload.transfer import CudaStager
from simgpu import SimBackend

D = 16
_SIM: list[SimBackend] = []  # the simulated GPU the test models report their compute to


class Block(nn.Module):
    def __init__(self, recurse: bool = False):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, D)
        self.recurse = recurse

    def forward(self, x: torch.Tensor, depth: int = 0) -> torch.Tensor:
        if _SIM:
            _SIM[0].lag()  # this unit's kernels on the simulated compute stream
        y = x + torch.tanh(self.lin(x))
        if self.recurse and depth < 2:
            y = self(y, depth + 1)  # a unit whose forward calls itself
        return y + 0.5 * self.out(y)


class Stack(nn.Module):
    """Blocks called in any order the caller gives; the in-memory copy runs the same order."""

    def __init__(self, n: int, seed: int = 0, recurse: frozenset[int] = frozenset()):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block(i in recurse) for i in range(n))
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        x = self.embed(x)
        for i in (range(len(self.blocks)) if order is None else order):
            x = self.blocks[i](x)
        return self.head(x)


def run(model: nn.Module, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(x, order)


@pytest.fixture
def count_claims(monkeypatch):
    """Counts passes through the demand path's loop; a spin shows up as thousands of them."""
    counter = {"claims": 0, "acquires": 0}
    claim, acquire = Prefetcher._claim_for_demand, Prefetcher.acquire

    def counting_claim(self, i):
        counter["claims"] += 1
        if counter["claims"] > 10_000:
            raise AssertionError("the demand path is spinning")
        return claim(self, i)

    def counting_acquire(self, i):
        counter["acquires"] += 1
        return acquire(self, i)
    monkeypatch.setattr(Prefetcher, "_claim_for_demand", counting_claim)
    monkeypatch.setattr(Prefetcher, "acquire", counting_acquire)
    return counter


@pytest.fixture
def sim_gpu(monkeypatch):
    """Route every unit through CudaStager on a simulated GPU; yields a function that sets its delays."""
    made: list[SimBackend] = []

    def configure(copy_delay_s: float = 0.0, compute_delay_s: float = 0.0) -> None:
        def backend_for(device):
            b = SimBackend(copy_delay_s, compute_delay_s)
            made.append(b)
            _SIM[:] = [b]
            return b
        monkeypatch.setattr(offload.placement, "_backend_for", backend_for)
    yield configure
    _SIM.clear()
    for b in made:
        b.close()


def no_hang(fn, timeout_s: float = 120.0):
    """Run ``fn`` on a thread; a deadlock fails the test instead of hanging CI (a guard, not a measurement)."""
    out: dict[str, object] = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"deadlock: still running after {timeout_s:.0f} s"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


# ------------------------------------------------------------------------------ the busy-spin


def test_every_slot_leased_by_running_units_is_an_error_not_a_hang(tmp_path):
    model = Stack(4)
    store = offload.convert(model, tmp_path / "s", progress=False)
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=4)
    pf = Prefetcher(store, store.units, PythonReader(), cfg)
    try:
        a, b = pf.acquire(0), pf.acquire(1)
        with pytest.raises(offload.OffloadError, match="all 2 are leased by units whose forward is still running"):
            pf.acquire(2)
        a.release(), b.release()
        pf.acquire(2).release()  # and the ring still works afterwards
    finally:
        pf.close()


class _Fence:
    """A fence completed by the test, standing in for a copy the GPU has not finished."""

    def __init__(self):
        self.event = threading.Event()
        self.waits = 0

    def query(self) -> bool:
        self.waits += 1
        if self.waits == 3:  # the copy engine finishes while the host waits for it
            self.event.set()
        return self.event.is_set()

    def synchronize(self) -> None:
        self.event.wait()


def test_a_lease_fenced_by_an_unfinished_copy_is_waited_for(tmp_path, count_claims):
    """Both host slots lent to copies that have not finished: a demand read waits for one (bounded)
    rather than raising "all buffers held" (prefetch=1, a GPU behind the CPU) or spinning."""
    model = Stack(4)
    store = offload.convert(model, tmp_path / "s", progress=False)
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=4)
    pf = Prefetcher(store, store.units, PythonReader(), cfg)
    try:
        fences = [_Fence(), _Fence()]
        pf.acquire(0).release(after=fences[0])
        pf.acquire(1).release(after=fences[1])
        pf.wait_idle()
        lease = pf.acquire(3)  # not in any window: must reuse a fenced slot
        assert any(f.event.is_set() for f in fences)
        assert count_claims["claims"] <= 4
        lease.release()
    finally:
        pf.close()


def test_fence_that_never_completes_is_a_bounded_error(tmp_path):
    model = Stack(3)
    store = offload.convert(model, tmp_path / "s", progress=False)
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=3,
                        fence_timeout_s=0.05)

    class Never:
        def query(self):
            return False

        def synchronize(self):
            raise AssertionError("never")
    pf = Prefetcher(store, store.units, PythonReader(), cfg)
    try:
        pf.acquire(0).release(after=Never())
        pf.acquire(1).release(after=Never())
        with pytest.raises(offload.OffloadError, match="copy still reading this staging buffer"):
            pf.acquire(2)
        assert all(s.reserved_for is None for s in pf.ring.slots)  # the reservation was given back
    finally:
        pf.close()


# ------------------------------------------------------------------------------ the idle-exit race


def test_reader_threads_are_fixed_for_the_handles_life(tmp_path, monkeypatch, no_thread_leak):
    """Before: a worker that left its loop but had not exited still counted as running, so submit()
    started no thread and the read never ran (a hang). Now the pool never shrinks: a read submitted
    after any idle period runs, on the same threads, until disable() joins them."""
    model = Stack(4)
    x = torch.randn(2, D)
    expected = run(copy.deepcopy(model), x)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", io_threads=3, progress=False) as h:
        threads = list(h._prefetcher._workers._threads)
        assert len(threads) == 3
        assert torch.equal(run(model, x), expected)
        h._prefetcher.wait_idle()
        # idle now: every thread is parked on the condition, none has exited
        assert h._prefetcher._workers.alive() == threads
        assert torch.equal(run(model, x), expected)
    assert not any(t.is_alive() for t in threads)


# ------------------------------------------------------------------------------ call orders

ORDERS = {
    "skip": [[0, 1, 2, 3, 4, 5], [0, 1, 3, 5], [0, 1, 2, 3, 4, 5], [2, 4]],
    "early-exit": [[0, 1, 2, 3, 4, 5], [0, 1, 2], [0, 1, 2, 3, 4, 5], [0]],
    "twice-in-a-row": [[0, 0, 1, 2, 2, 2, 3, 4, 5, 5], [0, 1, 2, 3, 4, 5]],
    "new-order": [[0, 1, 2, 3, 4, 5]] * 2 + [[5, 4, 3, 2, 1, 0]] * 2 + [[0, 2, 4, 1, 3, 5]] * 2,
    "random": [list(torch.randint(0, 6, (9,), generator=torch.Generator().manual_seed(k))) for k in range(6)],
}


@pytest.mark.parametrize("gpu", ["cpu", "simgpu"])
@pytest.mark.parametrize("name", sorted(ORDERS))
@pytest.mark.parametrize("prefetch", [1, 2])
def test_call_orders_are_exact_bounded_and_never_spin(name, prefetch, gpu, tmp_path, count_claims, sim_gpu,
                                                      no_thread_leak):
    if gpu == "simgpu":
        sim_gpu(copy_delay_s=0.0005, compute_delay_s=0.0005)
    model = Stack(6)
    ref = copy.deepcopy(model)
    x = torch.randn(3, D)
    orders = [[int(i) for i in o] for o in ORDERS[name]]

    def body():
        with offload.enable(model, prefetch=prefetch, ram_tier=0, gpu_tier=0, store=tmp_path / "s",
                            progress=False) as h:
            assert isinstance(h._hooks[0].stager, CudaStager) == (gpu == "simgpu")
            slots = len(h._prefetcher.ring.slots)
            for order in orders:
                assert torch.equal(run(model, x, order), run(ref, x, order)), order
                assert h._prefetcher.ring.holders() == 0 and not any(hk.bound for hk in h._hooks)
                assert len(h._prefetcher.ring.slots) == slots == prefetch + 1
            assert count_claims["claims"] <= 3 * count_claims["acquires"]
    no_hang(body)


@pytest.mark.parametrize("gpu", ["cpu", "simgpu"])
def test_reentrant_unit_is_bound_once_and_never_read_outside(gpu, tmp_path, caplog, sim_gpu, no_thread_leak):
    """Block 2 calls itself twice; the inner calls must not unbind the outer call's weights (before, the
    rest of the outer forward read every weight from disk through the stand-ins, with a warning)."""
    if gpu == "simgpu":
        sim_gpu(compute_delay_s=0.0005)
    model = Stack(5, recurse=frozenset({2}))
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    with caplog.at_level(logging.WARNING, logger="offload"):
        with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
            for _ in range(3):
                assert torch.equal(run(model, x), run(ref, x))
            assert h._prefetcher.ring.holders() == 0
    assert "outside its unit" not in caplog.text


def test_two_models_interleaved_on_one_simulated_gpu(tmp_path, sim_gpu, no_thread_leak):
    sim_gpu(copy_delay_s=0.0005, compute_delay_s=0.0005)
    a, b = Stack(5, seed=1), Stack(7, seed=2)
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    x = torch.randn(2, D)

    def body():
        with offload.enable(a, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "a", progress=False), \
                offload.enable(b, prefetch=2, ram_tier=0, gpu_tier=0, store=tmp_path / "b", progress=False):
            for k in range(4):
                order = None if k % 2 == 0 else [3, 1, 4]
                assert torch.equal(run(a, x, order), run(ra, x, order))
                assert torch.equal(run(b, x, order), run(rb, x, order))
    no_hang(body)


# ------------------------------------------------------------------------------ the simulated GPU

DELAYS = {"none": (0.0, 0.0), "copies-slower": (0.002, 0.0), "gpu-behind-cpu": (0.0, 0.002)}


@pytest.mark.parametrize("delays", sorted(DELAYS))
@pytest.mark.parametrize("tier", [False, True])
@pytest.mark.parametrize("units", [2, 5, 24])
@pytest.mark.parametrize("prefetch", [1, 2, 3, 4])
def test_simulated_gpu_exact_without_deadlock(prefetch, units, tier, delays, tmp_path, sim_gpu, count_claims,
                                              no_thread_leak):
    """CudaStager + Prefetcher, unchanged, over a GPU that runs behind the CPU, copies slower than compute,
    and neither. Before, prefetch=1 failed on its first pass ("all 2 ... are held by units still executing")
    and prefetch=2 spun when the GPU ran behind."""
    sim_gpu(*DELAYS[delays])
    model = Stack(units)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    unit_bytes = 4096  # one page: every block's data section here
    resident = sum(p.numel() * p.element_size() for m in (model.embed, model.head) for p in m.parameters())
    # gpu_memory is all device memory for weights: resident + slot ring + the GPU tier
    gpu_memory = resident + (min(prefetch + 1, units) + (units // 2 if tier else 0)) * unit_bytes

    def body():
        with offload.enable(model, prefetch=prefetch, ram_tier=0, gpu_memory=gpu_memory, store=tmp_path / "s",
                            progress=False) as h:
            stager = h._hooks[0].stager
            assert isinstance(stager, CudaStager) and all(hk.record.data_bytes == unit_bytes for hk in h._hooks)
            # a budget that would hold every unit is better spent keeping them all than on a ring (plan_memory)
            fits = min(prefetch + 1, units) + (units // 2 if tier else 0) >= units
            assert len(stager.gpu_tier) == (units if fits else units // 2 if tier else 0)
            for _ in range(3):
                assert torch.equal(run(model, x), run(ref, x))
            assert h._prefetcher.ring.holders() == 0
            assert len(stager.slots) == min(prefetch + 1, units - len(stager.gpu_tier))
            if len(stager.gpu_tier) < units:
                assert _SIM[0].copies > 0
            assert count_claims["claims"] <= 3 * max(1, count_claims["acquires"])
    no_hang(body)


def test_simulated_copy_reads_its_source_late(tmp_path):
    """The simulation is faithful where it matters: a host buffer overwritten before the copy stream
    reaches the copy gives the new bytes on the device (so a ring that reused a lent buffer early would
    fail the tests above)."""
    b = SimBackend(copy_delay_s=0.0)
    try:
        gate = threading.Event()
        s = b.stream()
        s.enqueue(gate.wait)
        src, dst = torch.zeros(4, dtype=torch.uint8), b.empty(4)
        b.copy(s, dst, src)
        src.fill_(7)
        gate.set()
        s.synchronize()
        assert dst.tolist() == [7, 7, 7, 7]
    finally:
        b.close()


# ------------------------------------------------------------------------------ protections


def test_interrupted_forward_is_unbound_by_the_next_forward(tmp_path, no_thread_leak):
    """KeyboardInterrupt skips post-hooks, leaving a unit bound and its lease held; the root pre-hook of
    the next forward releases it, or that slot would be lost to the ring for good."""
    model = Stack(5)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        def stop(module, args, output):
            raise KeyboardInterrupt
        hk = h._hooks[2].module.register_forward_hook(stop, prepend=True)
        with pytest.raises(KeyboardInterrupt):
            run(model, x)
        hk.remove()
        assert h._hooks[2].bound and h._prefetcher.ring.holders() == 1
        assert torch.equal(run(model, x), run(ref, x))
        assert not h._hooks[2].bound and h._prefetcher.ring.holders() == 0


class FlakyReader(PythonReader):
    """Fails the first read of one file, then reads normally (a transient EIO)."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim, self.failed = victim, False

    def read(self, handle, offset, dest):
        if handle.path.endswith(self.victim) and not self.failed:
            self.failed = True
            raise OSError(5, "Input/output error", handle.path)
        super().read(handle, offset, dest)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_a_failed_read_is_forgotten_and_retried(tmp_path, prefetch, no_thread_leak):
    model = Stack(5)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    offload.convert(model, tmp_path / "s", progress=False)
    victim = sorted((tmp_path / "s").glob("00002.*"))[0].name
    with offload.enable(model, prefetch=prefetch, ram_tier=0, store=tmp_path / "s", reader=FlakyReader(victim),
                        progress=False) as h:
        with pytest.raises(offload.UnitReadError, match=f"unit blocks.2 from .*{victim} failed: .*Input/output error"):
            run(model, x)
        assert h._prefetcher.ring.holders() == 0
        assert torch.equal(run(model, x), run(ref, x))  # the next forward reads it again


def test_in_place_change_of_a_streamed_weight_is_refused(tmp_path, no_thread_leak):
    """``p.add_()`` / ``nn.init.*_`` on a streamed parameter would change a fresh copy read from the store
    and be lost; it raises, naming the tensor and the fix. requires_grad_() is allowed and kept."""
    model = Stack(3)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False):
        w = model.blocks[1].lin.weight
        with pytest.raises(offload.OffloadError, match=r"blocks.1.lin.weight in place.*offload.disable"):
            with torch.no_grad():
                w.add_(1.0)
        with pytest.raises(offload.OffloadError, match="in place"):
            nn.init.zeros_(w)
        with pytest.raises(offload.OffloadError, match="in place"):
            with torch.no_grad():
                w *= 2
        model.requires_grad_(False)
        inside = []
        hk = model.blocks[1].lin.register_forward_pre_hook(lambda m, a: inside.append(m.weight.requires_grad))
        assert torch.equal(run(model, x), run(ref, x))
        hk.remove()
        assert inside == [False]  # the bound weight, inside its forward, has the flag too
        assert not model.blocks[1].lin.weight.requires_grad


class WeightAtX(nn.Module):
    """Uses its weight directly (``x @ W``) as Mamba's dt_proj path does, not through F.linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        return torch.tanh(x @ self.w)


def test_bound_parameters_keep_requires_grad_on_a_dispatched_model(tmp_path, no_thread_leak):
    """matmul picks its kernel by requires_grad even under no_grad; a bound parameter must keep the
    original's flag (before: always False on a dispatched model) so ``x @ W`` is bit-identical."""
    from accelerate import dispatch_model
    from offload.plan import disk_device_map
    torch.manual_seed(0)
    model = nn.Sequential(*[WeightAtX() for _ in range(4)])
    ref = copy.deepcopy(model)
    x = torch.randn(5, 64)
    dm = disk_device_map(model, ["1", "2", "3"])
    model = dispatch_model(model, device_map=dm, offload_dir=str(tmp_path / "off"))
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        seen = []
        probe = h._hooks[0].module.register_forward_pre_hook(lambda m, a: seen.append(m.w.requires_grad), prepend=False)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))
        probe.remove()
        assert seen == [True]


def test_gpu_memory_below_resident_plus_ring_names_the_minimum(tmp_path, sim_gpu, no_thread_leak):
    sim_gpu()
    model = Stack(4)
    resident = sum(p.numel() * p.element_size() for m in (model.embed, model.head) for p in m.parameters())
    minimum = resident + 2 * 4096  # prefetch 1: two device slots of one 4 KiB unit
    with pytest.raises(offload.OffloadError, match=rf"gpu_memory=.* the minimum is {minimum / 1024:.2f} KiB"):
        offload.enable(model, prefetch=1, ram_tier=0, gpu_memory=minimum - 1, store=tmp_path / "s", progress=False)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_memory=minimum, store=tmp_path / "s", progress=False) as h:
        assert not h._hooks[0].stager.gpu_tier and len(h._hooks[0].stager.slots) == 2
