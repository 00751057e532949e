"""``offload bench``: greedy decode, side by side in one run, on the same files and prompt.

Rows: the model fully in memory (compute floor); Accelerate's disk offload both ways users reach it
(``from_pretrained(device_map=..., offload_folder=...)`` and ``load_checkpoint_and_dispatch``);
this runtime at several prefetch depths; each cold (every file involved evicted with
``POSIX_FADV_DONTNEED`` before every forward, the eviction itself not timed) and warm. fio is run on
the same disk before each cold row so the I/O floor is measured in the same minute as the row.

Per-token time is decode only: the prefill forward is excluded, and each later forward (plus the
generate step around it) is one sample; min and median are reported.
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
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._memory import format_bytes
from .models import DTYPES, meta_model, model_class, random_checkpoint, random_name
from .options import UsageError, add_command, at_least, byte_size, choice_list, int_list, output_file

RUNS = ("memory", "accelerate", "dispatch", "offload")
FIO_FILE_BYTES = 4 << 30  # fio's test file beside the model's files: its I/O floor, measured in the same minute


def _files_under(paths: Iterable[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isfile(p):
            out.append(p)
        elif os.path.isdir(p):
            for root, _, files in os.walk(p):
                out += [os.path.join(root, f) for f in files]
    return out


def evict(paths: Iterable[str]) -> None:
    for f in _files_under(paths):
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def decode_times(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, cold_paths: list[str] | None) -> list[float]:
    """Seconds per decode token (prefill excluded); evicts ``cold_paths`` before every forward, untimed."""
    starts: list[float] = []
    ends: list[float] = []

    def pre(module: Any, args: Any) -> None:
        if starts:
            ends.append(time.perf_counter())
        if cold_paths:
            evict(cold_paths)
        starts.append(time.perf_counter())

    h = model.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        ends.append(time.perf_counter())
    finally:
        h.remove()
    return [e - s for s, e in zip(starts[1:], ends[1:])]


def _tokens(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)[0].tolist()


def _row(name: str, cache: str, bs: int, times: list[float], **extra: Any) -> dict[str, Any]:
    return {"run": name, "cache": cache, "batch_size": bs, "s_per_token_min": min(times),
            "s_per_token_median": statistics.median(times), "samples": times, **extra}


def run_bench(checkpoint: str, workdir: str, dtype: torch.dtype, batch_sizes: list[int], prefetches: list[int],
              new_tokens: int, include: set[str], fio_file: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    import accelerate
    import transformers as tf

    from .. import enable
    from ..plan import disk_device_map, find_units
    from .benchdisk import run_fio

    config = tf.AutoConfig.from_pretrained(checkpoint)
    cls = model_class(config)
    blocks = [n for n, _ in find_units(meta_model(config, dtype))]
    prompt = torch.tensor([[(17 * i + 3) % config.vocab_size for i in range(16)]])
    rows: list[dict[str, Any]] = []
    reference: list[int] | None = None
    ckpt_files = _files_under([checkpoint])
    meta = meta_model(config, dtype)
    block_bytes = sum(p.numel() * p.element_size() for n, p in meta.named_parameters()
                      if any(n.startswith(b + ".") for b in blocks))
    del meta
    # Inside a memory cgroup, pages cached by another cgroup would still be hits: start every row
    # from an empty cache so "warm" means what this limit lets the page cache keep.
    limited = bool(os.environ.get("OFFLOAD_BENCH_CGROUP"))
    everything = ckpt_files + [workdir]

    def device_map(model: torch.nn.Module) -> dict[str, str]:
        return disk_device_map(model, blocks)

    fio_rows: list[float] = []

    def fio_now() -> float | None:
        if fio_file is None:
            return None
        r = run_fio(fio_file, os.path.getsize(fio_file))
        if r is None:
            return None
        fio_rows.append(r.gbps)
        log(f"  fio: {r.gbps:.2f} GB/s")
        return r.gbps * 1e9

    def check_tokens(name: str, model: torch.nn.Module) -> bool:
        nonlocal reference
        toks = _tokens(model, prompt, 4)
        if reference is None:
            reference = toks
        same = toks == reference
        if not same:
            log(f"  WARNING: {name} generated different tokens than the first run")
        return same

    for bs in batch_sizes:
        ids = prompt.repeat(bs, 1)
        if "memory" in include:
            log(f"[bs={bs}] model fully in memory")
            model = cls.from_pretrained(checkpoint, dtype=dtype).eval()
            same = check_tokens("memory", model)
            rows.append(_row("in memory (compute floor)", "warm", bs, decode_times(model, ids, new_tokens, None), same_tokens=same))
            model = None
            gc.collect()  # before the next row loads its own copy
        if "accelerate" in include:
            log(f"[bs={bs}] accelerate from_pretrained(device_map=blocks on disk)")
            off = os.path.join(workdir, "accelerate-offload")
            with accelerate.init_empty_weights():
                skeleton = cls.from_config(config, dtype=dtype)
            model = cls.from_pretrained(checkpoint, dtype=dtype, device_map=device_map(skeleton), offload_folder=off).eval()
            same = check_tokens("accelerate", model)
            if limited:
                evict(everything)
            rows.append(_row("accelerate from_pretrained", "warm", bs, decode_times(model, ids, new_tokens, None), same_tokens=same))
            fio = fio_now()
            rows.append(_row("accelerate from_pretrained", "cold", bs,
                             decode_times(model, ids, new_tokens, ckpt_files + [off]), fio_bps=fio))
            model = skeleton = None
            gc.collect()  # before the next row loads its own copy
        if "dispatch" in include:
            log(f"[bs={bs}] accelerate load_checkpoint_and_dispatch (.dat per tensor)")
            off = os.path.join(workdir, "dispatch-offload")
            with accelerate.init_empty_weights():
                model = cls.from_config(config, dtype=dtype)
            model.tie_weights()
            t0 = time.perf_counter()
            model = accelerate.load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map(model),
                                                            offload_folder=off, dtype=dtype).eval()
            load_s = time.perf_counter() - t0
            same = check_tokens("dispatch", model)
            if limited:
                evict(everything)
            rows.append(_row("accelerate load_checkpoint_and_dispatch", "warm", bs,
                             decode_times(model, ids, new_tokens, None), same_tokens=same, load_seconds=load_s))
            fio = fio_now()
            rows.append(_row("accelerate load_checkpoint_and_dispatch", "cold", bs,
                             decode_times(model, ids, new_tokens, ckpt_files + [off]), fio_bps=fio))
            model = None
            gc.collect()  # before the next row loads its own copy
        if "offload" in include:
            off = os.path.join(workdir, "offload-run")
            with accelerate.init_empty_weights():
                skeleton = cls.from_config(config, dtype=dtype)
            for p in prefetches:
                log(f"[bs={bs}] offload prefetch={p}, every block streamed (ram_tier=0)")
                model = cls.from_pretrained(checkpoint, dtype=dtype, device_map=device_map(skeleton), offload_folder=off).eval()
                t0 = time.perf_counter()
                handle = enable(model, prefetch=p, ram_tier=0, store=os.path.join(workdir, "offload-store"))
                enable_s = time.perf_counter() - t0
                same = check_tokens("offload", model)
                store_files = [os.path.join(workdir, "offload-store")]
                fio = fio_now()
                handle.reset_stats()
                times = decode_times(model, ids, new_tokens, ckpt_files + store_files)
                s = handle.stats()
                rows.append(_row(f"offload prefetch={p}", "cold", bs, times, fio_bps=fio, same_tokens=same,
                                 bytes_per_token=s.bytes_read / (new_tokens), wait_fraction=s.wait_seconds / sum(times),
                                 enable_seconds=enable_s, misses=s.misses))
                handle.disable()
                model = handle = None
                gc.collect()  # before the next row loads its own copy
            log(f"[bs={bs}] offload, RAM tier holds the blocks (warm)")
            model = cls.from_pretrained(checkpoint, dtype=dtype, device_map=device_map(skeleton), offload_folder=off).eval()
            handle = enable(model, prefetch=2, store=os.path.join(workdir, "offload-store"))
            same = check_tokens("offload warm", model)
            if limited:
                evict(everything)
            handle.reset_stats()
            times = decode_times(model, ids, new_tokens, None)
            s = handle.stats()
            rows.append(_row("offload RAM tier (default budget)", "warm", bs, times, same_tokens=same,
                             bytes_per_token=s.bytes_read / new_tokens, resident_units=s.resident_units))
            handle.disable()
            model = handle = skeleton = None
            gc.collect()  # before the next row loads its own copy
    return {"rows": rows, "fio_gbps": fio_rows, "block_bytes": block_bytes, "blocks": len(blocks)}


def summarize(report: dict[str, Any]) -> str:
    """The seed-style table plus the ratios this / accelerate and this / ideal."""
    rows = report["rows"]
    compute = {r["batch_size"]: r["s_per_token_median"] for r in rows if r["run"].startswith("in memory")}
    block_bytes = report.get("block_bytes")
    head = f"model {report['model']} ({report['dtype']}), {report['blocks']} blocks"
    if block_bytes:
        head += f" = {format_bytes(block_bytes)}"
    out = [head, "| run | cache | bs | s/token min | s/token median | I/O floor s | ideal s | median / ideal | read/token |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        io_floor = block_bytes / r["fio_bps"] if (r.get("fio_bps") and block_bytes) else None
        floors = [x for x in (io_floor, compute.get(r["batch_size"])) if x is not None]
        # warm rows read nothing from disk: their floor is the compute floor alone
        ideal = compute.get(r["batch_size"]) if r["cache"] == "warm" else (max(floors) if floors else None)
        r["io_floor_s"], r["ideal_s"] = io_floor, ideal
        fmt = lambda x, d=3: "" if x is None else f"{x:.{d}f}"  # noqa: E731
        read = format_bytes(r["bytes_per_token"]) if r.get("bytes_per_token") is not None else ""
        out.append(f"| {r['run']} | {r['cache']} | {r['batch_size']} | {r['s_per_token_min']:.3f} | "
                   f"{r['s_per_token_median']:.3f} | {fmt(io_floor)} | {fmt(ideal)} | "
                   f"{fmt(r['s_per_token_median'] / ideal if ideal else None, 2)} | {read} |")
    for cache in ("cold", "warm"):
        for bs in sorted({r["batch_size"] for r in rows}):
            ours = [r for r in rows if r["run"].startswith("offload") and r["cache"] == cache and r["batch_size"] == bs]
            theirs = [r for r in rows if r["run"].startswith("accelerate") and r["cache"] == cache and r["batch_size"] == bs]
            if not ours:
                continue
            best = min(ours, key=lambda r: r["s_per_token_median"])
            for t in theirs:
                out.append(f"{cache} bs={bs}: {best['run']} / {t['run']} = "
                           f"{best['s_per_token_median'] / t['s_per_token_median']:.2f}")
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
    from ..runtime import cache_dir
    from .benchdisk import make_test_file
    if a.model is None and a.random is None:
        raise UsageError("pass MODEL (a Hugging Face folder) or --random NAME")
    if a.model is not None and not os.path.isdir(a.model):
        raise UsageError(f"{a.model} is not a folder: pass a Hugging Face model folder or --random NAME")
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
    # fio's test file only when fio is there to read it, removed whatever happens next.
    fio_file = None
    if not a.no_fio and shutil.which("fio"):
        fio_file = os.path.join(workdir, f"offload-fio-{os.getpid()}.bin")
    try:
        if fio_file:
            make_test_file(fio_file, FIO_FILE_BYTES)
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        report = run_bench(checkpoint, workdir, dtype, a.batch_sizes, a.prefetch, a.new_tokens, set(a.runs),
                           fio_file, log)
    finally:
        if fio_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fio_file)
    report.update({
        "model": name, "dtype": tag, "new_tokens": a.new_tokens, "runs": a.runs,
        "memory_limit_bytes": int(os.environ.get("OFFLOAD_BENCH_CGROUP", 0)) or None,
        "eviction": "posix_fadvise(DONTNEED) on every checkpoint/offload/store file before every forward (cold rows)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": _versions(), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })
    text = summarize(report)
    if report["memory_limit_bytes"]:
        text = f"inside a memory cgroup limited to {format_bytes(report['memory_limit_bytes'])}\n" + text
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.plot:
        plot(report, a.plot)
    return 0


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("transformers", "accelerate", "safetensors"):
        with contextlib.suppress(ImportError):
            out[mod] = __import__(mod).__version__
    return out


def add_parser(sub: Any) -> None:
    b = add_command(sub, "bench", "decode time vs Accelerate's disk offload and the floors, in one run",
                    "Greedy decode side by side in one run, on the same files and prompt: the model in memory, "
                    "Accelerate's disk offload (from_pretrained and load_checkpoint_and_dispatch), and offload at "
                    "several prefetch depths, cold and warm, with fio's I/O floor when fio is installed.")
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
    b.add_argument("--no-fio", action="store_true", help="skip fio (no I/O floor); without fio installed it is skipped anyway")
    b.add_argument("--json", type=output_file, metavar="FILE", help="write the report as JSON (its folder must exist)")
    b.add_argument("--plot", type=output_file, metavar="FILE", help="draw the table as a PNG chart (needs matplotlib)")
    b.set_defaults(fn=main)
