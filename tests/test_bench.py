"""``offload bench`` on the CPU: the --device refusal, the GPU + CPU / GPU + disk device maps, a trace and JSON."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_model
from offload.cli import main
from offload.plan import disk_device_map, find_units


def _err_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_device_cuda_without_cuda_is_one_line_exit_2_before_anything_is_written(device, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    work, out = tmp_path / "work", tmp_path / "r.json"
    code = main(["bench", "--random", "tiny-bloom", "--device", device, "--gpu-memory", "4GiB",
                 "--workdir", str(work), "--json", str(out), "--trace", str(tmp_path / "t.json")])
    err = _err_lines(capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("offload bench: error:") and "--device" in err[0]
    assert "CUDA is not available" in err[0] and "use --device cpu" in err[0]
    assert sorted(os.listdir(tmp_path)) == []  # no workdir, no JSON, no trace
    assert os.listdir(os.environ["OFFLOAD_CACHE"]) == []  # no random checkpoint either


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", ""])
def test_bad_device_name_is_one_line_exit_2(device, capsys):
    assert main(["bench", "--random", "tiny-bloom", "--device", device]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "--device" in err[0] and "use cpu, cuda or cuda:N" in err[0]


def test_device_maps_gpu_plus_cpu_and_gpu_plus_disk():
    from accelerate.utils import check_device_map
    model = make_model("bloom")
    blocks = [n for n, _ in find_units(model)]
    assert blocks == [f"transformer.h.{i}" for i in range(4)]
    rest = {"transformer.word_embeddings", "transformer.word_embeddings_layernorm", "transformer.ln_f", "lm_head"}

    default = disk_device_map(model, blocks)  # unchanged: blocks on disk, the rest on the CPU
    assert default == disk_device_map(model, blocks, rest="cpu", offloaded="disk")
    assert {k for k, v in default.items() if v == "disk"} == set(blocks) and set(default) == set(blocks) | rest
    assert {v for k, v in default.items() if k not in blocks} == {"cpu"}

    gpu_cpu = disk_device_map(model, blocks, rest=0, offloaded="cpu")  # Accelerate's GPU + CPU offload
    gpu_disk = disk_device_map(model, blocks, rest="cuda:0")  # and its GPU + disk offload
    assert gpu_cpu == {**{b: "cpu" for b in blocks}, **{k: 0 for k in rest}}
    assert gpu_disk == {**{b: "disk" for b in blocks}, **{k: "cuda:0" for k in rest}}
    assert disk_device_map(model, blocks, rest=torch.device("cuda", 1)) == {**{b: "disk" for b in blocks},
                                                                          **{k: "cuda:1" for k in rest}}
    for m in (default, gpu_cpu, gpu_disk):
        check_device_map(model, m)  # every parameter and buffer placed exactly once

    # units deeper than a top-level child: their parents are split, their siblings follow `rest`
    deep = disk_device_map(model, ["transformer.h.1.mlp"], rest=0, offloaded="cpu")
    assert deep["transformer.h.1.mlp"] == "cpu" and deep["transformer.h.1.self_attention"] == 0
    assert deep["transformer.h.0"] == 0 and "transformer.h.1" not in deep
    check_device_map(model, deep)


def test_bench_cpu_writes_a_chrome_trace_and_json(tmp_path, capsys, no_thread_leak):
    trace, report, work = tmp_path / "trace.json", tmp_path / "bench.json", tmp_path / "work"
    code = main(["bench", "--random", "tiny-bloom", "--device", "cpu", "--runs", "offload", "--prefetch", "1",
                 "--new-tokens", "2", "--workdir", str(work), "--trace", str(trace), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| offload prefetch=1 | cold | 1 |" in out and "| ms/token (median) | bs=1 |" in out
    assert f"trace: {trace}" in out

    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all({"name", "cat", "pid", "tid", "ts", "dur"} <= set(e) and e["dur"] >= 0 for e in spans)
    assert {e["tid"] for e in spans} <= set(tracks)
    cats = {e["cat"] for e in spans}
    assert {"read", "forward"} <= cats
    assert any(name.startswith("offload-io") for name in tracks.values())  # the reader threads' own track(s)

    r = json.loads(report.read_text())
    assert r["device"] == "cpu" and r["model"] == "tiny-bloom" and r["blocks"] == 4
    assert r["trace"] == {"file": str(trace), "row": "offload prefetch=1 cold bs=1"}
    rows = {(x["run"], x["cache"]): x for x in r["rows"]}
    assert set(rows) == {("offload prefetch=1", "cold"), ("offload RAM tier (default budget)", "warm")}
    cold = rows["offload prefetch=1", "cold"]
    assert len(cold["samples"]) == 1 and cold["same_tokens"] and cold["trace"] == str(trace)
    assert cold["streamed_bytes_per_token"] == r["block_bytes"] and cold["disk_bps"] > 0 and cold["ideal_s"] > 0
    assert "pcie_gbps" not in cold and "gpu_peak_bytes" not in cold  # CUDA-only fields
    assert not [f for f in os.listdir(work) if f.startswith(("offload-disk-floor-", "offload-fio-"))]  # test files removed
