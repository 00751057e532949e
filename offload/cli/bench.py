"""``offload bench``: greedy decode, side by side in one run, on the same files and prompt.

Rows on the CPU: the model fully in memory (compute floor); Accelerate's disk offload both ways users
reach it (``from_pretrained(device_map=..., offload_folder=...)`` and ``load_checkpoint_and_dispatch``);
this runtime at several prefetch depths, cold, and warm with its RAM tier.

Rows on CUDA (``--device cuda``): the model fully on the GPU when it fits (compute floor; skipped with
a note when it does not); Accelerate ``from_pretrained`` with the blocks in RAM and the rest on the GPU
("GPU + CPU") and with the blocks on disk ("GPU + disk"); this runtime on that GPU + disk model (it
takes over Accelerate's disk hooks; units compute on the GPU through ``CudaStager``) at each prefetch
depth, cold (every block streamed) and warm (the blocks in the RAM tier), within ``--gpu-memory``.

Cold: every file involved is evicted with ``POSIX_FADV_DONTNEED`` before every forward (the eviction
not timed). Floors, per row: disk (fio at its best, else bench-disk's best reader, measured on the
same disk just before each cold row), PCIe (pinned host → device copies of the streamed bytes,
measured once) and compute (the model in memory).

Per-token time is decode only: the prefill forward is excluded, and each later forward (plus the
generate step around it) is one sample; min and median are reported. On CUDA every timestamp follows
a ``torch.cuda.synchronize()``, and ``torch.cuda.max_memory_allocated()`` is recorded per row.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._fileio import _files_under, evict  # noqa: F401  (evict: benchmarks import it from here)
from .._memory import format_bytes
from .models import DTYPES, meta_model, model_class, random_checkpoint, random_name
from .options import (UsageError, add_command, at_least, byte_size, choice_list, default_device, device, int_list,
                      output_file, require)

RUNS = ("memory", "accelerate", "dispatch", "offload")
FIO_FILE_BYTES = 4 << 30  # fio's test file beside the model's files: its I/O floor, measured in the same minute
DISK_FLOOR_MIN_BYTES = 64 << 20  # without fio: the readers' test file is the blocks' size, within these bounds
READER_FLOORS = ("native-uring", "native-threads", "native-bounce", "python-direct")  # O_DIRECT readers enable() uses



class Decode(NamedTuple):
    times: list[float]  # seconds per decode token (prefill excluded)
    tokens: list[int]  # the first sequence's generated ids, to check every row generated the same


def decode_times(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, cold_paths: list[str] | None,
                 device: torch.device | None = None, at_decode: Callable[[], None] | None = None) -> Decode:
    """Seconds per decode token (prefill excluded); evicts ``cold_paths`` before every forward, untimed.

    ``at_decode`` is called once, untimed, when the prefill has finished (to reset a handle's stats).
    On CUDA each timestamp is taken after ``torch.cuda.synchronize``: without it a forward's time would
    be the time to queue its kernels. That is one host sync per token, not per unit.
    """
    cuda = device is not None and device.type == "cuda"
    starts: list[float] = []
    ends: list[float] = []

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def pre(module: Any, args: Any) -> None:
        if starts:
            ends.append(now())
        if len(starts) == 1 and at_decode is not None:
            at_decode()
        if cold_paths:
            evict(cold_paths)
        starts.append(now())

    h = model.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
        ends.append(now())
    finally:
        h.remove()
    return Decode([e - s for s, e in zip(starts[1:], ends[1:])], out[0, ids.shape[1]:].tolist())


def _row(name: str, cache: str, bs: int, times: list[float], **extra: Any) -> dict[str, Any]:
    return {"run": name, "cache": cache, "batch_size": bs, "s_per_token_min": min(times),
            "s_per_token_median": statistics.median(times), "samples": times, **extra}


class DiskFloor:
    """The disk's read bandwidth, measured on the model's disk just before each cold row.

    fio at its best when it is installed (its test file, made by ``main``, as before); otherwise
    bench-disk's readers on a test file of bench-disk's own (created here, removed by ``close``):
    the first measurement tries each O_DIRECT reader's small grid and keeps the fastest setting,
    later ones read with that setting only.
    """

    def __init__(self, fio_file: str | None, workdir: str, size: int, log: Callable[[str], None], enabled: bool = True):
        self.fio_file, self.log, self.enabled = fio_file, log, enabled
        self.path = None if fio_file else os.path.join(workdir, f"offload-disk-floor-{os.getpid()}.bin")
        self.size = size
        self.best: tuple[str, int, int] | None = None  # backend, block, depth
        self.buf: Any = None
        self.samples: list[dict[str, Any]] = []

    def measure(self) -> tuple[float, str] | None:
        """(bytes/s, what measured it), or None when nothing can (or ``--no-fio``)."""
        from . import benchdisk
        if not self.enabled:
            return None
        if self.fio_file is not None:
            r = benchdisk.run_fio(self.fio_file, os.path.getsize(self.fio_file))
            if r is None:
                return None
            self.samples.append({"by": "fio", "gbps": r.gbps})
            self.log(f"  disk floor: fio {r.gbps:.2f} GB/s")
            return r.gbps * 1e9, "fio"
        from .. import _native
        if self.buf is None:
            benchdisk.make_test_file(self.path, self.size)
            self.buf = benchdisk.ring_buffer(self.size)
        if self.best is None:
            native = _native.load_error() is None
            grid = benchdisk.backends(native, native and _native.uring_available(), False)
            tried = [benchdisk.measure(b, self.path, self.size, blk, d, self.buf)
                     for b, cfgs in grid.items() if b in READER_FLOORS for blk, d in cfgs]
            top = max(tried, key=lambda r: r.gbps)
            self.best = (top.backend, top.block_bytes, top.depth)
        r = benchdisk.measure(self.best[0], self.path, self.size, self.best[1], self.best[2], self.buf)
        by = f"{r.backend} (block {format_bytes(r.block_bytes)}, depth {r.depth})"
        self.samples.append({"by": by, "gbps": r.gbps})
        self.log(f"  disk floor: {by} {r.gbps:.2f} GB/s (no fio)")
        return r.gbps * 1e9, by

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()
            self.buf = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def copy_seconds(dst: torch.Tensor, src: torch.Tensor, times: int = 1, stream: Any = None) -> float:
    """Seconds the device took for ``times`` copies of ``src`` into ``dst``, from CUDA events on ``stream``."""
    with torch.cuda.device(dst.device):
        stream = torch.cuda.current_stream(dst.device) if stream is None else stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for _ in range(times):
                dst.copy_(src, non_blocking=True)
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def pcie_gbps(chunk_bytes: int, chunks: int, device: torch.device, repeats: int = 3) -> float:
    """Host → device bandwidth: ``chunks`` pinned copies of ``chunk_bytes`` (one per streamed unit, the
    bytes a token streams), best of ``repeats`` after a warm-up; the method of benchmarks/bench_h2d.py."""
    host = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True).fill_(7)
    dst = torch.empty(chunk_bytes, dtype=torch.uint8, device=device)
    try:
        copy_seconds(dst, host)  # warm-up
        return max(chunk_bytes * chunks / copy_seconds(dst, host, chunks) for _ in range(repeats)) / 1e9
    finally:
        del host, dst
        torch.cuda.empty_cache()


def _gpu_tier_bytes(handle: Any) -> int:
    """Bytes of the units the runtime keeps on the GPU (they cross neither the disk nor PCIe per token)."""
    s = handle.stats()
    if hasattr(s, "gpu_tier_bytes"):
        return int(s.gpu_tier_bytes)
    kept = handle._prefetcher.elsewhere
    return sum(h.record.data_bytes for i, h in enumerate(handle._hooks) if i in kept)


def run_bench(checkpoint: str, workdir: str, dtype: torch.dtype, batch_sizes: list[int], prefetches: list[int],
              new_tokens: int, include: set[str], fio_file: str | None, log: Callable[[str], None], *,
              device: torch.device | None = None, gpu_memory: int | None = None,
              trace: str | None = None, disk_floor: bool = True,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every row of the report (``device`` None: the CPU). ``trace``: enable(trace=) on one cold row.
    ``on_row``: called with each row as soon as it is measured (so a run cut short keeps its rows)."""
    import accelerate
    import transformers as tf

    from .. import enable
    from ..plan import disk_device_map, find_units

    dev = torch.device(device or "cpu")
    cuda = dev.type == "cuda"
    if cuda:
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)  # the runtime and Accelerate place "cuda" on the current device
    config = tf.AutoConfig.from_pretrained(checkpoint)
    cls = model_class(config)
    meta = meta_model(config, dtype)
    blocks = [n for n, _ in find_units(meta)]
    block_sizes = [sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in find_units(meta)]
    block_bytes = sum(block_sizes)
    # Accelerate's maps: blocks on "disk" (and on cuda also in RAM, "cpu"), everything else where it computes.
    rest = dev.index if cuda else "cpu"
    disk_map = disk_device_map(meta, blocks, rest=rest)
    ram_map = disk_device_map(meta, blocks, rest=rest, offloaded="cpu")
    del meta
    prompt = torch.tensor([[(17 * i + 3) % config.vocab_size for i in range(16)]])
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    reference: dict[int, list[int]] = {}
    ckpt_files = _files_under([checkpoint])
    # Inside a memory cgroup, pages cached by another cgroup would still be hits: start every row
    # from an empty cache so "warm" means what this limit lets the page cache keep.
    limited = bool(os.environ.get("OFFLOAD_BENCH_CGROUP"))
    everything = ckpt_files + [workdir]
    store = os.path.join(workdir, "offload-store")
    trace_p = 2 if 2 in prefetches else prefetches[0]
    traced: dict[str, Any] | None = None
    disk = DiskFloor(fio_file, workdir, min(FIO_FILE_BYTES, max(DISK_FLOOR_MIN_BYTES, block_bytes)), log, disk_floor)
    pcie = None
    if cuda:
        pcie = pcie_gbps(max(block_sizes), len(block_sizes), dev)
        log(f"PCIe floor: pinned host -> {dev} copies of the blocks' {format_bytes(block_bytes)}: {pcie:.1f} GB/s")

    def free() -> None:
        gc.collect()  # before the next row loads its own copy
        if cuda:
            torch.cuda.empty_cache()

    def measure(name: str, cache: str, bs: int, model: torch.nn.Module, handle: Any = None,
                streamed: int = block_bytes, **extra: Any) -> None:
        """One row: decode ``new_tokens`` (cold: every file evicted before each forward) and record it.

        ``streamed``: bytes a token moves from disk (cold) or from host memory (on cuda) to where it computes."""
        ids = prompt.repeat(bs, 1).to(dev)
        if limited and cache == "warm":
            evict(everything)
        floor = disk.measure() if cache == "cold" else None
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)  # the peak includes the prefill's activations
            before = torch.cuda.memory_allocated(dev)
        d = decode_times(model, ids, new_tokens, ckpt_files + [workdir] if cache == "cold" else None, dev,
                         handle.reset_stats if handle is not None else None)
        same = reference.setdefault(bs, d.tokens) == d.tokens
        if not same:
            log(f"  WARNING: {name} generated different tokens than the first row at batch size {bs}")
        row = _row(name, cache, bs, d.times, same_tokens=same, streamed_bytes_per_token=streamed, **extra)
        if floor is not None:
            row["disk_bps"], row["disk_floor_by"] = floor
        if cuda:
            row["pcie_gbps"] = pcie
            row["gpu_allocated_before_bytes"] = before
            row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        if handle is not None:
            s = handle.stats()  # decode forwards only: reset when the prefill ended
            row.update(bytes_per_token=s.bytes_read / len(d.times), wait_fraction=s.wait_seconds / sum(d.times),
                       misses=s.misses, ram_tier_units=s.ram_tier_units, streamed_units=s.streamed_units,
                       prefetch=s.prefetch, reader=s.reader, predicted_s_per_token=s.predicted_s_per_pass or None,
                       predicted_bound=s.predicted_bound or None)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        log(f"  {name} {cache} bs={bs}: {1e3 * row['s_per_token_median']:.1f} ms/token (median)")

    def accelerate_model(map_: dict[str, Any], folder: str | None) -> torch.nn.Module:
        kw = {"offload_folder": folder} if folder else {}
        return cls.from_pretrained(checkpoint, dtype=dtype, device_map=map_, **kw).eval()

    where = "GPU" if cuda else "memory"
    try:
        for bs in batch_sizes:
            if "memory" in include:
                log(f"[bs={bs}] model fully in {where}")
                try:
                    on_gpu = {"device_map": {"": dev.index}} if cuda else {}
                    model = cls.from_pretrained(checkpoint, dtype=dtype, **on_gpu)
                    measure(f"in {where} (compute floor)", "warm", bs, model.eval(), streamed=0, compute_floor=True)
                except torch.OutOfMemoryError as e:
                    note = (f"in GPU (compute floor) bs={bs}: skipped, the model does not fit in {dev}'s memory "
                            f"({str(e).splitlines()[0]})")
                    skipped.append(note)
                    log("  " + note)
                model = None
                free()
            if "accelerate" in include:
                off = os.path.join(workdir, "accelerate-offload")
                if cuda:
                    log(f"[bs={bs}] accelerate from_pretrained(device_map=blocks on cpu, the rest on {dev})")
                    measure("accelerate GPU + CPU", "warm", bs, accelerate_model(ram_map, None))
                    free()
                label = "accelerate GPU + disk" if cuda else "accelerate from_pretrained"
                log(f"[bs={bs}] accelerate from_pretrained(device_map=blocks on disk, the rest on {rest})")
                model = accelerate_model(disk_map, off)
                measure(label, "warm", bs, model)
                measure(label, "cold", bs, model)
                model = None
                free()
            if "dispatch" in include:
                log(f"[bs={bs}] accelerate load_checkpoint_and_dispatch (.dat per tensor)")
                off = os.path.join(workdir, "dispatch-offload")
                with accelerate.init_empty_weights():
                    model = cls.from_config(config, dtype=dtype)
                model.tie_weights()
                t0 = time.perf_counter()
                model = accelerate.load_checkpoint_and_dispatch(model, checkpoint, device_map=disk_map,
                                                                offload_folder=off, dtype=dtype).eval()
                load_s = time.perf_counter() - t0
                label = "accelerate load_checkpoint_and_dispatch" + (" GPU + disk" if cuda else "")
                measure(label, "warm", bs, model, load_seconds=load_s)
                measure(label, "cold", bs, model)
                model = None
                free()
            if "offload" in include:
                off = os.path.join(workdir, "offload-run")
                budget = {"gpu_memory": gpu_memory} if cuda and gpu_memory is not None else {}
                # cold: every block streamed from disk (ram_tier=0); on cuda also warm, the blocks in the
                # RAM tier (read once at enable) and copied to the GPU per token: prefetch sets the device ring.
                for cache in ("cold", "warm") if cuda else ("cold",):
                    for p in prefetches:
                        log(f"[bs={bs}] offload prefetch={p}, {cache}: " + (
                            "every block streamed (ram_tier=0)" if cache == "cold" else "RAM tier holds the blocks"))
                        tr = trace if (trace and cache == "cold" and p == trace_p and traced is None) else None
                        model = accelerate_model(disk_map, off)
                        t0 = time.perf_counter()
                        handle = enable(model, prefetch=p, store=store, trace=tr,
                                        **({"ram_tier": 0} if cache == "cold" else {}), **budget)
                        enable_s = time.perf_counter() - t0
                        kept = _gpu_tier_bytes(handle) if cuda else 0
                        name = f"offload prefetch={p}" + (" RAM tier" if cache == "warm" else "")
                        extra = {"gpu_tier_bytes": kept} if cuda else {}
                        if tr:
                            extra["trace"] = tr
                        measure(name, cache, bs, model, handle, streamed=block_bytes - kept, enable_seconds=enable_s,
                                **extra)
                        handle.disable()  # writes the trace
                        if tr:
                            traced = {"file": tr, "row": f"{name} {cache} bs={bs}"}
                        model = handle = None
                        free()
                if not cuda:
                    log(f"[bs={bs}] offload, RAM tier holds the blocks (warm)")
                    model = accelerate_model(disk_map, off)
                    handle = enable(model, prefetch=2, store=store)
                    measure("offload RAM tier (default budget)", "warm", bs, model, handle,
                            streamed=0)
                    handle.disable()
                    model = handle = None
                    free()
    finally:
        disk.close()
    return {"rows": rows, "skipped": skipped, "disk_floor_samples": disk.samples,
            "fio_gbps": [x["gbps"] for x in disk.samples if x["by"] == "fio"], "pcie_gbps": pcie,
            "block_bytes": block_bytes, "blocks": len(blocks), "largest_block_bytes": max(block_sizes),
            "device": str(dev), "gpu_memory_bytes": gpu_memory if cuda else None, "trace": traced}


def _ms(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{1e3 * x:.{digits}f}"


def summarize(report: dict[str, Any]) -> str:
    """The rows with their floors and ratios, the seed-style ms/token × batch size table, and the ratios
    this runtime / Accelerate in the same run.

    Floors per row: disk = bytes streamed per token / the disk's bandwidth measured just before the row
    (cold rows); PCIe = bytes copied to the GPU per token / pinned host → device bandwidth (cuda);
    compute = the model fully in memory (or on the GPU) at that batch size. ideal = the largest.
    """
    rows = report["rows"]
    compute = {r["batch_size"]: r["s_per_token_median"] for r in rows if r.get("compute_floor")}
    cuda = str(report.get("device", "cpu")).startswith("cuda")
    head = f"model {report['model']} ({report['dtype']}) on {report.get('device', 'cpu')}, {report.get('blocks', '?')} blocks"
    if report.get("interrupted"):
        head = f"INTERRUPTED ({report['interrupted']}): the rows measured before it\n" + head
    if report.get("block_bytes"):
        head += f" = {format_bytes(report['block_bytes'])}"
    if report.get("gpu_memory_bytes"):
        head += f", --gpu-memory {format_bytes(report['gpu_memory_bytes'])} for this runtime's rows"
    cols = (["run", "cache", "bs", "ms/token min", "ms/token median", "disk floor ms"] + (["PCIe floor ms"] if cuda else [])
            + ["ideal ms", "median / ideal", "read/token"] + (["peak GPU"] if cuda else []))
    out = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        streamed = r.get("streamed_bytes_per_token") or 0
        disk = streamed / r["disk_bps"] if r.get("disk_bps") and streamed else None
        pcie = streamed / (r["pcie_gbps"] * 1e9) if r.get("pcie_gbps") and streamed else None
        floors = [x for x in (disk, pcie, compute.get(r["batch_size"])) if x is not None]
        ideal = max(floors) if floors else None
        r["disk_floor_s"], r["pcie_floor_s"], r["ideal_s"] = disk, pcie, ideal
        ratio = f"{r['s_per_token_median'] / ideal:.2f}" if ideal else ""
        read = format_bytes(r["bytes_per_token"]) if r.get("bytes_per_token") is not None else ""
        cells = [r["run"], r["cache"], str(r["batch_size"]), _ms(r["s_per_token_min"]), _ms(r["s_per_token_median"]),
                 _ms(disk)] + ([_ms(pcie)] if cuda else []) + [_ms(ideal), ratio, read]
        if cuda:
            cells.append(format_bytes(r["gpu_peak_bytes"]) if r.get("gpu_peak_bytes") is not None else "")
        out.append("| " + " | ".join(cells) + " |")
    out += [f"skipped: {s}" for s in report.get("skipped") or []]
    # Seed-style: ms/token (median) per run, one column per batch size.
    sizes = sorted({r["batch_size"] for r in rows})
    out += ["", "| ms/token (median) | " + " | ".join(f"bs={b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for key in dict.fromkeys((r["run"], r["cache"]) for r in rows):
        by = {r["batch_size"]: r["s_per_token_median"] for r in rows if (r["run"], r["cache"]) == key}
        out.append(f"| {key[0]} ({key[1]}) | " + " | ".join(_ms(by.get(b)) for b in sizes) + " |")
    out.append("")
    for cache in ("cold", "warm"):
        for bs in sizes:
            ours = [r for r in rows if r["run"].startswith("offload") and r["cache"] == cache and r["batch_size"] == bs]
            theirs = [r for r in rows if r["run"].startswith("accelerate") and r["cache"] == cache and r["batch_size"] == bs]
            if not ours:
                continue
            best = min(ours, key=lambda r: r["s_per_token_median"])
            for t in theirs:
                out.append(f"{cache} bs={bs}: {best['run']} / {t['run']} = "
                           f"{best['s_per_token_median'] / t['s_per_token_median']:.2f}")
    if report.get("trace"):
        out.append(f"trace: {report['trace']['file']} ({report['trace']['row']}; open in https://ui.perfetto.dev)")
    return "\n".join(out)


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib  # optional; only for --plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    labels = [f"{r['run']}\n{r['cache']} bs={r['batch_size']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1))
    ax.barh(labels, [r["s_per_token_median"] * 1000 for r in rows])
    ax.set_xlabel("ms per generated token (median)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)


def in_cgroup(limit_bytes: int, argv: list[str]) -> int:
    """Re-run this command inside a fresh memory cgroup (v1 or v2) limited to ``limit_bytes``."""
    name = f"offload-bench-{os.getpid()}"
    v1 = "/sys/fs/cgroup/memory"
    base = v1 if os.path.isdir(v1) else "/sys/fs/cgroup"
    path = os.path.join(base, name)
    os.makedirs(path)
    try:
        with open(os.path.join(path, "memory.limit_in_bytes" if base == v1 else "memory.max"), "w") as f:
            f.write(str(limit_bytes))
        env = dict(os.environ, OFFLOAD_BENCH_CGROUP=str(limit_bytes))
        cmd = ["bash", "-c", f'echo $$ > {path}/cgroup.procs; exec "$@"', "bash", *argv]
        return subprocess.call(cmd, env=env)
    finally:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)


def main(a: Any) -> int:
    from ..config import cache_dir
    from .benchdisk import make_test_file
    dev = torch.device(a.device or default_device())  # --device was checked as it was parsed (options.device)
    if a.model is None and a.random is None:
        raise UsageError("pass MODEL (a Hugging Face folder) or --random NAME")
    if a.model is not None and not os.path.isdir(a.model):
        raise UsageError(f"{a.model} is not a folder: pass a Hugging Face model folder or --random NAME")
    if a.plot:
        require("matplotlib", "plot", "--plot")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if a.gpu_memory is not None and dev.type != "cuda" and not os.environ.get("OFFLOAD_BENCH_CGROUP"):
        log("note: --gpu-memory ignored: the rows compute on the CPU")
    if a.memory_limit and not os.environ.get("OFFLOAD_BENCH_CGROUP"):
        rest = sys.argv[1:]
        if rest[:1] == ["bench"]:  # started as `offload bench ...` rather than benchmarks/bench_model.py
            rest = rest[1:]
        argv = [sys.executable, "-m", "offload.cli", "bench", *rest]
        return in_cgroup(a.memory_limit, argv)
    dtype = DTYPES[a.dtype]
    tag = a.dtype
    if a.random:
        checkpoint = random_checkpoint(a.random, dtype, os.path.join(cache_dir(), "random", f"{a.random}-{tag}"))
        name = a.random
    else:
        checkpoint, name = a.model, os.path.basename(os.path.abspath(a.model))
    workdir = a.workdir or os.path.join(cache_dir(), "bench", f"{name}-{tag}")
    os.makedirs(workdir, exist_ok=True)
    # Only what differs from the CPU defaults is passed on.
    options = {k: v for k, v in (("device", dev if dev.type == "cuda" else None),
                                 ("gpu_memory", a.gpu_memory if dev.type == "cuda" else None),
                                 ("trace", a.trace), ("disk_floor", False if a.no_fio else None)) if v is not None}
    # fio's test file only when fio is there to read it, removed whatever happens next.
    fio_file = None
    if not a.no_fio and shutil.which("fio"):
        fio_file = os.path.join(workdir, f"offload-fio-{os.getpid()}.bin")
    measured: list[dict[str, Any]] = []
    row_log = RowLog(a.jsonl) if a.jsonl else None

    def on_row(row: dict[str, Any]) -> None:
        measured.append(row)
        if row_log is not None:
            row_log.write(row)
    try:
        if fio_file:
            make_test_file(fio_file, FIO_FILE_BYTES)
        report = run_bench(checkpoint, workdir, dtype, a.batch_sizes, a.prefetch, a.new_tokens, set(a.runs),
                           fio_file, log, on_row=on_row, **options)
    except KeyboardInterrupt:  # a time limit (timeout --signal=INT) or Ctrl-C: keep what was measured
        log(f"interrupted after {len(measured)} rows: writing them")
        report = {"rows": measured, "skipped": [], "device": str(dev), "interrupted": "SIGINT",
                  "gpu_memory_bytes": a.gpu_memory if dev.type == "cuda" else None}
    finally:
        if fio_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fio_file)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if dev.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(dev)
    report.update({
        "model": name, "dtype": tag, "new_tokens": a.new_tokens, "runs": a.runs,
        "memory_limit_bytes": int(os.environ.get("OFFLOAD_BENCH_CGROUP", 0)) or None,
        "eviction": "posix_fadvise(DONTNEED) on every checkpoint/offload/store file before every forward (cold rows)",
        "machine": machine, "versions": _versions(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })
    text = summarize(report)
    if report["memory_limit_bytes"]:
        text = f"inside a memory cgroup limited to {format_bytes(report['memory_limit_bytes'])}\n" + text
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.plot and report["rows"]:
        plot(report, a.plot)
    return 130 if report.get("interrupted") else 0


class RowLog:
    """Each row appended as it is measured: one JSON line to ``path``, one markdown line to ``path``.md."""

    COLS = ("run", "cache", "bs", "ms/token min", "ms/token median", "read/token", "peak GPU", "same tokens")

    def __init__(self, path: str):
        self.path, self.md = path, os.path.splitext(path)[0] + ".md"
        if not os.path.exists(self.md) or os.path.getsize(self.md) == 0:
            with open(self.md, "a") as f:
                f.write("| " + " | ".join(self.COLS) + " |\n|" + "---|" * len(self.COLS) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        cells = [row["run"], row["cache"], str(row["batch_size"]), _ms(row["s_per_token_min"]),
                 _ms(row["s_per_token_median"]),
                 format_bytes(row["bytes_per_token"]) if row.get("bytes_per_token") is not None else "",
                 format_bytes(row["gpu_peak_bytes"]) if row.get("gpu_peak_bytes") is not None else "",
                 str(row.get("same_tokens", ""))]
        with open(self.md, "a") as f:
            f.write("| " + " | ".join(cells) + " |\n")


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("transformers", "accelerate", "safetensors"):
        with contextlib.suppress(ImportError):
            out[mod] = __import__(mod).__version__
    return out


def add_parser(sub: Any) -> None:
    b = add_command(sub, "bench", "decode time vs Accelerate's offload and the floors, in one run",
                    "Greedy decode side by side in one run, on the same files and prompt: the model in memory (on "
                    "CUDA: on the GPU, when it fits), Accelerate's offload (CPU: from_pretrained and "
                    "load_checkpoint_and_dispatch to disk; CUDA: GPU + CPU and GPU + disk), and offload at several "
                    "prefetch depths, cold and warm, with the disk floor (fio, else bench-disk's best reader), the "
                    "PCIe floor (CUDA) and the compute floor.")
    b.add_argument("model", nargs="?", help="Hugging Face model folder")
    b.add_argument("--random", metavar="NAME", type=random_name, help="random weights of a real architecture (e.g. bloom-1b7)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype every row runs in")
    b.add_argument("--batch-sizes", type=int_list(1), default=[1], metavar="N[,N...]", help="comma-separated, e.g. 1,8,32")
    b.add_argument("--prefetch", type=int_list(1), default=[1, 2, 4], metavar="N[,N...]",
                   help="comma-separated prefetch depths for this runtime")
    b.add_argument("--new-tokens", type=at_least(2), default=6, metavar="N",
                   help="tokens per generate (the first is the prefill, excluded from the timings)")
    b.add_argument("--runs", type=choice_list(RUNS), default=list(RUNS), metavar="ROW[,ROW...]",
                   help=f"which rows to run, comma-separated from {','.join(RUNS)}")
    b.add_argument("--memory-limit", type=byte_size, metavar="BYTES", help="run everything inside a memory cgroup of this size")
    b.add_argument("--workdir", help="where offload folders and stores go (default: the cache)")
    b.add_argument("--device", type=device, metavar="DEVICE",
                   help="where the rows compute: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    b.add_argument("--gpu-memory", type=byte_size, metavar="BYTES",
                   help="CUDA: GPU memory for weights in this runtime's rows: resident weights + device slot ring + "
                        "GPU tier, as offload.enable(gpu_memory=) (default: a GPU tier as large as free memory - 2 GiB "
                        "allows)")
    b.add_argument("--trace", type=output_file, metavar="FILE",
                   help="write a Chrome/Perfetto trace of the prefetch=2 cold row (the first --prefetch without 2) "
                        "to FILE")
    b.add_argument("--no-fio", action="store_true",
                   help="skip the disk floor (fio, or without fio bench-disk's best reader on a test file of its own)")
    b.add_argument("--json", type=output_file, metavar="FILE", help="write the report as JSON (its folder must exist)")
    b.add_argument("--jsonl", type=output_file, metavar="FILE",
                   help="append each row to FILE as one JSON line as soon as it is measured, and a markdown line to "
                        "FILE's name with .md (a run stopped by a time limit keeps its rows)")
    b.add_argument("--plot", type=output_file, metavar="FILE", help="draw the table as a PNG chart (needs matplotlib)")
    b.set_defaults(fn=main)
