"""prefetch="auto", predicted vs measured: one model in fp32, bf16, int8 and int4, every block streamed cold
(and fp32 again with part of it in a RAM tier), beside fio's floor, in one run.

Per row: ``offload tune``'s steps (the disk measured once per disk, reader and unit size, with the run's
own reader on the model's own files; a short cold generation whose decode compute is cached), then a
fresh ``offload.load(prefetch="auto")`` that plans from those measurements: its prediction is taken
before the measured decode starts. Like any plan, it also uses the measured / predicted of the disk-bound
runs before it on the same disk and unit size within the hour, once there are two
(``DiskProfile.drift``): the tuning step's own generation and earlier rows are such runs, as
``offload tune`` and then ``offload run`` would be. Measured: median seconds per decode token, cold (every file of the
store and checkpoint evicted before each forward, untimed), in ``--pairs`` decode chunks alternated with
fio. Floors: bytes read per token over fio's best O_DIRECT rate on the same disk (hugetlbfs buffers when
a mount is there or can be made), for each chunk the better of the fio runs right before and right after
it (this shared disk drifts by 20-50% within minutes), and the same store with every unit in RAM (the
compute floor, warm). "cold / max(floors)" is the median of the chunks' ratios (MEASURING.md, rule 3).

    python benchmarks/bench_tune.py --random bloom-1b7 --json bench-out/tune.json
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import offload
from offload import measure
from offload.cli.bench import decode_times
from offload.cli.benchdisk import hugetlbfs_dir, run_fio
from offload.cli.models import random_checkpoint
from offload.config import cache_dir
from offload.convert import cached_store

# The quantized variants compute in bf16 (PyTorch's CPU weight-only kernels are vectorized for bf16).
VARIANTS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
            "int4": (torch.bfloat16, "int4")}
PROMPT = torch.tensor([[(17 * i + 3) % 1000 for i in range(16)]])


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def ensure_hugetlbfs() -> str | None:
    """A hugetlbfs mount for fio's buffers (as root, one is made under /tmp when none exists)."""
    d = hugetlbfs_dir()
    if d is not None or os.geteuid() != 0:
        return d
    mnt = "/tmp/offload-bench-huge"
    os.makedirs(mnt, exist_ok=True)
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            have = int(f.read())
        if have < 64:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write("64")
        subprocess.run(["mount", "-t", "hugetlbfs", "none", mnt], check=True, capture_output=True)
        log(f"mounted hugetlbfs at {mnt} (vm.nr_hugepages >= 64) for fio's buffers; `umount {mnt}` removes it")
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        log(f"no hugetlbfs for fio ({e}); fio's buffers are 4 KiB pages")
    return hugetlbfs_dir()


def fio_bps(path: str) -> tuple[float, str]:
    size = min(os.path.getsize(path), 4 << 30) // (1 << 20) * (1 << 20)
    huge = ensure_hugetlbfs()
    r = run_fio(path, size, huge)
    if r is None:
        raise SystemExit("fio is needed for the floor (apt install fio)")
    return r.bytes / r.seconds, r.backend


def cold_paths(store: str, folder: str) -> list[str]:
    return [store, folder]


def row(name: str, store: str, folder: str, shard: str, new_tokens: int, pairs: int,
        memory: dict[str, Any]) -> dict[str, Any]:
    paths = cold_paths(store, folder)
    # 1. what `offload tune` does: the disk (once per disk, reader and unit size) and this store's decode compute
    t0 = time.perf_counter()
    model, h = offload.load(store, progress=False, **memory)
    decode_times(model, PROMPT, 3, paths)  # the prefill and the two decode passes the compute meter needs
    h.disable()  # caches the decode compute measured
    tune_s = time.perf_counter() - t0
    del model
    gc.collect()
    # 2. a fresh load plans from those measurements; the prediction is made before the measured decode
    model, h = offload.load(store, progress=False, **memory)
    pred = h.prediction
    assert pred is not None, f"{name}: no prediction ({h.why_no_prediction})"
    # 3. fio and the decode alternate (fio, decode, fio, ..., fio): each decode chunk is compared with the
    # better fio of the two around it, and the row's ratio is the median of those per-pair ratios
    fio = [fio_bps(shard)[0]]
    chunks = []
    for _ in range(pairs):
        times, _ = decode_times(model, PROMPT, new_tokens, paths, at_decode=h.reset_stats)
        chunks.append({"samples": times, "bytes_per_token": h.stats().bytes_read / max(1, len(times))})
        fio.append(fio_bps(shard)[0])
    s = h.stats()
    h.disable()
    del model
    gc.collect()
    times = [t for c in chunks for t in c["samples"]]
    measured = statistics.median(times)
    per_token = statistics.median(c["bytes_per_token"] for c in chunks)
    for i, c in enumerate(chunks):
        c["fio_bps"] = max(fio[i], fio[i + 1])
        c["io_floor_s"] = c["bytes_per_token"] / c["fio_bps"]
    out = {"variant": name, "memory": memory, "prefetch": s.prefetch, "predicted_s": pred.s_per_pass,
           "bound": pred.bound, "basis": pred.basis, "measured_s": measured, "samples": times, "chunks": chunks,
           "fio_samples": fio, "measured_over_predicted": measured / pred.s_per_pass, "bytes_per_token": per_token,
           "streamed_units": s.streamed_units, "ram_tier_units": s.ram_tier_units, "tune_s": tune_s,
           "predicted_read_s": pred.read_s, "predicted_compute_s": pred.compute_s}
    log(f"  {name} {memory or ''}: prefetch {s.prefetch}, predicted {pred.s_per_pass:.3f} s, measured {measured:.3f} s "
        f"({measured / pred.s_per_pass - 1:+.1%}), {per_token / 2**20:.0f} MiB/token, {pred.bound}-bound, tune {tune_s:.1f} s, "
        f"fio " + "/".join(f"{x / 1e9:.2f}" for x in fio) + " GB/s")
    return out


def in_ram_step(store: str, new_tokens: int) -> float:
    model, h = offload.load(store, ram_tier=1 << 50, progress=False)
    times, _ = decode_times(model, PROMPT, new_tokens, None)
    h.disable()
    del model
    gc.collect()
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", default="bloom-1b7")
    p.add_argument("--variants", default="fp32,bf16,int8,int4")
    p.add_argument("--cpu-memory", default="4GiB", help="the extra fp32 row's budget (part in the RAM tier); '' skips")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens per decode chunk (all but the first are timed)")
    p.add_argument("--pairs", type=int, default=3, help="fio / decode pairs per row (the ratio is their median)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        p.error(f"folder of {a.json} does not exist")
    folder = random_checkpoint(a.random, torch.float32, os.path.join(cache_dir(), "random", f"{a.random}-fp32"))
    variants = a.variants.split(",")
    stores = {v: cached_store(folder, VARIANTS[v][0], quantize=VARIANTS[v][1], progress=False) for v in variants}
    shard = max(glob.glob(os.path.join(folder, "*.safetensors")), key=os.path.getsize)
    removed = measure.forget_disks()
    log(f"forgot {removed} cached disk profile(s): this run measures the disk afresh")
    jobs = [(v, {"ram_tier": 0}) for v in variants]
    if a.cpu_memory and "fp32" in stores:
        jobs.append(("fp32", {"cpu_memory": a.cpu_memory}))
    rows = []
    in_ram: dict[str, float] = {}
    fio_kind = fio_bps(shard)[1]
    for v, memory in jobs:
        log(f"[{v} {memory}]")
        r = row(v, stores[v], folder, shard, a.new_tokens, a.pairs, memory)
        if v not in in_ram:
            in_ram[v] = in_ram_step(stores[v], a.new_tokens)
        r["in_ram_s"] = in_ram[v]
        r["over_floor"] = statistics.median(statistics.median(c["samples"]) / max(c["io_floor_s"], in_ram[v])
                                            for c in r["chunks"])
        r["io_floor_s"] = statistics.median(c["io_floor_s"] for c in r["chunks"])
        rows.append(r)
    print("| variant | memory | prefetch (auto) | predicted s/token | measured | measured / predicted | bound | "
          "fio GB/s (alternated) | I/O floor | in-RAM step | cold / max(floors) | MiB/token | tune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = "every block streamed" if r["memory"].get("ram_tier") == 0 else f"--cpu-memory {r['memory']['cpu_memory']}"
        fs = "/".join(f"{x / 1e9:.2f}" for x in r["fio_samples"])
        print(f"| {r['variant']} | {mem} | {r['prefetch']} | {r['predicted_s']:.3f} | {r['measured_s']:.3f} | "
              f"{r['measured_over_predicted']:.2f} | {r['bound']} | {fs} | {r['io_floor_s']:.3f} | {r['in_ram_s']:.3f} | "
              f"{r['over_floor']:.2f} | {r['bytes_per_token'] / 2**20:.0f} | {r['tune_s']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.random, "fio_kind": fio_kind, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
