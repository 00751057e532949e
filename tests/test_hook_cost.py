"""What made a unit's hooks cheaper (issue 17) must not cost a protection.

A CPU unit in the RAM tier computes from the same buffer every forward, owned by the RAM tier for the
handle's life, so its Parameters keep their views between forwards and a forward only swaps table
entries (``UnitHook._kept``). These tests pin what that may not change: the module holds the stand-in
between forwards (in-place writes refused, ``requires_grad_()`` reaching the next forward), a streamed
unit's Parameter holds nothing between forwards (its ring slot is the next unit's), and ``disable``
leaves no view of the handle's buffers in the hooks. Timing is the benchmark's
(``benchmarks/bench_hook_overhead.py``), not a test's.
"""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import offload
from offload.hooks import Offloaded
from test_staging import D, Stack, run


def test_between_forwards_a_ram_tier_unit_keeps_its_views_and_a_streamed_one_holds_nothing(tmp_path, no_thread_leak):
    model = Stack(6)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    weights = [b.lin.weight for b in model.blocks]  # the user's own Parameters: enable keeps their identity
    with offload.enable(model, prefetch=1, ram_tier="12KiB", store=tmp_path / "s", progress=False) as h:
        tier = set(h._prefetcher.ram_tier)
        assert 0 < len(tier) < len(model.blocks)
        for _ in range(3):  # the first forward binds in full, the next ones take the kept path
            assert torch.equal(run(model, x), run(ref, x))
            for i, (block, w) in enumerate(zip(model.blocks, weights)):
                assert isinstance(block.lin._parameters["weight"], Offloaded)
                if i in tier:
                    assert torch.equal(w.detach(), ref.blocks[i].lin.weight.detach())
                else:  # a view kept here would show the next unit's bytes once its slot is reused
                    assert w.numel() == 0, f"streamed unit {i} holds its ring slot between forwards"


@pytest.fixture
def all_in_ram_tier(tmp_path, no_thread_leak):
    """A 3-unit stack, every unit in the RAM tier, after two forwards (so the next takes the kept path)."""
    model = Stack(3)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    with offload.enable(model, prefetch=1, store=tmp_path / "s", progress=False) as h:
        assert h.stats().ram_tier_units == 3
        for _ in range(2):
            run(model, x)
        yield model, ref, x, h


def test_a_ram_tier_unit_still_refuses_in_place_writes_and_takes_requires_grad(all_in_ram_tier):
    model, ref, x, _ = all_in_ram_tier
    w = model.blocks[1].lin.weight
    with pytest.raises(offload.OffloadError, match="in place"):
        with torch.no_grad():
            w.add_(1.0)
    inside = []
    probe = model.blocks[1].lin.register_forward_pre_hook(lambda m, a: inside.append(m.weight.requires_grad))
    model.requires_grad_(False)
    assert torch.equal(run(model, x), run(ref, x))
    model.requires_grad_(True)
    assert torch.equal(run(model, x), run(ref, x))
    probe.remove()
    assert inside == [False, True]


def test_a_failed_forward_of_a_ram_tier_unit_puts_the_stand_ins_back(all_in_ram_tier):
    model, ref, x, h = all_in_ram_tier

    def fail(module, args):
        raise RuntimeError("inside the unit")
    hk = model.blocks[1].out.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="inside the unit"):
        run(model, x)
    hk.remove()
    assert not h._hooks[1].bound
    assert all(isinstance(t, Offloaded) for m in model.blocks[1].modules() for t in m._parameters.values())
    assert torch.equal(run(model, x), run(ref, x))


def test_disable_leaves_no_view_of_the_handles_buffers_in_the_hooks(tmp_path, no_thread_leak):
    """A handle kept after ``disable`` (a variable, a traceback) must not keep the ring's memory mapped
    through views the hooks cached, nor a RAM-tier view in a Parameter."""
    model = Stack(6)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    h = offload.enable(model, prefetch=1, ram_tier="12KiB", store=tmp_path / "s", progress=False)
    for _ in range(2):
        run(model, x)
    ring = [weakref.ref(s.buffer._mm) for s in h._prefetcher.ring.slots]
    h.disable()
    gc.collect()
    assert all(r() is None for r in ring), "a ring buffer is still mapped after disable"
    assert all(b.held is None and not b.views for hk in h._hooks for b in hk.bindings)
    assert torch.equal(run(model, x), run(ref, x))  # and the user's Parameters have their values back
