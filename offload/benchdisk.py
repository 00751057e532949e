"""``offload bench-disk``: sequential cold-cache read bandwidth of every backend, beside fio.

Method (see MEASURING.md): the test file is evicted from the page cache before every pass
(``POSIX_FADV_DONTNEED``; O_DIRECT backends bypass it anyway). Phase 1 runs each backend
configuration of a small grid once to find its best settings. Phase 2 alternates fio and the best
configuration of each backend (fio, native, fio, python, ...) ``repeats`` times and reports the
median of the per-pair ratios, because this class of disk drifts by tens of percent between runs.
CPU cost is user+sys seconds of this process (all threads) per GB read, beside fio's own.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ._memory import format_bytes
from .io import HostBuffer, MmapReader, PythonReader, Reader

GB = 1e9
BUFFER_BYTES = 256 << 20  # reads land in a ring-sized buffer, as the prefetcher's do


@dataclass
class Result:
    backend: str
    block_bytes: int
    depth: int
    seconds: float
    bytes: int
    cpu_seconds: float
    phase: str = "grid"
    fio_gbps: float | None = None  # the fio pass paired with this one (phase "pair")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_seconds / (self.bytes / GB)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_test_file(path: str, size: int, progress: Callable[[int], None] | None = None) -> None:
    """Create ``path`` of exactly ``size`` bytes (incompressible data) unless it already is that size."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    block = os.urandom(8 << 20)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            if progress:
                progress(n)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_with(reader: Reader, path: str, size: int, block: int, depth: int) -> None:
    """Read the whole file into a fixed buffer, ``depth`` requests of ``block`` bytes in flight."""
    buf = HostBuffer(min(BUFFER_BYTES, size))
    h = reader.open(path)
    try:
        if reader.task_bytes is None:  # native: one call per buffer-full, its own queue depth
            for off in range(0, size, buf.nbytes):
                n = min(buf.nbytes, size - off)
                reader.read(h, off, buf.view(0, n))
            return
        with cf.ThreadPoolExecutor(depth, thread_name_prefix="offload-bench") as pool:
            for off in range(0, size, buf.nbytes):
                n = min(buf.nbytes, size - off)
                futs = [pool.submit(reader.read, h, off + o, buf.view(o, min(block, n - o))) for o in range(0, n, block)]
                for f in futs:
                    f.result()
    finally:
        reader.close(h)
        buf.close()


def _read_aiofiles(path: str, size: int, block: int, depth: int) -> None:
    import aiofiles  # type: ignore[import-not-found]

    async def main() -> None:
        sem = asyncio.Semaphore(depth)

        async def one(off: int) -> None:
            async with sem:
                async with aiofiles.open(path, "rb") as f:
                    await f.seek(off)
                    await f.read(min(block, size - off))

        await asyncio.gather(*(one(off) for off in range(0, size, block)))

    asyncio.run(main())


def _fio_cmds(path: str, size: int) -> list[list[str]]:
    base = ["fio", "--name=r", f"--filename={path}", "--rw=read", "--bs=1M", "--direct=1", "--ioengine=io_uring",
            "--output-format=json", "--invalidate=1"]
    half = size // 2 // (1 << 20) * (1 << 20)
    return [base + ["--iodepth=32", f"--size={size}"],
            base + ["--iodepth=16", "--numjobs=2", f"--size={half}", f"--offset_increment={half}", "--group_reporting"]]


def run_fio(path: str, size: int) -> Result | None:
    """fio at its best on this file: one io_uring job at QD32 or two at QD16, whichever is faster."""
    if shutil.which("fio") is None:
        return None
    best: Result | None = None
    for i, cmd in enumerate(_fio_cmds(path, size)):
        evict(path)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            continue
        try:
            job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
        except (ValueError, KeyError, IndexError):
            continue
        read = job["read"]
        secs = read["runtime"] / 1000.0
        cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * secs * (2 if i == 1 else 1)
        r = Result("fio", 1 << 20, 32 if i == 0 else 16, secs, int(read["io_bytes"]), cpu, extra={"jobs": i + 1})
        if best is None or r.gbps > best.gbps:
            best = r
    return best


def backends(native_ok: bool, uring_ok: bool, aiofiles_ok: bool) -> dict[str, list[tuple[int, int]]]:
    """The grid: backend → [(block_bytes, depth)]."""
    M = 1 << 20
    grid: dict[str, list[tuple[int, int]]] = {}
    if native_ok and uring_ok:
        grid["native-uring"] = [(1 * M, 16), (1 * M, 32), (4 * M, 8), (4 * M, 16)]
    if native_ok:
        grid["native-threads"] = [(1 * M, 16), (4 * M, 8)]
    grid["python-direct"] = [(4 * M, 8), (8 * M, 8), (8 * M, 16)]
    grid["python-buffered"] = [(8 * M, 8)]
    grid["mmap"] = [(8 * M, 4)]
    if aiofiles_ok:
        grid["aiofiles"] = [(8 * M, 8)]
    return grid


def measure(backend: str, path: str, size: int, block: int, depth: int, phase: str = "grid") -> Result:
    evict(path)
    fn: Callable[[], None]
    if backend.startswith("native"):
        from ._native import NativeReader
        reader: Reader = NativeReader(backend.split("-")[1], depth=depth, chunk_bytes=block)
        fn = lambda: _read_with(reader, path, size, block, depth)  # noqa: E731
    elif backend == "python-direct":
        fn = lambda: _read_with(PythonReader(True, block), path, size, block, depth)  # noqa: E731
    elif backend == "python-buffered":
        fn = lambda: _read_with(PythonReader(False, block), path, size, block, depth)  # noqa: E731
    elif backend == "mmap":
        fn = lambda: _read_with(MmapReader(), path, size, block, depth)  # noqa: E731
    elif backend == "aiofiles":
        fn = lambda: _read_aiofiles(path, size, block, depth)  # noqa: E731
    else:
        raise ValueError(backend)
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), _cpu()
    return Result(backend, block, depth, t1 - t0, size, c1 - c0, phase)


def run(path: str, size: int, repeats: int = 3, blocks: Iterable[int] | None = None, depths: Iterable[int] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    from . import _native
    native_ok = _native.load_error() is None
    uring_ok = native_ok and _native.uring_available()
    try:
        import aiofiles  # noqa: F401  # type: ignore[import-not-found]
        aiofiles_ok = True
    except ImportError:
        aiofiles_ok = False
    grid = backends(native_ok, uring_ok, aiofiles_ok)
    if blocks or depths:
        bs = list(blocks or [1 << 20, 8 << 20])
        ds = list(depths or [8, 16])
        grid = {b: [(x, d) for x in bs for d in ds] for b in grid}
    results: list[Result] = []
    total = sum(len(v) for v in grid.values()) + repeats * (1 + 2 * len(grid))
    step = 0

    def note(r: Result) -> None:
        nonlocal step
        step += 1
        log(f"[{step}/{total}] {r.backend:16s} block {format_bytes(r.block_bytes):>9s} depth {r.depth:3d}: "
            f"{r.gbps:6.2f} GB/s  cpu {r.cpu_s_per_gb:5.2f} s/GB")

    for backend, configs in grid.items():
        for block, depth in configs:
            r = measure(backend, path, size, block, depth)
            results.append(r)
            note(r)
    best = {b: max((r for r in results if r.backend == b), key=lambda r: r.gbps) for b in grid}
    # Phase 2: alternate fio and each backend's best configuration.
    pairs: list[Result] = []
    fio_runs: list[Result] = []
    has_fio = shutil.which("fio") is not None
    for _ in range(repeats):
        for b, cfg in best.items():
            fio = run_fio(path, size) if has_fio else None
            if fio is not None:
                fio.phase = "pair"
                fio_runs.append(fio)
                note(fio)
            r = measure(b, path, size, cfg.block_bytes, cfg.depth, phase="pair")
            r.fio_gbps = fio.gbps if fio else None
            pairs.append(r)
            note(r)
    summary = []
    for b, cfg in best.items():
        mine = [r for r in pairs if r.backend == b]
        ratios = [r.gbps / r.fio_gbps for r in mine if r.fio_gbps]
        summary.append({
            "backend": b, "block_bytes": cfg.block_bytes, "depth": cfg.depth,
            "gbps_median": statistics.median(r.gbps for r in mine),
            "gbps_max": max(r.gbps for r in mine),
            "fio_ratio_median": statistics.median(ratios) if ratios else None,
            "fio_ratio_all": ratios,
            "cpu_s_per_gb": statistics.median(r.cpu_s_per_gb for r in mine),
        })
    fio_summary = None
    if fio_runs:
        fio_summary = {"gbps_median": statistics.median(r.gbps for r in fio_runs),
                       "gbps_all": [r.gbps for r in fio_runs],
                       "cpu_s_per_gb": statistics.median(r.cpu_s_per_gb for r in fio_runs)}
    default = "native" if native_ok else "python"
    winner = max(summary, key=lambda s: s["gbps_median"])
    return {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "file": path, "size_bytes": size, "repeats": repeats, "eviction": "posix_fadvise(DONTNEED) before every pass",
        "fio": fio_summary, "summary": summary, "runs": [dict(asdict(r), gbps=r.gbps) for r in results + pairs + fio_runs],
        "default_reader": default,
        "recommendation": (f"fastest here: {winner['backend']} (block {format_bytes(winner['block_bytes'])}, depth "
                           f"{winner['depth']}, {winner['gbps_median']:.2f} GB/s); offload.enable uses reader="
                           f"'{default}' by default"),
    }


def table(report: dict[str, Any]) -> str:
    lines = [f"file {report['file']} ({format_bytes(report['size_bytes'])}), cold cache ({report['eviction']}), "
             f"{report['repeats']} alternating repeats"]
    fio = report.get("fio")
    head = f"| {'backend':16s} | {'block':>9s} | {'depth':>5s} | {'GB/s (median)':>13s} | {'vs fio (median of pairs)':>24s} | {'cpu s/GB':>8s} |"
    lines += [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    if fio:
        lines.append(f"| {'fio (best of 1x32, 2x16)':16s} | {'1.00 MiB':>9s} | {'32':>5s} | {fio['gbps_median']:13.2f} | "
                     f"{'1.00':>24s} | {fio['cpu_s_per_gb']:8.2f} |")
    for s in report["summary"]:
        ratio = f"{s['fio_ratio_median']:.2f}" if s["fio_ratio_median"] is not None else "n/a (no fio)"
        lines.append(f"| {s['backend']:16s} | {format_bytes(s['block_bytes']):>9s} | {s['depth']:5d} | "
                     f"{s['gbps_median']:13.2f} | {ratio:>24s} | {s['cpu_s_per_gb']:8.2f} |")
    lines.append(report["recommendation"])
    return "\n".join(lines)


def main(path: str, size: int, repeats: int, json_path: str | None, blocks: list[int] | None,
         depths: list[int] | None, keep: bool) -> int:
    from .convert import _progress
    if os.path.isdir(path):
        path = os.path.join(path, "offload-bench-disk.bin")
    created = not os.path.exists(path)
    bar = _progress(size, f"creating {path}", True)
    try:
        make_test_file(path, size, bar.update)
    finally:
        bar.close()
    try:
        report = run(path, size, repeats, blocks, depths, log=lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        if created and not keep:
            with contextlib.suppress(OSError):
                os.unlink(path)
    print(table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 0
