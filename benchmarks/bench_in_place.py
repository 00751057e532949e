"""Reading a checkpoint in place (issue 21): the folder's own shards vs a converted copy, cold, in one run.

Three parts, each on a random checkpoint of a real architecture (``--random``, written once under
``--workdir``):

1. **Decode speed**: ``offload.load(FOLDER)`` (the cached "store" is an index of byte ranges in the
   folder's shards, read in place) vs ``offload.load(STORE)`` where STORE = ``offload.convert(FOLDER,
   STORE)`` (a copy in the checkpoint's own dtype, what every folder got before), every block streamed
   (``ram_tier=0``, prefetch 2), alternated ``--repeats`` times, the median s/token of each.
2. **Time to the first token on a fresh folder** (nothing cached, the folder evicted): *before* =
   ``offload.convert(FOLDER, STORE)`` (the copy the folder route used to make; forced here with
   convert, since the folder route now indexes a folder in its own dtype) + ``offload.load(STORE)`` +
   one generated token; *after* = ``offload.load(FOLDER)`` (indexes the folder) + one token. Both
   ``ram_tier=0``. Disk each takes = growth of the cache folder (``$OFFLOAD_CACHE``, a fresh one per
   route) or the store's size, in bytes, measured after the token (checksums.json included).
4. The disk each route takes (``--disk-random``, default bloom-560m bf16, a fresh process): the folder
   in its own dtype (an index), with a cast or int8 (a copy), ``enable()`` on a plain module (a
   temporary store) and on an Accelerate-dispatched model (Accelerate's own offload folder reported
   beside it).
3. ``--big bloom-7b1`` (optional): that model in bf16 from its folder (index) with
   ``cpu_memory=--big-cpu-memory``, in a fresh process (so its peak RSS is its own): s/token,
   bytes/token, peak RSS.

Cold: every file involved (the folder's shards and the converted store) is evicted with
``posix_fadvise(DONTNEED)`` before every forward, the eviction not timed (offload reads with O_DIRECT
anyway). Per-token times exclude the prefill (``offload.cli.bench.decode_times``).

    python benchmarks/bench_in_place.py --random bloom-1b7 --dtype fp32 --repeats 3 --new-tokens 4 \\
        --workdir /root/bench-work --json bench-out/in-place.json [--big bloom-7b1]
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from typing import Any

import torch

import offload
from offload._memory import format_bytes
from offload.cli.bench import _versions, decode_times, evict
from offload.cli.models import DTYPES, random_checkpoint


def du(path: str) -> int:
    """Bytes of the files under ``path`` (apparent sizes; what a copy costs in disk)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def prompt(vocab: int, n: int = 16) -> torch.Tensor:
    return torch.tensor([[(17 * i + 3) % vocab for i in range(n)]])


def drop_page_cache_of(paths: list[str]) -> None:
    os.sync()
    evict(paths)


def decode_row(source: str, label: str, cold: list[str], new_tokens: int, **kw: Any) -> dict[str, Any]:
    """Load ``source`` (a folder or a store), decode ``new_tokens`` cold, and return one row."""
    t0 = time.perf_counter()
    model, handle = offload.load(source, prefetch=2, progress=False, **kw)
    load_s = time.perf_counter() - t0
    try:
        d = decode_times(model, prompt(model.config.vocab_size), new_tokens, cold, at_decode=handle.reset_stats)
        s = handle.stats()
        return {"route": label, "source": source, "load_s": load_s, "samples": d.times,
                "s_per_token_median": statistics.median(d.times), "s_per_token_min": min(d.times),
                "bytes_per_token": s.bytes_read / len(d.times), "wait_fraction": s.wait_seconds / sum(d.times),
                "store": s.store, "tokens": d.tokens, "reader": s.reader}
    finally:
        handle.disable()
        del model
        gc.collect()


def first_token(route: str, folder: str, cache: str, store: str | None) -> dict[str, Any]:
    """Seconds from nothing cached to the first generated token, and the disk the route took."""
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(cache)
    os.environ["OFFLOAD_CACHE"] = cache
    drop_page_cache_of([folder])
    t0 = time.perf_counter()
    convert_s = None
    if route == "copy":
        assert store is not None
        shutil.rmtree(store, ignore_errors=True)
        offload.convert(folder, store, progress=False)
        convert_s = time.perf_counter() - t0
        source = store
    else:
        source = folder
    model, handle = offload.load(source, prefetch=2, ram_tier=0, progress=False)
    loaded_s = time.perf_counter() - t0
    ids = prompt(model.config.vocab_size)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    total_s = time.perf_counter() - t0
    path = handle.stats().store
    handle.disable()
    del model
    gc.collect()
    disk = du(cache) + (du(store) if route == "copy" and store else 0)
    return {"route": route, "convert_s": convert_s, "load_s": loaded_s, "first_token_s": total_s,
            "disk_bytes": disk, "store": path, "token": out[0, -1].item()}


def disk_routes(name: str, dtype: str, workdir: str) -> list[dict[str, Any]]:
    """Part 4, in a fresh process: the disk each route takes beyond the checkpoint itself, on ``name``.

    Each route starts from an empty ``$OFFLOAD_CACHE`` of its own; what it wrote is measured (``du``)
    while the model is loaded (enable()'s temporary store is removed by ``disable()``)."""
    import transformers as tf

    from offload.plan import disk_device_map, find_units
    from offload.runtime import build_on_meta
    folder = random_checkpoint(name, DTYPES[dtype], os.path.join(workdir, "random", f"{name}-{dtype}"), progress=False)
    ckpt = du(folder)
    other = "fp32" if dtype != "fp32" else "bf16"
    out = []

    def fresh(tag: str) -> str:
        cache = os.path.join(workdir, f"cache-disk-{tag}")
        shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache)
        os.environ["OFFLOAD_CACHE"] = cache
        return cache

    def add(route: str, written: int, note: str) -> None:
        out.append({"route": route, "bytes": written, "of_checkpoint": written / ckpt, "checkpoint_bytes": ckpt,
                    "note": note})

    for tag, route, kw in (("index", f"offload.load(FOLDER), its own dtype {dtype}", {}),
                           ("cast", f"offload.load(FOLDER, dtype={other}) (a cast)", {"dtype": other}),
                           ("int8", "offload.load(FOLDER, quantize='int8')", {"quantize": "int8"})):
        cache = fresh(tag)
        try:
            model, handle = offload.load(folder, ram_tier=0, progress=False, **kw)
        except Exception as e:  # e.g. torchao missing for int8
            add(route, -1, f"not measured: {type(e).__name__}: {e}")
            continue
        add(route, du(cache), f"the cached store ({handle.stats().store})")
        handle.disable()
        del model
        gc.collect()
    cls = tf.AutoModelForCausalLM
    cache = fresh("enable")
    model = cls.from_pretrained(folder, dtype=DTYPES[dtype])
    handle = offload.enable(model, ram_tier=0, progress=False)
    add("offload.enable(model) on a plain module in memory", du(cache),
        "a temporary store of the streamed blocks, removed by disable()")
    handle.disable()
    del model
    gc.collect()
    cache = fresh("accelerate")
    meta = build_on_meta(folder, DTYPES[dtype])
    dmap = disk_device_map(meta, [n for n, _ in find_units(meta)])
    del meta
    off = os.path.join(workdir, "disk-accelerate-offload")
    shutil.rmtree(off, ignore_errors=True)
    model = cls.from_pretrained(folder, dtype=DTYPES[dtype], device_map=dmap, offload_folder=off)
    acc = du(off) if os.path.isdir(off) else 0
    handle = offload.enable(model, ram_tier=0, progress=False)
    store_bytes = du(cache) + (du(off) - acc if os.path.isdir(off) else 0)
    add("offload.enable(model) on an Accelerate-dispatched model (blocks on disk)", store_bytes,
        f"the store enable() wrote ({handle.stats().store}); Accelerate's own offload folder: {acc} B")
    handle.disable()
    del model
    gc.collect()
    shutil.rmtree(off, ignore_errors=True)
    return out


def big_row(name: str, dtype: str, workdir: str, cpu_memory: str, new_tokens: int) -> dict[str, Any]:
    """Part 3, in a fresh process: ``name`` from its folder (read in place) within ``cpu_memory``."""
    os.environ["OFFLOAD_CACHE"] = os.path.join(workdir, "cache-big")
    folder = random_checkpoint(name, DTYPES[dtype], os.path.join(workdir, "random", f"{name}-{dtype}"), progress=False)
    drop_page_cache_of([folder])
    row = decode_row(folder, f"{name} {dtype} folder (index), cpu_memory={cpu_memory}", [folder], new_tokens,
                     cpu_memory=cpu_memory)
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["checkpoint_bytes"] = du(folder)
    row["cache_bytes"] = du(os.environ["OFFLOAD_CACHE"])
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", default="bloom-1b7")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3, help="alternating folder/store pairs (part 1)")
    p.add_argument("--new-tokens", type=int, default=4, help="per generate; the first (prefill) is not timed")
    p.add_argument("--workdir", default=os.path.expanduser("~/bench-work"),
                   help="random checkpoints, the converted store and the per-route caches go here")
    p.add_argument("--parts", default="1,2,4", help="comma-separated from 1,2,4 (part 3 is --big)")
    p.add_argument("--big", help="part 3: e.g. bloom-7b1 (bf16, read in place, --big-cpu-memory)")
    p.add_argument("--big-dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--big-cpu-memory", default="6GiB")
    p.add_argument("--disk-random", default="bloom-560m", help="part 4's model (the disk each route takes)")
    p.add_argument("--disk-dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--json", help="write the report here (its folder must exist)")
    a = p.parse_args()
    parts = set(a.parts.split(",")) if a.parts else set()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dtype = DTYPES[a.dtype]
    folder = os.path.join(a.workdir, "random", f"{a.random}-{a.dtype}")
    if parts & {"1", "2"}:
        random_checkpoint(a.random, dtype, folder)
    store = os.path.join(a.workdir, f"{a.random}-{a.dtype}.store")
    idx_cache = os.path.join(a.workdir, "cache-index")
    copy_cache = os.path.join(a.workdir, "cache-copy")
    report: dict[str, Any] = {"model": a.random, "dtype": a.dtype, "new_tokens": a.new_tokens,
                              "prompt_tokens": 16, "checkpoint_bytes": du(folder) if os.path.isdir(folder) else 0,
                              "eviction": "posix_fadvise(DONTNEED) on the folder's shards and the store before every "
                                          "forward (not timed); offload reads with O_DIRECT",
                              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "python": sys.version.split()[0]}, "versions": _versions()}
    if "2" in parts or ("1" in parts and not os.path.exists(os.path.join(store, "manifest.json"))):
        first = []
        for route in ("index", "copy", "index"):  # index twice: the first pays the process's one-time costs
            log(f"[part 2] first token, {route}: fresh cache")
            r = first_token(route, folder, idx_cache if route == "index" else copy_cache, store)
            log(f"  {route}: {r['first_token_s']:.1f} s to the first token, disk {format_bytes(r['disk_bytes'])}")
            first.append(r)
        report["first_token"] = first
    if "1" in parts:
        os.environ["OFFLOAD_CACHE"] = idx_cache  # offload.load(folder) reuses part 2's index
        rows: dict[str, list[dict[str, Any]]] = {"folder (index, read in place)": [], "store (converted copy)": []}
        for k in range(a.repeats):
            order = list(rows) if k % 2 == 0 else list(rows)[::-1]
            for label in order:
                src = folder if label.startswith("folder") else store
                r = decode_row(src, label, [folder, store], a.new_tokens, ram_tier=0)
                rows[label].append(r)
                log(f"  [{k}] {label}: {r['s_per_token_median']:.3f} s/token, {format_bytes(r['bytes_per_token'])}"
                    f"/token, waited {100 * r['wait_fraction']:.0f}%")
        toks = {lbl: [r["tokens"] for r in rs] for lbl, rs in rows.items()}
        same = len({json.dumps(t) for ts in toks.values() for t in ts}) == 1
        med = {lbl: statistics.median(r["s_per_token_median"] for r in rs) for lbl, rs in rows.items()}
        pairs = [s["s_per_token_median"] / f["s_per_token_median"]
                 for f, s in zip(*(rows[lbl] for lbl in rows))]
        report["decode"] = {"rows": rows, "median_s_per_token": med, "same_tokens": same,
                            "speed_folder_over_store_median_of_pairs": statistics.median(pairs),
                            "speed_folder_over_store_pairs": pairs}
    if "4" in parts:
        log(f"[part 4] the disk each route takes, on {a.disk_random} {a.disk_dtype} (a fresh process)")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            report["disk"] = pool.apply(disk_routes, (a.disk_random, a.disk_dtype, a.workdir))
        report["disk_model"] = f"{a.disk_random} {a.disk_dtype}"
    if a.big:
        log(f"[part 3] {a.big} {a.big_dtype} from its folder, cpu_memory={a.big_cpu_memory} (a fresh process)")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            report["big"] = pool.apply(big_row, (a.big, a.big_dtype, a.workdir, a.big_cpu_memory, a.new_tokens))
    print(table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def table(report: dict[str, Any]) -> str:
    out = [f"model {report['model']} ({report['dtype']}), checkpoint {format_bytes(report['checkpoint_bytes'])}, "
           f"prompt 16 tokens, {report['new_tokens']} new tokens (the first is the prefill, not timed), cold"
           ] if "decode" in report or "first_token" in report else []
    if "decode" in report:
        d = report["decode"]
        out += ["", "| route (every block streamed, ram_tier=0, prefetch 2) | s/token per run (median of its decode steps) "
                    "| median s/token | read/token | load s (median) |", "|---|---|---|---|---|"]
        for lbl, rs in d["rows"].items():
            runs = ", ".join(f"{r['s_per_token_median']:.3f}" for r in rs)
            out.append(f"| {lbl} | {runs} | "
                       f"{d['median_s_per_token'][lbl]:.3f} | {format_bytes(statistics.median(r['bytes_per_token'] for r in rs))} | "
                       f"{statistics.median(r['load_s'] for r in rs):.1f} |")
        out.append(f"folder speed / store speed: median of pairs {d['speed_folder_over_store_median_of_pairs']:.3f} "
                   f"(pairs {', '.join(f'{x:.3f}' for x in d['speed_folder_over_store_pairs'])}); target >= 0.97; "
                   f"same greedy tokens in every run: {d['same_tokens']}")
    if "first_token" in report:
        out += ["", "| fresh folder, nothing cached | convert s | to model loaded s | to first token s | disk taken |",
                "|---|---|---|---|---|"]
        for r in report["first_token"]:
            name = ("after: offload.load(FOLDER) (index, read in place)" if r["route"] == "index" else
                    "before: offload.convert(FOLDER, STORE) + offload.load(STORE) (a copy)")
            conv = "" if r["convert_s"] is None else f"{r['convert_s']:.1f}"
            out.append(f"| {name} | {conv} | {r['load_s']:.1f} | {r['first_token_s']:.1f} | "
                       f"{format_bytes(r['disk_bytes'])} ({r['disk_bytes']} B, "
                       f"{100 * r['disk_bytes'] / report['checkpoint_bytes']:.3f}% of the checkpoint) |")
    if "disk" in report:
        d = report["disk"]
        out += ["", f"| route ({report['disk_model']}: {d[0]['checkpoint_bytes']} B checkpoint) | disk written beyond the checkpoint | of the checkpoint | what |",
                "|---|---|---|---|"]
        for x in d:
            out.append(f"| {x['route']} | {format_bytes(x['bytes']) if x['bytes'] >= 0 else 'n/a'} | "
                       f"{100 * x['of_checkpoint']:.2f}% | {x['note']} |")
    if "big" in report:
        b = report["big"]
        out += ["", "| big model from its folder | s/token min / median | read/token | peak RSS | cache taken |",
                "|---|---|---|---|---|",
                f"| {b['route']} | {b['s_per_token_min']:.2f} / {b['s_per_token_median']:.2f} | "
                f"{format_bytes(b['bytes_per_token'])} | {format_bytes(b['peak_rss_bytes'])} | "
                f"{format_bytes(b['cache_bytes'])} |"]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
