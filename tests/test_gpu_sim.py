"""The GPU failures of issue 22, each on the simulated GPU (tests/simgpu.py) and each failing without its fix:
an early ``free`` event (deferred kernels), out of memory with the default GPU budget (a byte-counting
allocator), graph capture, a CUDA error on a reader thread, host registration, dequantize temporaries,
speculative timing, the GPU tier's fill, and ``close`` with kernels still queued. Plus the GPU suite's
plan (``gpu_suite.sh --plan``) and, with ``OFFLOAD_SUITE_DRY_RUN=1``, its whole dry run on the CPU.
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import subprocess
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import offload
import offload.placement
import offload.transfer
from offload.config import StagingConfig
from offload.io import PythonReader
from offload.prefetch import Prefetcher
from offload.staging import HostBuffer
from offload.transfer import CudaStager
from simgpu import SimBackend, SimCudart
from test_staging import no_hang

D = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Sim:
    """The simulated GPU a test model reports to, and the store's bytes its deferred kernels check against."""
    backend: SimBackend | None = None
    expected: dict[str, torch.Tensor] = {}
    act_per_token = 0  # bytes a block's forward allocates per token (activations)
    kv_per_pass = 0  # bytes kept per pass, as a growing KV cache
    kv: list[torch.Tensor] = []


class Block(nn.Module):
    streamed = False  # set by the sim fixture on the model under test (its reference copy stays False)

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = Sim.backend
        tmp = None
        if b is not None and self.streamed:
            tokens = x.numel() // D
            if Sim.act_per_token:
                tmp = b.activation(Sim.act_per_token * tokens)  # freed when this forward returns
            b.read_later(self.name, self.lin.weight.detach(), Sim.expected[self.name])  # the GPU reads it later
        y = x + torch.tanh(self.lin(x))
        del tmp
        return y


class Stack(nn.Module):
    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block(f"blocks.{i}") for i in range(n))
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if Sim.backend is not None and Sim.kv_per_pass and self.blocks[0].streamed:
            Sim.kv.append(Sim.backend.activation(Sim.kv_per_pass))
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


UNIT = 8192  # one block's bytes in the store (weight and bias, each 4 KiB-aligned)


@pytest.fixture
def sim(monkeypatch):
    """Every unit through CudaStager on one simulated GPU; yields a function that makes it."""
    made: list[SimBackend] = []

    def make(model: Stack | None = None, **kw) -> SimBackend:
        b = SimBackend(**kw)
        made.append(b)
        Sim.backend = b
        if model is not None:
            Sim.expected = {blk.name: blk.lin.weight.detach().clone() for blk in model.blocks}
            for blk in model.blocks:
                blk.streamed = True
        monkeypatch.setattr(offload.placement, "_backend_for", lambda device: b)
        return b
    yield make
    Sim.backend, Sim.expected, Sim.act_per_token, Sim.kv_per_pass = None, {}, 0, 0
    Sim.kv = []
    for b in made:
        b.close()


# ------------------------------------------------------------------------------ the simulator itself


@pytest.mark.parametrize("prefetch", [1, 2])
def test_deferred_kernels_catch_a_free_event_recorded_too_early(prefetch, tmp_path, sim, monkeypatch, no_thread_leak):
    """The GPU's kernels read a slot after the host issued them. ``free`` recorded on the compute stream after
    them: every deferred read sees the store's bytes, and the host runs ahead of the GPU by the ring's slots.
    Recorded on the copy stream (the mistake the issue names, invisible to host-side kernels): the next copy
    overwrites the slot under a pending kernel, and the simulator counts wrong reads."""
    model = Stack(6)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    b = sim(model, compute_delay_s=0.004)

    def body(passes=3):
        with offload.enable(model, prefetch=prefetch, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False):
            for _ in range(passes):
                assert torch.equal(run(model, x), run(ref, x))
            b.compute.synchronize()
    no_hang(body)
    assert b.kernels_done == b.kernels_issued == 18 and b.bad_reads == []
    assert b.max_ahead >= prefetch + 1  # the host ran prefetch+1 units ahead of the GPU's kernels

    def early_done(self, unit):  # the mutation: the slot is "free" as soon as the copy stream says so
        slot = self._slot_of(unit)
        if slot is not None and slot.in_use:
            slot.free.record(self.copy_stream)
            slot.in_use = False
    monkeypatch.setattr(CudaStager, "done", early_done)
    no_hang(body)
    assert b.bad_reads, "the simulator did not see a slot overwritten under a pending kernel"


# ------------------------------------------------------------------------------ 2: out of memory


def test_out_of_memory_in_a_forward_gives_gpu_tier_units_back(tmp_path, sim, monkeypatch, caplog, no_thread_leak):
    """Default GPU budget (free memory minus a margin) with the margin too small for a long prompt: the forward
    that runs out of memory gives GPU-tier units back (one log line) and the same call then succeeds."""
    monkeypatch.setattr(offload.placement, "GPU_MARGIN_BYTES", 4 * UNIT)
    model = Stack(8)
    ref = copy.deepcopy(model)
    b = sim(model, free_bytes=16 * UNIT)  # ~12 units' room after the margin: all 8 kept
    Sim.act_per_token = 64
    short, long = torch.randn(4, D), torch.randn(1280, D)  # 256 B vs 10 units of activations per block (8 free)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        stager = h._hooks[0].stager
        assert len(stager.gpu_tier) == 8
        assert torch.equal(run(model, short), run(ref, short))
        with caplog.at_level(logging.WARNING, logger="offload"):
            with pytest.raises(torch.OutOfMemoryError):
                run(model, long)
        lines = [r.getMessage() for r in caplog.records if "gave back" in r.getMessage()]
        assert len(lines) == 1 and "out of memory in blocks." in lines[0], lines
        assert 0 < len(stager.gpu_tier) < 8 and stager.gave_back
        gc.collect()  # the simulated allocator frees on collection: the failed call's temporaries in a cycle
        assert torch.equal(run(model, long), run(ref, long))  # the call again: it fits now
        assert torch.equal(run(model, short), run(ref, short))
        b.compute.synchronize()
    assert b.bad_reads == []


def test_a_growing_forward_is_measured_and_units_given_back_before_it_runs_out(tmp_path, sim, monkeypatch, caplog,
                                                                                no_thread_leak):
    """What a forward allocates (measured per pass: the peak above what enable left allocated) must stay free:
    a KV cache growing each pass takes it, and GPU-tier units go back before any allocation fails."""
    monkeypatch.setattr(offload.placement, "GPU_MARGIN_BYTES", 3 * UNIT)
    model = Stack(8)
    ref = copy.deepcopy(model)
    b = sim(model, free_bytes=14 * UNIT)
    Sim.act_per_token, Sim.kv_per_pass = 64, UNIT // 2
    x = torch.randn(16, D)
    with caplog.at_level(logging.WARNING, logger="offload"):
        with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
            kept = len(h._hooks[0].stager.gpu_tier)
            for _ in range(10):  # 5 units' worth of "KV cache" by the end: never an out-of-memory error
                assert torch.equal(run(model, x), run(ref, x))
            assert len(h._hooks[0].stager.gpu_tier) < kept
    assert any("a forward needs" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ 3: graph capture


def test_graph_capture_is_refused_with_a_clear_error(tmp_path, sim, no_thread_leak):
    model = Stack(3)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    b = sim(model)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
        b.capture = True
        with pytest.raises(offload.OffloadError, match="capturing a graph"):
            run(model, x)
        b.capture = False
        assert torch.equal(run(model, x), run(ref, x)) and h._prefetcher.ring.holders() == 0


# ------------------------------------------------------------------------------ 4: a CUDA error on a reader thread


class _Gated(PythonReader):
    def __init__(self, victim: str):
        super().__init__()
        self.victim, self.gate, self.entered = victim, threading.Event(), threading.Event()

    def read(self, handle, offset, dest):
        if getattr(handle, "path", "").endswith(self.victim):
            self.entered.set()
            assert self.gate.wait(30)
        super().read(handle, offset, dest)


def test_a_cuda_error_on_a_reader_thread_neither_kills_it_nor_hangs_a_forward(tmp_path):
    """A CUDA error makes ``Event.query()`` raise. The first to see it is a reader thread re-planning after a
    cancelled read (``_finished`` -> ``_schedule`` -> a fenced slot's ``query``). Before, the exception left
    the reader thread's loop: the thread died, and with it every read queued behind (one reader thread
    here), so the next forward waiting on a read waited forever. Now the error goes on the load, the thread
    lives, and the forward that queries next raises it."""
    store = offload.convert(Stack(5), tmp_path / "s", progress=False)
    reader = _Gated(store.units[1].file)
    cfg = StagingConfig(prefetch=2, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=5,
                        io_threads=1)
    pf = Prefetcher(store, store.units, reader, cfg)
    b = SimBackend()
    copy_gate = threading.Event()
    try:
        lease = pf.acquire(0)  # slot A = 0; reads of 1 (held at the gate) and 2 queued
        assert reader.entered.wait(10)
        s = b.stream()
        s.enqueue(copy_gate.wait)  # the copy out of unit 0's host buffer has not run
        fence = b.event()
        fence.record(s)
        lease.release(after=fence)
        out: dict[str, BaseException] = {}

        def forward():  # 0 -> 3: the read of 1 is stale; unit 3 waits for its slot
            try:
                pf.acquire(3).release()
            except BaseException as e:  # noqa: BLE001
                out["error"] = e
        t = threading.Thread(target=forward, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not any(sl.reserved_for == 3 for sl in pf.ring.slots) and time.monotonic() < deadline:
            time.sleep(0.001)
        b.fail("CUDA error: an illegal memory access was encountered")
        reader.gate.set()  # the stale read finishes on the reader thread, which re-plans and queries
        t.join(15)
        assert not t.is_alive() and "illegal memory access" in str(out.get("error"))
        assert any(name.startswith("offload-io") for name in b.failed_queries)
        assert pf._workers.alive(), "the reader thread died of the CUDA error"
        b.broken = None  # the next forward needs unit 3, whose read was queued behind the failure
        no_hang(lambda: pf.acquire(3).release(), timeout_s=10)
    finally:
        reader.gate.set()
        copy_gate.set()
        pf.close()
        b.close()


# ------------------------------------------------------------------------------ 5: host registration


def test_only_the_host_ring_is_page_locked_beyond_the_cap(tmp_path, sim, monkeypatch, no_thread_leak):
    model = Stack(6)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    b = sim(model)
    monkeypatch.setattr(offload.transfer, "PIN_FRACTION", 0.0)  # no room for the RAM tier under the cap
    with offload.enable(model, prefetch=1, ram_tier=3 * UNIT, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
        assert h.stats().ram_tier_units == 3
        ring = h._prefetcher.ring.buffers()
        assert b.registered == len(ring) and all(buf.registered for buf in ring)
        assert not any(buf.registered for buf in h._prefetcher.ram_tier.values())
        assert torch.equal(run(model, x), run(ref, x))


def test_a_refused_registration_is_named_cleared_and_survived(tmp_path, sim, caplog, no_thread_leak):
    """cudaHostRegister refused (error 801, as under some sandboxes): enable goes on with pageable buffers,
    one warning names CUDA's reason (not ulimit), and CUDA's last error is cleared (else the next copy
    raises it)."""
    model = Stack(4)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    b = sim(model, register_error=801)
    with caplog.at_level(logging.WARNING, logger="offload"):
        with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False):
            assert b.cudart.last_error == 0
            for _ in range(2):
                assert torch.equal(run(model, x), run(ref, x))
            assert b.pageable_copies > 0
    msgs = [r.getMessage() for r in caplog.records if "stay pageable" in r.getMessage()]
    assert len(msgs) == 1 and "801: operation not supported" in msgs[0] and "ulimit" not in msgs[0]


def test_a_failed_unregister_is_reported_and_cleared(caplog):
    cudart = SimCudart(unregister_error=1)
    buf = HostBuffer(4096)
    offload.transfer.register_host_buffer(buf, cudart=cudart)
    assert buf.registered
    with caplog.at_level(logging.WARNING, logger="offload"):
        buf.close()
    assert cudart.last_error == 0 and not buf.registered
    assert any("cudaHostUnregister" in r.getMessage() and "invalid value" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ 6: dequantize temporaries


class LargestAllocation(TorchDispatchMode):
    """The largest tensor any operation creates (what a device allocator would have to find at once)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linear_off_the_cpu_kernels_dequantizes_in_chunks(scheme, monkeypatch):
    """On CUDA a quantized weight is dequantized for ``F.linear``; the dense float weight (1-2 GB for a 70B MLP
    matrix) must never exist at once: the temporaries stay within ``DEQUANT_CHUNK_BYTES``."""
    from offload import quant
    if scheme == "int4" and quant.int4_layout() == "unknown":
        pytest.skip("no int4 packing on this CPU")
    torch.manual_seed(0)
    n, k = 1024, 256
    w = torch.randn(n, k) / 16
    try:
        qw = quant.QuantizedWeight.from_float(w, scheme, 64)
    except ImportError as e:
        pytest.skip(f"quantizing needs {e.name}")
    bias = torch.randn(n)
    x = torch.randn(3, k)
    want = F.linear(x, qw.dequantize(), bias)
    monkeypatch.setattr(quant.tensor, "_cpu_kernels", lambda w: False)  # the path every non-CPU device takes
    monkeypatch.setattr(quant.tensor, "DEQUANT_CHUNK_BYTES", 128 << 10)  # 1/8 of this weight in fp32
    with LargestAllocation() as m:
        y = F.linear(x, qw, bias)
    assert torch.allclose(y, want, atol=1e-5)
    assert m.largest <= 128 << 10, f"a {m.largest}-byte temporary: the weight was dequantized whole"


# ------------------------------------------------------------------------------ 7: smaller ones


def test_speculative_timing_synchronises_cuda_before_each_clock(monkeypatch):
    from offload import speculate
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    clock = time.perf_counter
    monkeypatch.setattr(speculate.time, "perf_counter", lambda: events.append("clock") or clock())

    class OnCuda:  # input ids as seen on a GPU (no CUDA here)
        shape = (1, 3)
        device = torch.device("cuda", 0)
    ctl = speculate._Controller("ngram", speculate.SpecStats("ngram"), None, 8, 64)
    ctl.target_pre(None, (), {"input_ids": OnCuda()})
    ctl.target_post(None, (), {}, None)
    ctl.draft_pre(None, (), {"input_ids": OnCuda()})
    ctl.draft_post(None, (), {}, None)
    assert events == ["sync", "clock"] * 4


def test_gpu_tier_fills_from_page_locked_buffers_with_disk_and_copies_overlapped(tmp_path, sim, no_thread_leak):
    model = Stack(6)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    b = sim(model, copy_delay_s=0.02)
    spans: list[tuple[float, float]] = []

    class Slow(PythonReader):
        def read(self, handle, offset, dest):
            t0 = time.perf_counter()
            time.sleep(0.02)
            super().read(handle, offset, dest)
            spans.append((t0, time.perf_counter()))
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=6 * UNIT, store=tmp_path / "s", reader=Slow(),
                        progress=False) as h:
        assert len(h._hooks[0].stager.gpu_tier) == 6
        assert b.pageable_copies == 0, "the GPU tier was copied from pageable memory"
        assert any(r0 < c1 and c0 < r1 for r0, r1 in spans for c0, c1 in b.copy_spans), \
            "no read overlapped a copy: the tier was filled one unit at a time"
        assert torch.equal(run(model, x), run(ref, x))


def test_close_waits_for_the_kernels_still_reading_the_slots(tmp_path, sim, no_thread_leak):
    model = Stack(4)
    x = torch.randn(2, D)
    b = sim(model, compute_delay_s=0.05)
    h = offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False)
    run(model, x)
    assert b.compute.pending() > 0  # the GPU is behind
    h.disable()
    assert b.compute.pending() == 0, "device slots dropped while kernels still read them"
    assert b.bad_reads == []


def test_a_pass_on_the_gpu_is_timed_by_the_gpu_not_by_the_host(tmp_path, sim, no_thread_leak):
    """The host returns from a forward once its kernels are queued: the first GPU run measured 0.042 s
    per pass for 0.203 s per token. Passes are timed by events on the compute stream, read once they have
    completed, and reading the stats never waits for the GPU."""
    model = Stack(2)
    x = torch.randn(2, D)
    b = sim(model, compute_delay_s=0.1)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
        run(model, x)
        assert b.compute.pending() > 0  # the GPU is behind the host
        assert h.stats().passes == 1 and b.compute.pending() > 0  # stats did not wait for it
        b.compute.synchronize()
        assert h.stats().s_per_pass >= 2 * 0.1  # both kernels, not the host's time to queue them


def _moe(layers: int = 3):
    import transformers as tf
    from conftest import moe_config
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(moe_config("qwen3_moe", layers=layers, hidden=128)).eval()


def test_routed_experts_on_a_gpu_copy_only_the_routed_ones(tmp_path, sim, no_thread_leak):
    """On a GPU the experts are read on routing into the host tables as on the CPU, then only the routed
    ones are copied (late: the copy engine is slower than the host) to one device table; the logits are
    the model's, and the bytes copied are the routed experts', counted by the test's own hook."""
    from offload.experts import experts_modules
    model = _moe()
    ref = copy.deepcopy(model)
    ids = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])
    b = sim(None, copy_delay_s=0.002)
    seen: list[int] = []
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager = next(st for st in h._stagers if hasattr(st, "tables"))
        assert stager.device is not None  # the routed path, not whole blocks
        for m in model.modules():
            if any(name == "" for name, _, _ in experts_modules(m)):
                m.register_forward_pre_hook(lambda mod, args: seen.append(
                    len({int(x) for x in args[1].flatten().tolist()}) * sum(
                        p.numel() * p.element_size() // mod.num_experts for p in mod.parameters(recurse=False))))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                               ref.generate(ids, max_new_tokens=4, do_sample=False))
        assert seen and stager.device.bytes_copied == sum(seen)
        table = max(t.group.table.data_bytes for t in stager.tables.values())
        assert stager.device.data.numel() == table  # one table on the device, whatever the layer count
    assert b.pageable_copies > 0


def _routed_bytes_hook(model, seen: list[tuple[int, int]]) -> None:
    """A hook of the test's own on every experts module: (distinct experts routed, bytes per expert) per forward."""
    from offload.experts import experts_modules
    for m in model.modules():
        if any(name == "" for name, _, _ in experts_modules(m)):
            m.register_forward_pre_hook(lambda mod, args: seen.append((
                len({int(x) for x in args[1].flatten().tolist()}),
                sum(p.numel() * p.element_size() // mod.num_experts for p in mod.parameters(recurse=False)))))


def _dense_and_slot_bytes(model, tmp_path) -> tuple[int, int, int]:
    """(the carved blocks' bytes, an expert's slot in the GPU tier, whole blocks' bytes) of ``model``'s store."""
    from offload.experts.tables import slot_layout
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
        stager = next(st for st in h._stagers if hasattr(st, "tables"))
        dense = sum(r.data_bytes for r in h._prefetcher.units)
        slot = max(slot_layout(t.group)[1] for t in stager.tables.values())
    blocks = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    return dense, slot, blocks


def test_the_experts_gpu_tier_keeps_routed_experts_on_the_device(tmp_path, sim, no_thread_leak):
    """What gpu_tier= leaves beside the blocks keeps routed experts on the GPU across forwards: the same
    prompt again reads from disk and copies from the host only the experts the tier does not hold
    (counted by the test's own hook), and the logits are the model's with copies slower than the host."""
    model = _moe()
    ref = copy.deepcopy(model)
    ids = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])
    dense, slot, blocks = _dense_and_slot_bytes(model, tmp_path)
    sim(None, copy_delay_s=0.002)
    seen: list[tuple[int, int]] = []
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=blocks - 1, store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager = next(st for st in h._stagers if hasattr(st, "tables"))
        tier = stager.device.tier
        assert tier is not None and tier.slots == (blocks - 1 - dense) // slot > 0
        _routed_bytes_hook(model, seen)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
            first = stager.device.bytes_copied
            assert first == sum(n * eb for n, eb in seen)  # nothing held yet: every routed expert from the host
            h.reset_stats()
            seen.clear()
            assert torch.equal(model(ids).logits, ref(ids).logits)
        s = h.stats()
        routed = sum(n for n, _ in seen)
        eb = seen[0][1]
        assert 0 < s.expert_gpu_hits <= routed and s.expert_gpu_bytes == len(tier.slot) * slot
        assert s.expert_misses == routed - s.expert_gpu_hits  # the rest read from disk (no RAM cache: ram_tier=0)
        assert s.expert_bytes_read == s.expert_misses * eb
        assert stager.device.bytes_copied - first == s.expert_misses * eb  # and only those over PCIe


def test_the_experts_gpu_tier_reuses_its_slots_in_copy_order(tmp_path, sim, no_thread_leak):
    """A GPU tier of three slots under prompts that route to many more experts: slots are evicted and
    refilled every forward, each refill after the copies out of it (one copy stream, copies slower than
    the host), and the logits and greedy tokens stay the model's."""
    model = _moe()
    ref = copy.deepcopy(model)
    dense, slot, _ = _dense_and_slot_bytes(model, tmp_path)
    sim(None, copy_delay_s=0.001)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=dense + 3 * slot, store=tmp_path / "s",
                        progress=False) as h:
        tier = next(st for st in h._stagers if hasattr(st, "tables")).device.tier
        assert tier.slots == 3
        with torch.no_grad():
            for seed in range(4):
                ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(seed))
                assert torch.equal(model(ids).logits, ref(ids).logits)
                assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False),
                                   ref.generate(ids, max_new_tokens=3, do_sample=False))
        s = h.stats()
        assert s.expert_gpu_hits > 0 and tier.cache.evictions > 0 and len(tier.slot) == 3


@pytest.mark.parametrize("where", ["a block", "the head"])
def test_a_forward_short_of_memory_takes_the_experts_gpu_tier_back_first(where, tmp_path, sim, monkeypatch, caplog,
                                                                         no_thread_leak):
    """A forward that runs out of GPU memory, in a streamed block or in the resident head (outside every unit),
    gets it from the experts' GPU tier (its last chunks, their experts evicted) before any GPU-tier unit goes
    back to streaming; the same call then succeeds, exact."""
    from offload.experts import DeviceTier
    model = _moe()
    ref = copy.deepcopy(model)
    ids = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])
    dense, slot, _ = _dense_and_slot_bytes(model, tmp_path)
    monkeypatch.setattr(DeviceTier, "CHUNK_BYTES", 2 * slot)  # chunks of two slots
    monkeypatch.setattr(offload.placement, "GPU_MARGIN_BYTES", 0)  # the tier may take all that is free
    tier_bytes = dense + 8 * slot
    probe = sim(None)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=tier_bytes, store=tmp_path / "s", progress=False):
        used = probe.allocated()
    b = sim(None, free_bytes=used + 2 * slot)  # room for two experts' worth of temporaries
    grab = [0]

    def temporary(mod, args, out):
        if grab[0]:
            t = b.activation(grab[0])  # a forward's temporary, freed on return
            del t
    (model.model.layers[1].self_attn if where == "a block" else model.lm_head).register_forward_hook(temporary)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=tier_bytes, store=tmp_path / "s", progress=False) as h:
        stager = h._hooks[0].stager
        tier = next(st for st in h._stagers if hasattr(st, "tables")).device.tier
        assert tier.slots == 8 and len(tier.chunks) == 4 and len(stager.gpu_tier) == len(model.model.layers)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
            grab[0] = 5 * slot
            with caplog.at_level(logging.WARNING, logger="offload"), pytest.raises(torch.OutOfMemoryError):
                model(ids)
            lines = [r.getMessage() for r in caplog.records if "gave back" in r.getMessage()]
            assert len(lines) == 1 and "routed experts kept on the GPU" in lines[0], lines
            assert stager.gave_back == [] and tier.slots == 4 and len(tier.slot) <= 4
            assert tier.cache.budget == 4 * slot and tier.cache.used == len(tier.slot) * slot
            gc.collect()
            assert torch.equal(model(ids).logits, ref(ids).logits)  # the call again: it fits now
            assert len(tier.slot) == 4  # the four slots left are filled again


def test_the_experts_gpu_tier_takes_no_more_than_is_free(tmp_path, sim, monkeypatch, no_thread_leak):
    """gpu_tier= asks for more than the device has beside the units: the experts' tier takes what is free, and
    enable and the forwards go on (it used to fail allocating the rest)."""
    model = _moe()
    ref = copy.deepcopy(model)
    dense, slot, blocks = _dense_and_slot_bytes(model, tmp_path)
    monkeypatch.setattr(offload.placement, "GPU_MARGIN_BYTES", 0)
    probe = sim(None)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=dense, store=tmp_path / "s", progress=False):
        used = probe.allocated()  # the units' tier and the device table, no experts kept
    sim(None, free_bytes=used + 3 * slot)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=blocks - 1, store=tmp_path / "s", progress=False) as h:
        tier = next(st for st in h._stagers if hasattr(st, "tables")).device.tier
        assert 0 < tier.slots <= 3
        ids = torch.tensor([[3, 17, 42, 9]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)


def test_an_interrupt_before_a_slot_is_filled_leaves_it_empty(tmp_path, sim, no_thread_leak):
    """Ctrl-C landing between an expert's admission to the GPU tier and the copy into its slot: the slot holds
    nothing (no later forward takes its stale bytes for the expert), and the next call is exact."""
    model = _moe()
    ref = copy.deepcopy(model)
    ids = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])
    dense, slot, _ = _dense_and_slot_bytes(model, tmp_path)
    b = sim(None)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=dense + 40 * slot, store=tmp_path / "s",
                        progress=False, predict_experts=False) as h:
        tier = next(st for st in h._stagers if hasattr(st, "tables")).device.tier
        chunks = {c.data_ptr() for c in tier.chunks}
        real, armed = b.copy, [True]

        def copy_(stream, dst, src):
            if armed[0] and dst.untyped_storage().data_ptr() in chunks:
                armed[0] = False
                raise KeyboardInterrupt
            return real(stream, dst, src)
        b.copy = copy_
        with torch.no_grad():
            with pytest.raises(KeyboardInterrupt):
                model(ids)
            assert sorted(tier.free + list(tier.slot.values())) == list(range(tier.slots))
            assert set(tier.slot) == set(tier.cache.sizes) and tier.cache.used == len(tier.slot) * slot
            assert torch.equal(model(ids).logits, ref(ids).logits)


def test_gpu_memory_counts_the_routed_experts_device_table(tmp_path, sim, no_thread_leak):
    model = _moe()
    sim(None)
    with pytest.raises(offload.errors.OffloadError, match="routed experts' table"):
        offload.enable(model, prefetch=1, ram_tier=0, gpu_memory="1MiB", store=tmp_path / "s", progress=False)


def test_routed_experts_on_a_gpu_from_a_folder_are_aligned_and_exact(tmp_path, sim, no_thread_leak):
    """A folder read in place puts experts tensors at any 8-byte offset (GPT-OSS's at 8 mod 16); the device
    table holds each tensor on a page of its own, as CUDA's grouped_mm requires (16 bytes)."""
    import transformers as tf
    from conftest import moe_config
    from offload.experts import experts_modules
    arch = "gpt_oss" if hasattr(tf, "GptOssConfig") else "qwen3_moe"
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(moe_config(arch, layers=2, hidden=128)).eval().save_pretrained(tmp_path / "m")
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    sim(None)
    model, h = offload.load(tmp_path / "m", prefetch=1, ram_tier=0, gpu_tier=0, progress=False)
    ptrs: list[int] = []
    with h:
        assert next(st for st in h._stagers if hasattr(st, "tables")).device is not None
        for m in model.modules():
            if any(name == "" for name, _, _ in experts_modules(m)):
                m.register_forward_pre_hook(lambda mod, args: ptrs.extend(  # after offload's: bound
                    p.data_ptr() for p in mod.parameters(recurse=False)))
        ids = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
    assert ptrs and all(p and p % 16 == 0 for p in ptrs)


def test_the_device_table_is_not_taken_for_a_growing_forward(tmp_path, sim, no_thread_leak):
    """The device table is allocated before the GPU tier is loaded, so the stager's base includes it: a pass
    that fits gives no GPU-tier unit back (it used to count the whole table as the forward's growth)."""
    model = _moe(4)
    blocks = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    tier = blocks - 1  # whole blocks do not fit (so routed experts), every block without its experts does
    probe = sim(None)
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=tier, store=tmp_path / "s", progress=False):
        used = probe.allocated()
    b = sim(None, free_bytes=used + (512 << 10))
    ids = torch.tensor([[3, 17, 42, 9]])
    with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=tier, store=tmp_path / "s", progress=False) as h:
        stager = h._hooks[0].stager
        assert next(st for st in h._stagers if hasattr(st, "tables")).device is not None
        assert len(stager.gpu_tier) == 4
        with torch.no_grad():
            model(ids)
            model(ids)
        assert stager.gave_back == []
    assert b.free_bytes() > 0


def test_moe_blocks_that_fit_the_gpu_stay_whole_there(tmp_path, sim, caplog, no_thread_leak):
    model = _moe()
    sim(None)  # plenty of free memory
    with caplog.at_level(logging.INFO, logger="offload"):
        with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
            assert h._experts is None and len(h._hooks[0].stager.gpu_tier) == len(h._hooks)
    assert any("fits in the GPU tier" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ 1: the suite


def test_gpu_suite_plan_names_every_part_and_its_limit():
    out = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"), "--plan", "--device", "cpu",
                          "--venv", "/tmp/never-made", "--budget", "540"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for part in ("1. install", "2. prepare", "3. tests", "4. h2d", "5. disk", "6. bench"):
        assert part in out.stdout
    assert "venv /tmp/never-made: torch==2.9.1" in out.stdout and not os.path.exists("/tmp/never-made")


@pytest.mark.skipif(not os.environ.get("OFFLOAD_SUITE_DRY_RUN"), reason="minutes and PyPI: OFFLOAD_SUITE_DRY_RUN=1")
def test_gpu_suite_dry_run_from_a_fresh_venv(tmp_path):
    """The exact script, install included, on the CPU into a fresh venv (CPU torch wheel)."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), OFFLOAD_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"), "--device", "cpu", "--model",
                          "tiny-bloom", "--venv", str(tmp_path / "venv"), "--torch", "torch==2.13.0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "all parts passed" in out.stdout
    rows = (tmp_path / "out" / "bench-rows.jsonl").read_text().splitlines()
    assert len(rows) >= 3 and (tmp_path / "out" / "bench-rows.md").exists()
