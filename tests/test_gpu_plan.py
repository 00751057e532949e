"""The GPU side of ``offload run`` that needs no GPU: device refusal, GPU-budget plan arithmetic, --trace."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from offload.cli.options import UsageError
from offload.cli.run import Target, check_budget, plan_table

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_run_device_cuda_without_cuda_is_one_line_exit_2(device, tmp_path):
    env_cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "offload.cli", "run", "--random", "tiny-bloom", "--device", device],
                       capture_output=True, text=True, env={"OFFLOAD_CACHE": str(env_cache), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "--device cpu" in lines[0]
    assert not env_cache.exists() or not any(env_cache.rglob("*.safetensors"))  # refused before any work


def test_bad_device_name_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "offload.cli", "run", "--random", "tiny-bloom", "--device", "tpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a device" in r.stderr


def _rows(table: str) -> dict[str, tuple[str, str, int]]:
    out = {}
    for line in table.splitlines()[1:-1]:
        name = line[:36].strip()
        where, size, unit, units = line[36:].split()
        out[name] = (where, f"{size} {unit}", int(units))
    return out


MiB = 1 << 20


def test_plan_table_with_a_gpu_budget():
    """10 units of 100 MiB, 50 MiB resident, prefetch 2: gpu_memory = resident + device ring + 4 units puts 4
    units in the GPU tier; cpu_memory = host ring + 2 units keeps 2 in RAM; 4 stream from disk."""
    t = Target("store", "/x", torch.float16, [100 * MiB] * 10, 50 * MiB, "x")
    table = plan_table(t, cpu_memory=(3 + 2) * 100 * MiB, prefetch=2, device="cuda:0",
                       gpu_memory=50 * MiB + (3 + 4) * 100 * MiB)
    rows = _rows(table)
    assert rows["resident (embeddings, norms, head)"] == ("GPU", "50.00 MiB", 1)
    assert rows["GPU tier (copied once)"] == ("GPU", "400.00 MiB", 4)
    assert rows["device slot ring (prefetch 2 + 1)"] == ("GPU", "300.00 MiB", 3)
    assert rows["RAM tier (read once)"] == ("RAM", "200.00 MiB", 2)
    assert rows["streamed from disk, per token"] == ("disk", "400.00 MiB", 4)
    assert rows["host staging ring (prefetch 2 + 1)"] == ("RAM", "300.00 MiB", 3)
    assert "cuda:0 for weights 750.00 MiB (--gpu-memory 750.00 MiB)" in table.splitlines()[-1]


def test_plan_table_on_the_cpu_has_no_gpu_rows():
    t = Target("store", "/x", torch.float32, [100 * MiB] * 4, 50 * MiB, "x")
    rows = _rows(plan_table(t, cpu_memory=50 * MiB + 2 * 100 * MiB, prefetch=1, device="cpu"))
    assert rows["resident (embeddings, norms, head)"][0] == "RAM"
    assert not any("GPU" in name for name in rows)
    assert rows["RAM tier (read once)"][2] == 0 and rows["streamed from disk, per token"][2] == 4


def test_gpu_budget_below_resident_plus_device_ring_names_the_minimum():
    t = Target("store", "/x", torch.float16, [100 * MiB] * 10, 50 * MiB, "x")
    with pytest.raises(UsageError, match=r"--gpu-memory 300.00 MiB is below the 350.00 MiB .* pass --gpu-memory 350MiB"):
        check_budget(t, None, 2, "cuda:0", 300 * MiB)
    check_budget(t, None, 2, "cuda:0", 350 * MiB)
    # on the GPU the host holds only the ring: the resident weights are not counted against --cpu-memory
    with pytest.raises(UsageError, match=r"below the 300.00 MiB .*host staging ring"):
        check_budget(t, 299 * MiB, 2, "cuda:0", None)
    check_budget(t, 300 * MiB, 2, "cuda:0", None)
    with pytest.raises(UsageError, match=r"below the 350.00 MiB"):
        check_budget(t, 300 * MiB, 2, "cpu", None)


def test_run_trace_on_the_cpu(tmp_path):
    trace = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "offload.cli", "run", "--random", "tiny-bloom", "--device", "cpu",
                        "--max-new-tokens", "3", "--cpu-memory", "64MiB", "--trace", str(trace), "-q"],
                       capture_output=True, text=True, env={"OFFLOAD_CACHE": str(tmp_path / "cache"),
                                                            "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    cats = {e["cat"] for e in events if e["ph"] == "X"}
    assert {"read", "forward"} <= cats


def test_plan_table_counts_the_routed_experts_device_table(monkeypatch):
    """6 blocks of 100 MiB of which 80 MiB are routed experts: 20 MiB stream per block, and on a GPU one
    layer's experts (80 MiB) sit in the device table, before the GPU tier takes what is left; what that leaves
    keeps experts on the GPU."""
    from offload.cli import run as run_cli
    from offload.experts import RoutedPlan
    monkeypatch.setattr(run_cli, "_routed", lambda t: RoutedPlan([80 * MiB] * 6, [10 * MiB] * 6, 2))
    t = Target("store", "/x", torch.float16, [100 * MiB] * 6, 50 * MiB, "x")
    gpu = 50 * MiB + 3 * 20 * MiB + 80 * MiB + 20 * MiB  # resident + device ring + table + one unit
    table = plan_table(t, cpu_memory=1 << 30, prefetch=2, device="cuda:0", gpu_memory=gpu)
    row = {x[:36].strip(): x[36:].split() for x in table.splitlines()}
    assert row["experts' device table (one layer)"] == ["GPU", "80.00", "MiB", "1"]
    assert row["GPU tier (copied once)"] == ["GPU", "20.00", "MiB", "1"]
    assert row["experts kept on the GPU"] == ["GPU", "0", "B", "0"]
    # 35 MiB more: a second block (20 MiB) in the GPU tier, and one expert's 10 MiB beside it (experts.DeviceTier)
    row = {x[:36].strip(): x[36:].split() for x in plan_table(t, cpu_memory=1 << 30, prefetch=2, device="cuda:0",
                                                              gpu_memory=gpu + 35 * MiB).splitlines()}
    assert row["GPU tier (copied once)"] == ["GPU", "40.00", "MiB", "2"]
    assert row["experts kept on the GPU"] == ["GPU", "10.00", "MiB", "1"]
    with pytest.raises(UsageError, match="routed experts' device table 80.00 MiB"):
        check_budget(t, None, 2, device="cuda:0", gpu_memory=gpu - 21 * MiB)
    check_budget(t, None, 2, device="cuda:0", gpu_memory=gpu - 20 * MiB)  # the GPU tier may be empty
