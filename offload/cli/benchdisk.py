"""``offload bench-disk``: sequential cold-cache read bandwidth of every backend, beside fio.

Method (see benchmarks/README.md): the test file is evicted from the page cache before every pass
(``POSIX_FADV_DONTNEED``; O_DIRECT backends bypass it anyway). Phase 1 runs each backend
configuration of a small grid once to find its best settings. Phase 2 alternates fio and the best
configuration of each backend (fio, native, fio, python, ...) ``repeats`` times and reports the
median of the per-pair ratios, because this class of disk drifts by tens of percent between runs.
CPU cost is user+sys seconds of this process (all threads) per GB read, beside fio's own (its job
threads' usr+sys). Reads land in one buffer allocated and touched before the first pass, as the
prefetcher's ring is allocated once at ``enable``: a pass pays for reading, not for first-touch
page zeroing. That buffer uses huge pages unless ``huge=False`` (see ``HostBuffer``).

Data safety: bench-disk writes only test files of its own, recognisable by their first bytes
(``MAGIC``: ``OFFLOAD-BENCH-DISK-TEST-FILE``); any other file that exists at the path is refused and
left untouched. A file it created is removed at the end unless ``--keep``.
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

from .._memory import format_bytes, parse_bytes
from ..writer import write_atomic
from ..io import MmapReader, PythonReader, Reader
from ..staging import HostBuffer
from .options import UsageError, add_command, byte_size, output_file, positive_int

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


# The first bytes of every test file bench-disk (or bench, for fio) writes: how it knows a file is its own.
MAGIC = b"OFFLOAD-BENCH-DISK-TEST-FILE\n"


def is_own_test_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def room_for_test_file(path: str, size: int) -> None:
    """Refuse a test file the disk cannot hold, before writing any of it (one of ours of that size, already
    there, needs no room)."""
    from .._memory import ensure_free_space
    if os.path.isfile(path) and is_own_test_file(path) and os.path.getsize(path) == size:
        return
    ensure_free_space(path, size, f"the test file {path}")


def make_test_file(path: str, size: int, progress: Callable[[int], None] | None = None) -> None:
    """Create ``path`` of exactly ``size`` bytes (incompressible data after ``MAGIC``), unless it is
    already one of ours of that size. A file there that is not ours is refused, never overwritten."""
    if os.path.lexists(path):
        if not is_own_test_file(path) or os.path.islink(path) or not os.path.isfile(path):
            raise UsageError(f"{path} exists and is not a bench-disk test file: refusing to overwrite it; pass a folder "
                             f"or a file name that does not exist")
        if os.path.getsize(path) == size:
            return
    room_for_test_file(path, size)

    def blocks() -> Iterable[bytes]:
        block = bytearray(os.urandom(8 << 20))
        block[:len(MAGIC)] = MAGIC  # only the first block starts with the marker
        left = size
        while left:
            n = min(left, len(block))
            yield bytes(block[:n])
            block[:len(MAGIC)] = os.urandom(len(MAGIC))
            left -= n
            if progress:
                progress(n)

    write_atomic(path, blocks())


def _read_with(reader: Reader, path: str, size: int, block: int, depth: int, buf: HostBuffer) -> None:
    """Read the whole file through ``buf``, ``depth`` requests of ``block`` bytes in flight."""
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


def hugetlbfs_dir(pages_needed: int = 32) -> str | None:
    """A writable hugetlbfs mount with enough free 2 MiB pages for fio's buffers (2 jobs x 16 x 1 MiB), or None.

    fio allocates its I/O buffers with malloc (4 KiB pages) unless told ``--mem=mmaphuge:FILE``,
    which needs hugetlbfs; our readers use transparent huge pages. To compare like with like,
    bench-disk also runs fio on huge pages when the machine has them set up, e.g.
    ``echo 64 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs none /mnt/huge``.
    """
    try:
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) for line in f if line.startswith("HugePages_Free:")), 0)
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[2:3] == ["hugetlbfs"]]
    except OSError:
        return None
    if free < pages_needed:
        return None
    return next((m for m in mounts if os.access(m, os.W_OK)), None)


def _fio_cmds(path: str, size: int, huge_dir: str | None = None) -> list[list[str]]:
    base = ["fio", "--name=r", f"--filename={path}", "--rw=read", "--bs=1M", "--direct=1", "--ioengine=io_uring",
            "--output-format=json", "--invalidate=1"]
    if huge_dir:
        base.append(f"--mem=mmaphuge:{os.path.join(huge_dir, f'offload-fio-{os.getpid()}')}")
    half = size // 2 // (1 << 20) * (1 << 20)
    return [base + ["--iodepth=32", f"--size={size}"],
            base + ["--iodepth=16", "--numjobs=2", f"--size={half}", f"--offset_increment={half}", "--group_reporting"]]


def run_fio(path: str, size: int, huge_dir: str | None = None) -> Result | None:
    """fio at its best on this file: one io_uring job at QD32 or two at QD16, whichever is faster.

    With ``huge_dir`` (a hugetlbfs mount) its buffers are on 2 MiB pages, like ours."""
    if shutil.which("fio") is None:
        return None
    best: Result | None = None
    for i, cmd in enumerate(_fio_cmds(path, size, huge_dir)):
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
        r = Result("fio-huge" if huge_dir else "fio", 1 << 20, 32 if i == 0 else 16, secs, int(read["io_bytes"]), cpu,
                   extra={"jobs": i + 1})
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
        grid["native-bounce"] = [(M // 4, 16)]  # the thread engine through a small region of its own (_native.py)
    grid["python-direct"] = [(4 * M, 8), (8 * M, 8), (8 * M, 16)]
    grid["python-buffered"] = [(8 * M, 8)]
    grid["mmap"] = [(8 * M, 4)]
    if aiofiles_ok:
        grid["aiofiles"] = [(8 * M, 8)]
    return grid


def ring_buffer(size: int, huge: bool = True) -> HostBuffer:
    """The destination of every pass: allocated and touched once, like the prefetcher's ring."""
    buf = HostBuffer(min(BUFFER_BYTES, size), huge=huge)
    buf.tensor.fill_(0)
    return buf


def measure(backend: str, path: str, size: int, block: int, depth: int, buf: HostBuffer,
            phase: str = "grid") -> Result:
    evict(path)
    fn: Callable[[], None]
    if backend.startswith("native"):
        from .._native import NativeReader
        bounce = backend == "native-bounce"
        reader: Reader = NativeReader("threads" if bounce else backend.split("-")[1], depth=depth, chunk_bytes=block,
                                      bounce=bounce)
        if bounce:
            reader.bounce_chunk = block  # type: ignore[attr-defined]
        fn = lambda: _read_with(reader, path, size, block, depth, buf)  # noqa: E731
    elif backend == "python-direct":
        fn = lambda: _read_with(PythonReader(True, block), path, size, block, depth, buf)  # noqa: E731
    elif backend == "python-buffered":
        fn = lambda: _read_with(PythonReader(False, block), path, size, block, depth, buf)  # noqa: E731
    elif backend == "mmap":
        fn = lambda: _read_with(MmapReader(), path, size, block, depth, buf)  # noqa: E731
    elif backend == "aiofiles":
        fn = lambda: _read_aiofiles(path, size, block, depth)  # noqa: E731
    else:
        raise ValueError(backend)
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), _cpu()
    return Result(backend, block, depth, t1 - t0, size, c1 - c0, phase)


def run(path: str, size: int, repeats: int = 3, blocks: Iterable[int] | None = None, depths: Iterable[int] | None = None,
        log: Callable[[str], None] = print, huge: bool = True) -> dict[str, Any]:
    from .. import _native
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
    buf = ring_buffer(size, huge)
    pages = "2 MiB (transparent huge pages)" if buf.huge and thp_mode() in ("always", "madvise") else "4 KiB"
    log(f"destination buffer: {format_bytes(buf.nbytes)}, {pages} pages, THP mode {thp_mode()}")
    results: list[Result] = []
    has_fio = shutil.which("fio") is not None
    huge_dir = hugetlbfs_dir() if has_fio else None
    total = sum(len(v) for v in grid.values()) + repeats * len(grid) * (1 + has_fio + (huge_dir is not None))
    step = 0

    def note(r: Result) -> None:
        nonlocal step
        step += 1
        log(f"[{step}/{total}] {r.backend:16s} block {format_bytes(r.block_bytes):>9s} depth {r.depth:3d}: "
            f"{r.gbps:6.2f} GB/s  cpu {r.cpu_s_per_gb:5.2f} s/GB")

    for backend, configs in grid.items():
        for block, depth in configs:
            r = measure(backend, path, size, block, depth, buf)
            results.append(r)
            note(r)
    best = {b: max((r for r in results if r.backend == b), key=lambda r: r.gbps) for b in grid}
    # Phase 2: alternate fio and each backend's best configuration.
    pairs: list[Result] = []
    fio_runs: list[Result] = []
    fio_huge_runs: list[Result] = []
    log("fio on huge pages too (like for like): " + (f"yes, buffers in {huge_dir}" if huge_dir else
        "no (needs a hugetlbfs mount with 32 free 2 MiB pages; see hugetlbfs_dir in offload/cli/benchdisk.py)"))
    def paired_fio(huge: str | None, runs: list[Result]) -> Result | None:
        fio = run_fio(path, size, huge)
        if fio is not None:
            fio.phase = "pair"
            runs.append(fio)
            note(fio)
        return fio

    for _ in range(repeats):
        for b, cfg in best.items():
            fio = paired_fio(None, fio_runs) if has_fio else None
            fio_h = paired_fio(huge_dir, fio_huge_runs) if huge_dir else None
            r = measure(b, path, size, cfg.block_bytes, cfg.depth, buf, phase="pair")
            r.fio_gbps = fio.gbps if fio else None
            if fio_h is not None:
                r.extra["fio_huge_gbps"] = fio_h.gbps
            pairs.append(r)
            note(r)
    summary = []
    for b, cfg in best.items():
        mine = [r for r in pairs if r.backend == b]
        ratios = [r.gbps / r.fio_gbps for r in mine if r.fio_gbps]
        huge_ratios = [r.gbps / r.extra["fio_huge_gbps"] for r in mine if r.extra.get("fio_huge_gbps")]
        summary.append({
            "backend": b, "block_bytes": cfg.block_bytes, "depth": cfg.depth,
            "gbps_median": statistics.median(r.gbps for r in mine),
            "gbps_max": max(r.gbps for r in mine),
            "fio_ratio_median": statistics.median(ratios) if ratios else None,
            "fio_ratio_all": ratios,
            "fio_huge_ratio_median": statistics.median(huge_ratios) if huge_ratios else None,
            "cpu_s_per_gb": statistics.median(r.cpu_s_per_gb for r in mine),
        })
    return {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "file": path, "size_bytes": size, "repeats": repeats, "eviction": "posix_fadvise(DONTNEED) before every pass",
        "buffer_pages": pages, "thp_mode": thp_mode(),
        "cpu_accounting": "backends: getrusage(RUSAGE_SELF) user+sys over the pass; fio: its job threads' usr+sys",
        "fio": _fio_summary(fio_runs), "fio_huge": _fio_summary(fio_huge_runs), "summary": summary,
        "runs": [dict(asdict(r), gbps=r.gbps) for r in results + pairs + fio_runs + fio_huge_runs],
        "default_reader": "native" if native_ok else "python",
        "recommendation": recommend(summary, native_ok),
    }


def _fio_summary(runs: list[Result]) -> dict[str, Any] | None:
    if not runs:
        return None
    return {"gbps_median": statistics.median(r.gbps for r in runs), "gbps_all": [r.gbps for r in runs],
            "cpu_s_per_gb": statistics.median(r.cpu_s_per_gb for r in runs)}


# bench-disk backend → the offload.enable(reader=...) name that gives it (the others are for comparison).
ENABLE_NAMES = {"native-threads": "native", "native-uring": "native-uring", "python-direct": "python", "mmap": "mmap"}


def recommend(summary: list[dict[str, Any]], native_ok: bool) -> str:
    """One line: the fastest backend, and whether ``offload.enable``'s default reader is close enough.

    Medians within 5% are not told apart: this class of disk drifts more than that between passes.
    """
    default = "native" if native_ok else "python"
    fastest = max(summary, key=lambda s: s["gbps_median"])
    line = (f"fastest here: {fastest['backend']} (block {format_bytes(fastest['block_bytes'])}, depth "
            f"{fastest['depth']}, {fastest['gbps_median']:.2f} GB/s, {fastest['cpu_s_per_gb']:.2f} cpu s/GB)")
    usable = [s for s in summary if s["backend"] in ENABLE_NAMES]
    mine = next((s for s in usable if ENABLE_NAMES[s["backend"]] == default), None)
    if not usable or mine is None:
        return line + f"; offload.enable uses reader='{default}' by default"
    best = max(usable, key=lambda s: s["gbps_median"])
    bounced = next((s for s in summary if s["backend"] == "native-bounce"), None)
    if bounced is not None and mine["backend"] == "native-threads" and bounced["gbps_median"] >= 1.05 * mine["gbps_median"]:
        line += (f"; through a bounce region the native reader read {bounced['gbps_median'] / mine['gbps_median']:.2f}x "
                 f"direct: prefetch='auto' reads that way on this disk once `offload tune` has measured it")
    if mine["gbps_median"] >= 0.95 * best["gbps_median"]:
        return line + f"; offload.enable's default reader='{default}' is within 5% of the best: keep it"
    return (line + f"; offload.enable's default reader='{default}' read {mine['gbps_median']:.2f} GB/s, "
            f"{best['backend']} {best['gbps_median']:.2f}: pass offload.enable(..., reader='{ENABLE_NAMES[best['backend']]}')")


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per backend at its best settings, fio's rows first."""
    lines = [f"file {report['file']} ({format_bytes(report['size_bytes'])}), cold cache ({report['eviction']}), "
             f"{report['repeats']} alternating repeats, buffer pages {report['buffer_pages']}"]
    fio, fio_h = report.get("fio"), report.get("fio_huge")
    cols = ["backend", "block", "depth", "GB/s (median)", "vs fio (median of pairs)"]
    cols += ["vs fio on huge pages"] if fio_h else []
    cols += ["cpu s/GB"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]

    def row(*cells: str) -> None:
        lines.append("| " + " | ".join(cells) + " |")

    if fio:
        row("fio (best of 1x32, 2x16)", "1.00 MiB", "32", f"{fio['gbps_median']:.2f}", "1.00",
            *(["-"] if fio_h else []), f"{fio['cpu_s_per_gb']:.3f}")
    if fio_h:
        row("fio, huge-page buffers", "1.00 MiB", "32", f"{fio_h['gbps_median']:.2f}", "-", "1.00",
            f"{fio_h['cpu_s_per_gb']:.3f}")
    for x in report["summary"]:
        ratio = f"{x['fio_ratio_median']:.2f}" if x["fio_ratio_median"] is not None else "n/a (no fio)"
        extra = [f"{x['fio_huge_ratio_median']:.2f}" if x.get("fio_huge_ratio_median") else "-"] if fio_h else []
        row(x["backend"], format_bytes(x["block_bytes"]), str(x["depth"]), f"{x['gbps_median']:.2f}", ratio, *extra,
            f"{x['cpu_s_per_gb']:.3f}")
    lines.append(report["recommendation"])
    return "\n".join(lines)


def thp_mode() -> str:
    """The kernel's transparent-huge-page setting ("madvise" is enough: HostBuffer advises)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def main(a: Any) -> int:
    from ..writer import _progress
    path = a.path or os.getcwd()
    if os.path.isdir(path):
        path = os.path.join(path, "offload-bench-disk.bin")
    elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f"{os.path.dirname(os.path.abspath(path))} is not a folder: pass a folder or a file path "
                         f"on the disk to measure")
    created = not os.path.lexists(path)
    if not created and not is_own_test_file(path):
        raise UsageError(f"{path} exists and is not a bench-disk test file: refusing to overwrite or remove it; pass "
                         f"a folder or a file name that does not exist")
    room_for_test_file(path, a.size)  # before the progress bar: a refusal is one line
    try:
        bar = _progress(a.size, f"creating {path}", True)
        try:
            make_test_file(path, a.size, bar.update)
        finally:
            bar.close()
        report = run(path, a.size, a.repeats, a.block_size, a.depth, log=lambda s: print(s, file=sys.stderr, flush=True),
                     huge=a.pages == "huge")
    finally:
        if created and not a.keep:
            with contextlib.suppress(OSError):
                os.unlink(path)
    print(table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _aligned(text: str) -> int:
    """A block or file size O_DIRECT can read: a positive multiple of 4 KiB."""
    import argparse
    n = byte_size(text)
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive multiple of 4 KiB (O_DIRECT reads whole pages)")
    return n


def add_parser(sub: Any) -> None:
    b = add_command(sub, "bench-disk", "measure read bandwidth of each reader backend (and fio) on a disk",
                    "Cold-cache sequential read bandwidth and CPU cost of every reader backend, alternating with fio "
                    "on the same file. Writes only its own test file (removed at the end unless --keep); an existing "
                    "file that is not one of its own is refused, untouched.")
    b.add_argument("path", nargs="?", help="folder (a test file is created in it) or a new file path, on the disk to "
                   "measure (default: the current folder)")
    b.add_argument("--size", type=_aligned, default=parse_bytes("4GiB"), metavar="BYTES",
                   help="test file size, e.g. 4GiB (default: 4GiB); bigger than the disk's cache for honest figures")
    b.add_argument("--block-size", type=_aligned, action="append", metavar="BYTES",
                   help="block size to try, repeatable (default: each backend's small grid)")
    b.add_argument("--depth", type=positive_int, action="append", help="queue depth to try, repeatable (default: the grid's)")
    b.add_argument("--repeats", type=positive_int, default=3, metavar="N", help="alternating fio/backend pairs per backend")
    b.add_argument("--json", type=output_file, metavar="FILE", help="write the full report as JSON (its folder must exist)")
    b.add_argument("--keep", action="store_true", help="keep the test file it created")
    b.add_argument("--pages", choices=("huge", "4k"), default="huge",
                   help="destination buffer pages: huge (2 MiB, what offload.enable uses) or 4k, to see the difference")
    b.set_defaults(fn=main)
