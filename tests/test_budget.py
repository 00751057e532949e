"""The default memory budget: what a container allows (its own cgroup's limit or an ancestor's), and the
depth ``prefetch="auto"`` picks within it. Cgroup trees are written under tmp_path; nothing is measured."""
from __future__ import annotations

import types

import pytest

from offload import _memory, placement
from offload import tune as _tune
from offload.budget import plan_memory
from offload.errors import OffloadError


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_cgroups(monkeypatch, tmp_path, proc: str) -> object:
    monkeypatch.setattr(_memory, "_PROC_CGROUP", str(tmp_path / "proc-self-cgroup"))
    monkeypatch.setattr(_memory, "_CGROUP_ROOT", str(tmp_path / "cg"))
    write(tmp_path / "proc-self-cgroup", proc)
    return tmp_path / "cg"


def test_a_limit_on_a_parent_cgroup_binds(monkeypatch, tmp_path):
    """cgroup v2: the limit is on the slice (a systemd slice, a Kubernetes pod), the process's own cgroup has
    none; reading only its own said there was no limit, and the default budget planned past the OOM killer."""
    cg = fake_cgroups(monkeypatch, tmp_path, "0::/pod.slice/app\n")
    write(cg / "pod.slice/app/memory.max", "max\n")
    write(cg / "pod.slice/app/memory.current", str(100 << 20))
    write(cg / "pod.slice/memory.max", str(900 << 20))
    write(cg / "pod.slice/memory.current", str(300 << 20))
    assert _memory.cgroup_memory_headroom() == 600 << 20
    write(cg / "pod.slice/app/memory.max", str(500 << 20))  # the tighter of the two
    assert _memory.cgroup_memory_headroom() == 400 << 20


def test_a_v1_container_whose_own_cgroup_is_the_mount_root(monkeypatch, tmp_path):
    """cgroup v1 without a namespace (Docker): /proc/self/cgroup names /docker/<id>, but that cgroup is what
    is mounted at /sys/fs/cgroup/memory, so the joined path does not exist."""
    cg = fake_cgroups(monkeypatch, tmp_path, "4:memory:/docker/abc123\n0::/\n")
    write(cg / "memory/memory.limit_in_bytes", str(900 << 20))
    write(cg / "memory/memory.usage_in_bytes", str(200 << 20))
    assert _memory.cgroup_memory_headroom() == 700 << 20
    write(cg / "memory/memory.limit_in_bytes", str(1 << 62))  # v1's "no limit"
    assert _memory.cgroup_memory_headroom() is None


@pytest.mark.parametrize("measured", [True, False])
def test_auto_depth_keeps_the_ring_within_the_default_budget(monkeypatch, measured):
    """With the default budget (no cpu_memory) placing a depth never raises, so "auto" took any depth up to
    the deepest: a 900 MB container got a 784 MiB ring and was OOM-killed. A ring past the room is now too
    deep, whether a disk profile was measured or not (depth 1 always goes)."""
    unit = 100 << 20
    sizes = [unit] * 8
    room = 2 * unit + unit // 2  # free memory minus the margin: a ring of 2 slots fits (depth 1), 3 do not

    def placed(depth: int):
        return {}, set(), room, None, plan_memory(sizes, depth, ram_room=room), {}
    tuning = {"disk": object() if measured else None}
    seen = []

    def choose_plan(tuning, candidates, batch):  # a prediction that always prefers the deepest ring
        seen.extend(d for d, _ in candidates)
        return types.SimpleNamespace(prefetch=max(seen))
    monkeypatch.setattr(_tune, "choose_plan", choose_plan)
    depth, _ = placement._auto_depth(placed, tuning)
    slots, slot_bytes = plan_memory(sizes, depth, ram_room=room).host_ring
    assert slots * slot_bytes <= room and depth == 1
    assert seen == ([1] if measured else [])

    def tight(depth: int):  # not even depth 1's ring fits: depth 1 all the same (the least a run needs)
        return {}, set(), 0, None, plan_memory(sizes, depth, ram_room=0), {}
    seen.clear()
    assert placement._auto_depth(tight, tuning)[0] == 1

    def explicit(depth: int):  # an explicit cpu_memory too small still raises in placed, as before
        if depth > 2:
            raise OffloadError("too small")
        return {}, set(), None, None, plan_memory(sizes, depth, ram_room=None), {}
    seen.clear()
    assert placement._auto_depth(explicit, tuning)[0] == 2


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1])
def test_a_byte_size_that_is_no_size_is_a_value_error(value):
    """cpu_memory=float('inf') raised int()'s OverflowError, nan its ValueError about converting NaN."""
    with pytest.raises(ValueError, match="finite number >= 0"):
        _memory.parse_bytes(value)


def test_the_minimum_cpu_memory_an_error_names_is_enough(no_thread_leak):
    """The error named the minimum rounded down to two decimals (736.62 KiB for 736.625): passing it back
    was refused again. It now names the bytes."""
    import re

    import offload
    from conftest import make_model
    model = make_model("opt")
    with pytest.raises(OffloadError, match="the minimum is") as e:
        offload.enable(model, prefetch=1, cpu_memory=1000, progress=False)
    least = int(re.search(r"the minimum is (\d+) bytes", str(e.value)).group(1))
    offload.enable(model, prefetch=1, cpu_memory=least, progress=False).disable()


def test_at_the_minimum_the_ring_and_tier_stay_within_the_budget_when_units_differ_in_size(tmp_path, monkeypatch,
                                                                                           no_thread_leak):
    """Leaving the routed experts their reads before the RAM tier could fit no split of units of different sizes
    (a dense first layer): the tier came out empty and the ring of the largest unit's slots went past the budget.
    The budget comes first; the reads are then split."""
    import re

    import torch
    import transformers as tf

    import offload
    import offload.runtime as rt
    from conftest import moe_config
    placed = []
    place = rt.place
    monkeypatch.setattr(rt, "place", lambda *a, **k: placed.append(place(*a, **k)) or placed[-1])
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(moe_config("deepseek_v3", layers=4, hidden=128)).save_pretrained(tmp_path / "d")
    with pytest.raises(OffloadError) as e:
        offload.load(tmp_path / "d", cpu_memory=1000, prefetch=2, progress=False, tune=False)
    least = int(re.search(r"the minimum is (\d+) bytes", str(e.value)).group(1))
    for budget in (least, least + 50_000):
        model, h = offload.load(tmp_path / "d", cpu_memory=budget, prefetch=2, progress=False, tune=False)
        h.disable()
        p = placed[-1]
        assert p.plan.bytes_of(p.plan.ram_tier) + p.config.ring_bytes <= p.room, budget
