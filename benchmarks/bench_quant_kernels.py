"""CPU kernels for weight-only int8 / int4 linears, and their quality against torchao's own quantization.

Speed: for the bloom-1b7 MLP shapes (2048 -> 8192 and 8192 -> 2048) and 1, 8 and 32 rows, the time
per call of fp32 and bf16 ``F.linear``, the aten int8 / int4 weight-only kernels with bf16 and fp32
activations, dequantize-then-matmul (the whole weight), offload's chunked int8 dequantize+matmul, and
``F.linear`` on ``offload.quant.QuantizedWeight`` (the path the runtime takes: dispatch included).
Each method rotates through copies of its weights that together exceed the L3 cache twice (a streamed
weight comes from a buffer just read, not from cache), the methods run alternately, and each figure is
the median of ``--repeats`` calls.

Quality: random weights (normal, std 0.02) and random inputs; max and RMS error against the fp32
``F.linear`` of the unquantized weights, for offload's int8/int4 and for torchao's
``quantize_(model, Int8WeightOnlyConfig())`` / ``PrototypeInt4WeightOnlyConfig(group_size=g)`` (torchao
0.18's CPU int4: ``Int4WeightOnlyConfig`` needs the CUDA-only mslk kernels), with fp32 and bf16 models.

    python benchmarks/bench_quant_kernels.py [--json out.json] [--repeats 9] [--rows 1,8,32]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from offload import quant

SHAPES = {"h_to_4h 2048->8192": (8192, 2048), "4h_to_h 8192->2048": (2048, 8192)}
WARMUP_S = 4.0  # measured here: the first 2-3 s after allocating the copies, a cold read of them can take 40x longer
COLD_BYTES = 96 << 20  # > 2x the 32 MiB L3 of the machine measured (rotate more copies on a bigger cache: --cold)
aten = torch.ops.aten


def rotating(tensors: dict[str, torch.Tensor], cold_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Enough copies of a weight's tensors that cycling through them misses the cache."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    n = max(2, math.ceil(cold_bytes / nbytes))
    return [tensors] + [{k: t.clone() for k, t in tensors.items()} for _ in range(n - 1)]


def timed(methods: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and minimum ms per call, the methods alternating (the minimum is the figure least skewed by other
    work on a shared machine)."""
    t_end, rounds = time.perf_counter() + WARMUP_S, 0
    while rounds < 2 or time.perf_counter() < t_end:  # untimed: freshly allocated copies read slowly for a few s
        for f in methods.values():
            f()
        rounds += 1
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, f in methods.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v) * 1e3, "min": min(v) * 1e3} for k, v in times.items()}


def cycle(copies: list[Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt() -> Any:
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return nxt


def speed(rows: list[int], repeats: int, group_size: int, cold: int, chunk_sweep: bool) -> list[dict[str, Any]]:
    out = []
    g = torch.Generator().manual_seed(0)
    for label, (n, k) in SHAPES.items():
        w32 = torch.randn(n, k, generator=g) * 0.02
        w16 = w32.bfloat16()
        q8f = quant.quantize_linear(w32, "int8")
        q8b = quant.quantize_linear(w16, "int8")
        q4f = quant.quantize_linear(w32, "int4", group_size)
        q4b = quant.quantize_linear(w16, "int4", group_size)
        sets = {"w32": rotating({"w": w32}, cold), "w16": rotating({"w": w16}, cold), "q8f": rotating(q8f, cold),
                "q8b": rotating(q8b, cold), "q4f": rotating(q4f, cold), "q4b": rotating(q4b, cold)}
        sets["sz32"] = [{**t, "scales_and_zeros": t["scales_and_zeros"].float()} for t in sets["q4f"]]
        nxt = {key: cycle(v) for key, v in sets.items()}
        qws = {key: cycle([quant.from_stored(t, (n, k), dt, scheme, group_size) for t in sets[key]])
               for key, dt, scheme in [("q8f", torch.float32, "int8"), ("q8b", torch.bfloat16, "int8"),
                                       ("q4f", torch.float32, "int4"), ("q4b", torch.bfloat16, "int4")]}

        def on(key: str, fn: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[], Any]:
            return lambda: fn(nxt[key]())

        for m in rows:
            x32 = torch.randn(m, k, generator=g)
            x16 = x32.bfloat16()

            def deq8(x: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], Any]:
                return lambda t: F.linear(x, t["qweight"].to(x.dtype) * t["scales"].to(x.dtype)[:, None])

            def k8(x: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], Any]:
                return lambda t: aten._weight_int8pack_mm(x, t["qweight"], t["scales"])

            def k4(x: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], Any]:
                return lambda t: aten._weight_int4pack_mm_for_cpu(x, t["qweight"], group_size, t["scales_and_zeros"])

            def chunked8(x: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], Any]:
                return lambda t: quant._int8_chunked(x, t["qweight"], t["scales"])

            methods: dict[str, Callable[[], Any]] = {
                "fp32 F.linear": on("w32", lambda t: F.linear(x32, t["w"])),
                "bf16 F.linear": on("w16", lambda t: F.linear(x16, t["w"])),
                "int8 kernel bf16": on("q8b", k8(x16)),
                "int8 kernel fp32": on("q8f", k8(x32)),
                "int8 dequant+matmul bf16": on("q8b", deq8(x16)),
                "int8 dequant+matmul fp32": on("q8f", deq8(x32)),
                "int8 chunked fp32": on("q8f", chunked8(x32)),
                "int8 chunked bf16": on("q8b", chunked8(x16)),
                "int4 kernel bf16": on("q4b", k4(x16)),
                "int4 kernel fp32": on("sz32", k4(x32)),
                "int4 dequant+matmul bf16": lambda: F.linear(x16, qws["q4b"]().dequantize()),
                "QuantizedWeight int8 bf16": lambda: F.linear(x16, qws["q8b"]()),
                "QuantizedWeight int8 fp32": lambda: F.linear(x32, qws["q8f"]()),
                "QuantizedWeight int4 bf16": lambda: F.linear(x16, qws["q4b"]()),
                "QuantizedWeight int4 fp32": lambda: F.linear(x32, qws["q4f"]()),
            }
            if chunk_sweep:  # how CHUNK_ELEMS was chosen
                for c in (1, 2, 4, 8):
                    def sized(t: dict[str, torch.Tensor], c: int = c) -> torch.Tensor:
                        old, quant.tensor.CHUNK_ELEMS = quant.tensor.CHUNK_ELEMS, c << 20  # read there
                        try:
                            return chunked8(x32)(t)
                        finally:
                            quant.tensor.CHUNK_ELEMS = old
                    methods[f"int8 chunked fp32, {c} Mi weights/chunk"] = on("q8f", sized)
            res = timed(methods, repeats)
            out.append({"shape": label, "out_features": n, "in_features": k, "rows": m, "ms": res})
            print(f"{label}  rows={m}", flush=True)
            for key, v in res.items():
                print(f"    {key:<40} {v['median']:9.3f} ms  (min {v['min']:.3f})")
    return out


def errors(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = y.double() - ref.double()
    return {"max": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item()}


def quality(group_sizes: list[int], batch: int) -> dict[str, Any]:
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    res: dict[str, Any] = {"rows": []}
    try:
        probe = nn.Linear(128, 64, bias=False)
        quantize_(probe, Int4WeightOnlyConfig(group_size=64))
        probe(torch.randn(2, 128))
        res["Int4WeightOnlyConfig on CPU"] = "works"
    except Exception as e:  # noqa: BLE001 - the reason is the figure
        res["Int4WeightOnlyConfig on CPU"] = f"{type(e).__name__}: {e}"
    g = torch.Generator().manual_seed(1)
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(batch, k, generator=g)
        ref = F.linear(x, w)
        configs = [("int8", 0, lambda: Int8WeightOnlyConfig())]
        configs += [("int4", gs, (lambda gs=gs: PrototypeInt4WeightOnlyConfig(group_size=gs))) for gs in group_sizes]
        for scheme, gs, cfg in configs:
            for dt in (torch.float32, torch.bfloat16):
                lin = nn.Linear(k, n, bias=False)
                lin.weight.data = w.to(dt)
                ao = copy.deepcopy(lin)
                quantize_(ao, cfg())
                with torch.no_grad():
                    y_ao = ao(x.to(dt))
                    y_us = F.linear(x.to(dt), quant.QuantizedWeight.from_float(w.to(dt), scheme, gs or 64))
                e_ao, e_us = errors(y_ao, ref), errors(y_us, ref)
                row = {"shape": label, "scheme": scheme, "group_size": gs or None,
                       "dtype": str(dt).replace("torch.", ""),
                       "torchao": e_ao, "offload": e_us, "torchao_class": type(ao.weight).__name__,
                       "ratio_max": e_us["max"] / e_ao["max"], "ratio_rms": e_us["rms"] / e_ao["rms"]}
                row["within_1.05"] = row["ratio_max"] <= 1.05 and row["ratio_rms"] <= 1.05
                res["rows"].append(row)
                print(f"{label:<20} {scheme} g={gs or '-':<4} {row['dtype']:<9} torchao max {e_ao['max']:.5f} rms "
                      f"{e_ao['rms']:.6f} | offload max {e_us['max']:.5f} rms {e_us['rms']:.6f} | ratio max "
                      f"{row['ratio_max']:.3f} rms {row['ratio_rms']:.3f}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size for the speed rows")
    ap.add_argument("--quality-group-sizes", default="32,64,128")
    ap.add_argument("--quality-rows", type=int, default=64, help="input rows for the quality rows")
    ap.add_argument("--cold", default=str(COLD_BYTES), help="bytes of weight copies each method cycles through")
    ap.add_argument("--chunk-sweep", action="store_true",
                    help="also time the int8 fp32 path at 1/2/4/8 Mi weights per chunk")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    a = ap.parse_args()
    report: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "int4_layout": quant.int4_layout(),
    }
    try:
        import torchao
        report["torchao"] = torchao.__version__
    except ImportError:
        print("bench_quant_kernels: needs torchao", file=sys.stderr)
        return 2
    report["loadavg_before"] = os.getloadavg()
    print(f"torch {report['torch']}, torchao {report['torchao']}, {report['threads']} threads, "
          f"{report['cpu_capability']}, int4 layout {report['int4_layout']}, "
          f"load average {report['loadavg_before'][0]:.2f} "
          "(other work on the machine skews the figures)")
    if not a.skip_speed:
        rows = [int(r) for r in a.rows.split(",")]
        report["speed"] = speed(rows, a.repeats, a.group_size, int(a.cold), a.chunk_sweep)
    if not a.skip_quality:
        report["quality"] = quality([int(g) for g in a.quality_group_sizes.split(",")], a.quality_rows)
    report["loadavg_after"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
