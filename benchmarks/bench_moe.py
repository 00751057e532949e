"""Mixtures of experts (issue 20): whole blocks vs routed experts vs routed + expert cache vs Accelerate, cold.

One run, the same checkpoint folder for every row (a random Qwen3-30B-A3B-shaped model, its first
``N`` layers: ``--random qwen3-30b-a3b:N``), bf16, greedy decode of a 16-token prompt:

* in memory (``from_pretrained``, no offload): the compute floor, warm;
* (a) offload, whole blocks streamed, every expert included (``enable(..., routed_experts=False)``),
  ``ram_tier=0``; and the same within ``cpu_memory`` (its RAM tier holds some whole blocks);
* (b) offload, routed experts, no expert cache (``ram_tier=0``: ``runtime.enable`` gives the cache
  what the RAM tier's size leaves, ``ram_tier - tier``, i.e. 0);
* (c) offload, routed experts + expert cache within ``cpu_memory`` (the cache gets what the
  resident weights, the ring and the RAM tier leave), a row per ``--expert-policy``. (b) and (c) run with and without prediction
  (``enable(predict_experts=)``: layer i+1's router applied to layer i's input starts reading its
  experts while layer i computes) when the installed offload has it;
* (d) Accelerate ``from_pretrained(device_map=every block on "disk", offload_folder=...)``.

Each routed row runs with the model's own routers (random weights spread tokens evenly over the
experts, but a random model's greedy decode repeats one token, so decode steps route alike), with
``--uniform`` a synthetic router drawing each token's top-k uniformly at random (a cache's worst
case), and with a *skewed* router: a forward hook on every router adds ``--skew-bias`` to the logits of
``--skew-hot`` experts per layer (chosen at random per layer, seed 0) before its softmax/top-k, so
a few experts dominate, as in trained models. The hook is applied the same way to every row.

Cold: before every forward (not timed) every file involved (the checkpoint's shards, Accelerate's
offload folder) is evicted with ``posix_fadvise(DONTNEED)``; offload reads with O_DIRECT. Per-token
times exclude the prefill. bytes/token: offload's own count (``stats().bytes_read``) and the
process's ``/proc/self/io`` ``read_bytes`` (what reached the disk, any reader, Accelerate included).
Disk floor: bench-disk's best O_DIRECT reader on a test file of its own, just before each cold row.
Expert reads: their bandwidth from the reader's own timing beside the disk's O_DIRECT bandwidth on the
checkpoint's own shards with offload's reader, just before and just after each offload row (``--shard-floor``).

    python benchmarks/bench_moe.py --random qwen3-30b-a3b:6 --cpu-memory 4GiB --new-tokens 5 \\
        --workdir /root/bench-work --json bench-out/moe.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import itertools
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from typing import Any

import torch

import offload
import offload.experts
import offload.experts.cache
from offload._memory import format_bytes, parse_bytes
from offload.cli.bench import DiskFloor, _versions, decode_times, evict
from offload.cli.models import DTYPES, model_class, random_checkpoint
from offload.convert import cached_store
from offload.errors import OffloadError
from offload.experts import experts_modules
from offload.plan import disk_device_map, find_units
from offload.staging import HostBuffer
from offload.runtime import build_on_meta
from offload.store import Store

PRED = {None: "", False: ", no prediction", True: " + prediction"}
ROWS = ("memory", "whole", "whole-budget", "routed", "cached", "accelerate")


def io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def device_read_bytes() -> int:
    """Bytes read from every whole disk since boot (/proc/diskstats, sectors of 512 B): the whole machine."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            x = line.split()
            if re.fullmatch(r"(?:[vs]d|xvd)[a-z]+|nvme\d+n\d+", x[2]):
                total += int(x[5]) * 512
    return total


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every layer's router (a module with ``top_k`` and ``num_experts`` returning logits, scores, indices)."""
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")]


@contextlib.contextmanager
def router_hooks(model: torch.nn.Module, make_hook: Any):
    """``make_hook(router)`` as a forward hook on every router, removed on exit."""
    handles = [r.register_forward_hook(make_hook(r)) for r in routers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def skewed(model: torch.nn.Module, hot: int, bias: float, seed: int = 0) -> Any:
    """Add ``bias`` to the logits of ``hot`` experts per router (a different random set per layer)."""
    g = torch.Generator().manual_seed(seed)

    def make(r: torch.nn.Module) -> Any:
        b = torch.zeros(r.num_experts)
        b[torch.randperm(r.num_experts, generator=g)[:hot]] = bias

        def hook(module, args, out):
            logits = out[0] + b.to(out[0].dtype)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top, idx = torch.topk(probs, module.top_k, dim=-1)
            if getattr(module, "norm_topk_prob", False):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx
        return hook
    return router_hooks(model, make)


def uniform(model: torch.nn.Module, seed: int = 0) -> Any:
    """Replace every router's choice by ``top_k`` experts drawn uniformly at random per token (seeded, so
    every row sees the same routing): a cache's worst case, whatever the tokens. Weights: the router's
    own softmax at those experts, renormalized."""
    g = torch.Generator().manual_seed(seed)

    def hook(module, args, out):
        logits = out[0]
        idx = torch.stack([torch.randperm(module.num_experts, generator=g)[:module.top_k]
                           for _ in range(logits.shape[0])]).to(out[2].dtype)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1).gather(1, idx)
        return logits, (probs / probs.sum(dim=-1, keepdim=True)).to(logits.dtype), idx
    return router_hooks(model, lambda r: hook)


class Counter:
    """Routing seen per forward (a pre-hook on every experts module, so it sees what the router hooks of a
    row chose): distinct experts per layer since ``reset``, and the trace of every forward (``replay``)."""

    def __init__(self, model: torch.nn.Module):
        self.seen: list[set[int]] = []
        self.trace: list[tuple[int, list[int]]] = []  # (layer, distinct routed experts) per experts forward
        self.decode_from = 0  # the trace's first forward of the timed decode steps
        self.handles = []
        mods = [m for _, b in find_units(model) for _, m, _ in experts_modules(b)]
        for k, m in enumerate(mods):
            self.seen.append(set())
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, k=k: self.add(k, args[1])))

    def add(self, k: int, index: torch.Tensor) -> None:
        routed = sorted({int(e) for e in index.flatten().tolist()})
        self.seen[k].update(routed)
        self.trace.append((k, routed))

    def reset(self) -> None:
        for s in self.seen:
            s.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def shard_floor(paths: list[str], nbytes: int, buf: Any, seed: int) -> float:
    """The disk's O_DIRECT bandwidth on the checkpoint's own shards with offload's reader at its best
    (the native reader at its defaults, 1 MiB requests, 16 in flight, and through its bounce region:
    reads alternate between the two and the faster counts, as a run reads whichever its disk profile
    chose) into a huge-page buffer, after evicting them: ``nbytes`` in reads of ``buf``'s size at
    page-aligned offsets chosen by ``seed``."""
    import random
    from offload.io import get_reader
    rng = random.Random(seed)
    readers = [get_reader(), get_reader()]
    for r, bounce in zip(readers, (False, True)):
        if hasattr(r, "bounce"):
            r.bounce, r.bounce_auto = bounce, False
    for f in paths:
        evict([f])
    done, seconds = [0, 0], [0.0, 0.0]
    for k in itertools.count():
        if sum(done) >= nbytes:
            break
        i = k % 2
        reader = readers[i]
        path = rng.choice(paths)
        n = min(buf.nbytes, nbytes - sum(done), os.path.getsize(path) // 4096 * 4096)
        at = rng.randrange(0, os.path.getsize(path) - n + 1) // 4096 * 4096
        h = reader.open(path)
        try:
            t0 = time.perf_counter()
            reader.read(h, at, buf.view(0, n))
            seconds[i] += time.perf_counter() - t0
        finally:
            reader.close(h)
        done[i] += n
    return max(d / s for d, s in zip(done, seconds) if s > 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", default="qwen3-30b-a3b:6", help="NAME:LAYERS (offload run --help)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--cpu-memory", default="4GiB", help="offload's budget for rows (a) within budget and (c)")
    p.add_argument("--new-tokens", type=int, default=5, help="per generate; the first (prefill) is not timed")
    p.add_argument("--runs", default=",".join(ROWS) + ",memory",
                   help=f"comma-separated from {','.join(ROWS)}, run in this order (repeats allowed)")
    p.add_argument("--skew-hot", type=int, default=16, help="experts per layer the skewed router favours")
    p.add_argument("--skew-bias", type=float, default=2.0, help="logit bias added to them")
    p.add_argument("--no-skew", action="store_true", help="no skewed-router rows")
    p.add_argument("--uniform", action="store_true",
                   help="also rows with a synthetic router drawing top-k experts uniformly at random per token: a "
                        "random model's greedy decode repeats its token, so its own routers repeat their choice")
    p.add_argument("--no-disk-floor", action="store_true")
    p.add_argument("--experts-implementation", help="set on every model (e.g. eager); default: Transformers' own "
                   "(grouped_mm where it can dispatch, which on the CPU touches every expert's weights per call)")
    p.add_argument("--expert-policy", default=None,
                   help=f"comma-separated expert cache policies for the (c) rows, each a row of its own, from "
                        f"{','.join(offload.experts.POLICIES)} (default: offload's, {offload.experts.cache._POLICY})")
    p.add_argument("--shard-floor", default="1GiB", help="before each cold offload row, read this much of the "
                   "checkpoint's shards O_DIRECT with offload's reader into a huge-page buffer: the disk's bandwidth "
                   "beside the expert reads' (0: off)")
    p.add_argument("--prediction", default="both", choices=("both", "off", "on"),
                   help="routed rows with and/or without enable(predict_experts=)")
    p.add_argument("--per-expert", action="store_true",
                   help="read a copy saved by save_pretrained (one tensor per expert, as hub checkpoints ship) "
                        "instead of the fused [E, ...] tensors")
    p.add_argument("--workdir", default=os.path.expanduser("~/bench-work"))
    p.add_argument("--json", help="write the report here (its folder must exist)")
    a = p.parse_args()
    order = a.runs.split(",")  # in this order; a name may repeat (e.g. memory first and last)
    if set(order) - set(ROWS):
        p.error(f"--runs: choose from {','.join(ROWS)}")
    policies = a.expert_policy.split(",") if a.expert_policy else [offload.experts.cache._POLICY]
    if set(policies) - set(offload.experts.POLICIES):
        p.error(f"--expert-policy: choose from {','.join(offload.experts.POLICIES)}")
    shard_bytes = parse_bytes(a.shard_floor)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dtype = DTYPES[a.dtype]
    budget = parse_bytes(a.cpu_memory)
    tag = a.random.replace(":", "-")
    folder = random_checkpoint(a.random, dtype, os.path.join(a.workdir, "random", f"{tag}-{a.dtype}"))
    if a.per_expert:  # the same weights as Transformers' save_pretrained writes them: one tensor per expert
        per = folder + "-per-expert"
        if not os.path.exists(os.path.join(per, "config.json")):
            log(f"writing {per} (save_pretrained: one tensor per expert, as hub checkpoints ship)")
            import transformers as tf
            m = model_class(tf.AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=dtype)
            m.save_pretrained(per + ".partial")
            del m
            os.replace(per + ".partial", per)
        folder, tag = per, tag + "-per-expert"
    os.environ["OFFLOAD_CACHE"] = os.path.join(a.workdir, "cache-moe")
    store = cached_store(folder, dtype)  # an index of the folder's shards (read in place)
    st = Store.open(store)
    units = [u.name for u in st.units]
    acc_dir = os.path.join(a.workdir, f"accelerate-offload-{tag}")
    cold_paths = [folder, acc_dir]
    disk = DiskFloor(None, a.workdir, 1 << 30, log, not a.no_disk_floor)
    shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    floor_buf = HostBuffer(256 << 20) if shard_bytes else None  # huge pages where THP allows
    if floor_buf is not None:
        floor_buf.tensor.fill_(0)  # touched once, as the prefetcher's ring is
    meta = build_on_meta(folder, dtype)
    cfg = meta.config
    one_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * dtype.itemsize
    blocks = [(n, sum(p.numel() * p.element_size() for p in m.parameters())) for n, m in find_units(meta)]
    block_bytes = sum(b for _, b in blocks)
    expert_bytes = len(blocks) * cfg.num_experts * one_expert
    disk_map = disk_device_map(meta, [n for n, _ in blocks])
    del meta
    ids = torch.tensor([[(17 * i + 3) % cfg.vocab_size for i in range(16)]])
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    ref: dict[str, list[int]] = {}
    variants = [("own (random weights)", None)]
    if a.uniform:
        variants.append(("uniform random (synthetic)", "uniform"))
    if not a.no_skew:
        variants.append((f"skewed ({a.skew_hot} hot of {cfg.num_experts}, +{a.skew_bias} logit)", (a.skew_hot, a.skew_bias)))

    def measure(name: str, router: str, model: torch.nn.Module, skew: Any, handle: Any = None, cold: bool = True,
                **extra: Any) -> None:
        if a.experts_implementation:
            model.set_experts_implementation(a.experts_implementation)
        extra["experts_implementation"] = model.config._experts_implementation
        floor = disk.measure() if cold else None
        floors = cold and handle is not None and floor_buf is not None
        shard_before = shard_floor(shards, shard_bytes, floor_buf, 2 * len(rows)) if floors else None
        io: dict[str, int] = {}
        count = Counter(model)

        def at_decode() -> None:
            if handle is not None:
                handle.reset_stats()
            count.reset()
            count.decode_from = len(count.trace)
            io["start"] = io_read_bytes()
            io["dev"] = device_read_bytes()
        ctx = (uniform(model) if skew == "uniform" else skewed(model, *skew) if skew else contextlib.nullcontext())
        with ctx:
            d = decode_times(model, ids, a.new_tokens, cold_paths if cold else None, at_decode=at_decode)
        n = len(d.times)
        io_bytes, dev_bytes = io_read_bytes() - io["start"], device_read_bytes() - io["dev"]  # before the floor's reads
        count.close()
        shard_after = shard_floor(shards, shard_bytes, floor_buf, 2 * len(rows) + 1) if floors else None
        # the disk drifts (and is shared): its bandwidth just before and just after the row; the row is compared
        # with the better of the two (the conservative ratio)
        shard_bps = max(shard_before, shard_after) if floors else None
        if floors:
            log(f"  disk O_DIRECT on the shards (offload's reader, huge pages): {shard_before / 1e9:.2f} GB/s before, "
                f"{shard_after / 1e9:.2f} after")
        same = ref.setdefault(router, d.tokens) == d.tokens
        row = {"run": name, "router": router, "cache": "cold" if cold else "warm", "samples": d.times,
               "s_per_token_min": min(d.times), "s_per_token_median": statistics.median(d.times),
               "io_read_bytes_per_token": io_bytes / n, "device_read_bytes_per_token": dev_bytes / n, "same_tokens": same,
               "distinct_experts_per_layer_decode": statistics.mean(len(s) for s in count.seen),
               "routing_trace": count.trace, "routing_trace_decode_from": count.decode_from, **extra}
        if floor is not None:
            row["disk_bps"], row["disk_floor_by"] = floor
        if shard_bps:
            row.update(shard_bps=shard_bps, shard_bps_before=shard_before, shard_bps_after=shard_after)
        if handle is not None:
            s = handle.stats()
            hm = s.expert_hits + s.expert_misses
            row.update(bytes_per_token=s.bytes_read / n, expert_bytes_per_token=s.expert_bytes_read / n,
                       wait_fraction=s.wait_seconds / sum(d.times), read_seconds_per_token=s.read_seconds / n,
                       expert_hits=s.expert_hits, expert_misses=s.expert_misses,
                       expert_hit_rate=s.expert_hits / hm if hm else None, expert_cache_bytes=s.expert_cache_bytes,
                       expert_predicted_bytes_per_token=getattr(s, "expert_predicted_bytes", 0) / n,
                       expert_predicted_used_bytes_per_token=getattr(s, "expert_predicted_used_bytes", 0) / n,
                       ram_tier_units=s.ram_tier_units, streamed_units=s.streamed_units, reader=s.reader)
            cache = handle._experts
            if cache is not None:
                row.update(expert_policy=cache.policy.name, expert_evictions=cache.evictions,
                           expert_huge_bytes=sum(t.huge_bytes for st in handle._stagers for t in
                                                 getattr(st, "tables", {}).values()),
                           expert_read_bytes_per_token=cache.read_bytes / n,
                           expert_read_seconds_per_token=cache.read_seconds / n,
                           expert_read_bps=cache.read_bytes / cache.read_seconds if cache.read_seconds else None)
                if shard_bps and row["expert_read_bps"]:
                    row["expert_read_vs_shard"] = row["expert_read_bps"] / shard_bps
        rows.append(row)
        log(f"  {name} [{router}]: {row['s_per_token_median']:.3f} s/token, read "
            f"{format_bytes(row.get('bytes_per_token', row['io_read_bytes_per_token']))}/token"
            + (f", expert hit rate {row['expert_hit_rate']:.2f}" if row.get("expert_hit_rate") is not None else "")
            + (f", expert reads {row['expert_read_bps'] / 1e9:.2f} GB/s" if row.get("expert_read_bps") else "")
            + ("" if same else "  WARNING: tokens differ from the first row"))

    try:
        def memory_row() -> None:
            log("[memory] from_pretrained, the model fully in RAM (compute floor)")
            model = model_class(cfg).from_pretrained(folder, dtype=dtype).eval()
            with torch.no_grad():  # own copies: Transformers may leave weights memory-mapped from the shards
                for prm in model.parameters():
                    prm.data = prm.data.clone()
            gc.collect()
            for router, skew in variants:
                measure("in memory (compute floor)", router, model, skew, cold=False)
            model = None
            gc.collect()

        can_predict = "predict_experts" in inspect.signature(offload.enable).parameters
        predicts = ([False, True] if a.prediction == "both" else [a.prediction == "on"]) if can_predict else [None]

        def pkw(pr: bool | None) -> dict[str, Any]:
            return {} if pr is None else {"predict_experts": pr}

        def offload_row(name: str, routed: bool, skews: list[tuple[str, Any]], **kw: Any) -> None:
            for router, skew in skews:
                model = build_on_meta(store, dtype)
                t0 = time.perf_counter()
                try:
                    handle = offload.enable(model, prefetch=2, store=store, units=units, routed_experts=routed,
                                            progress=False, **kw)
                except OffloadError as e:  # e.g. a budget below resident + ring: refused, as it should be
                    skipped.append(f"{name}: refused: {e}")
                    log(f"  {name}: refused: {e}")
                    return
                enable_s = time.perf_counter() - t0
                measure(name, router, model, skew, handle, enable_seconds=enable_s, routed_experts=routed,
                        budget=kw)
                handle.disable()
                del model
                gc.collect()

        def accelerate_row() -> None:
            log("[d] accelerate from_pretrained(device_map=every block on disk, offload_folder=...)")
            t0 = time.perf_counter()
            model = model_class(cfg).from_pretrained(folder, dtype=dtype, device_map=disk_map,
                                                     offload_folder=acc_dir).eval()
            load_s = time.perf_counter() - t0
            acc_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(acc_dir) for f in fs) \
                if os.path.isdir(acc_dir) else 0
            for router, skew in variants:
                measure("(d) accelerate from_pretrained, blocks on disk", router, model, skew,
                        load_seconds=load_s, offload_folder_bytes=acc_bytes)
            model = None
            gc.collect()

        for run in order:
            if run == "memory":
                memory_row()
            elif run == "whole":
                log("[a] whole blocks, every block streamed (routed_experts=False, ram_tier=0)")
                offload_row("(a) offload whole blocks, ram_tier=0", False, variants[:1], ram_tier=0)
            elif run == "whole-budget":
                log(f"[a'] whole blocks within cpu_memory={a.cpu_memory}")
                offload_row(f"(a') offload whole blocks, cpu_memory={a.cpu_memory}", False, variants[:1],
                            cpu_memory=budget)
            elif run == "routed":
                for pr in predicts:
                    log(f"[b] routed experts, no cache (ram_tier=0){', prediction' if pr else ''}")
                    offload_row(f"(b) offload routed experts, no cache (ram_tier=0){PRED[pr]}", True, variants,
                                ram_tier=0, **pkw(pr))
            elif run == "cached":
                for policy in policies:
                    offload.experts.cache._POLICY = policy  # the private knob: the policy new expert caches use
                    for pr in predicts:
                        log(f"[c] routed experts + expert cache ({policy}), cpu_memory={a.cpu_memory}"
                            f"{', prediction' if pr else ''}")
                        offload_row(f"(c) offload routed + expert cache ({policy}), cpu_memory={a.cpu_memory}"
                                    f"{PRED[pr]}", True, variants, cpu_memory=budget, **pkw(pr))
            elif run == "accelerate":
                accelerate_row()
    finally:
        disk.close()
        if floor_buf is not None:
            floor_buf.close()
    report = {"model": a.random, "dtype": a.dtype, "experts_implementation": a.experts_implementation or "default", "cpu_memory": budget, "new_tokens": a.new_tokens, "prompt_tokens": 16,
              "layers": len(blocks), "block_bytes": block_bytes, "expert_bytes": expert_bytes,
              "one_expert_bytes": one_expert, "top_k": cfg.num_experts_per_tok, "num_experts": cfg.num_experts,
              "checkpoint_bytes": sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)),
              "routed_bytes_per_token_upper_bound": len(blocks) * cfg.num_experts_per_tok * one_expert,
              "prediction": ("rows with and without enable(predict_experts=): the next layer's router on this layer's "
                             "input starts reading its experts early" if "predict_experts" in
                             inspect.signature(offload.enable).parameters else
                             "not implemented: each miss is read once the router has chosen"),
              "eviction": "posix_fadvise(DONTNEED) on the checkpoint's shards and Accelerate's offload folder before "
                          "every forward (not timed); offload reads with O_DIRECT",
              "expert_read_timing": "expert read GB/s = bytes the routed (demand) expert reads brought in / the "
                                    "reader's own time for them, per layer's batch from its first read's start to its "
                                    "last read's end; beside it the disk's O_DIRECT GB/s on the same shards with "
                                    "offload's reader (native, 1 MiB x 16, huge-page buffer), measured just before and "
                                    "just after the row; the ratio uses the better of the two",
              "rows": rows, "skipped": skipped, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                        "python": sys.version.split()[0]},
              "versions": _versions(), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def table(r: dict[str, Any]) -> str:
    out = [f"model {r['model']} ({r['dtype']}): {r['layers']} layers, blocks {format_bytes(r['block_bytes'])} of which "
           f"experts {format_bytes(r['expert_bytes'])} ({r['num_experts']} x {format_bytes(r['one_expert_bytes'])} per "
           f"layer, top-{r['top_k']}: at most {format_bytes(r['routed_bytes_per_token_upper_bound'])} of experts per "
           f"token); prompt 16 tokens, {r['new_tokens']} new (the prefill not timed); cold = files evicted before "
           f"every forward; experts implementation: {r.get('experts_implementation', 'default')}; prediction: {r['prediction']}",
           "| run | router | cache | s/token min | s/token median | read/token (offload) | read/token (/proc/self/io) "
           "| disk read/token (/proc/diskstats, whole machine) "
           "| expert hit rate | predicted/token (used) | experts/layer routed in decode | disk GB/s | disk floor s "
           "| expert reads GB/s | disk O_DIRECT on the shards GB/s | expert reads / disk | same tokens |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        rd = x.get("bytes_per_token")
        floor_b = rd if rd is not None else x["io_read_bytes_per_token"]
        fl = floor_b / x["disk_bps"] if x.get("disk_bps") else None
        hr = x.get("expert_hit_rate")
        ebw = f"{x['expert_read_bps'] / 1e9:.2f}" if x.get("expert_read_bps") else ""
        sbw = f"{x['shard_bps'] / 1e9:.2f}" if x.get("shard_bps") else ""
        ratio = f"{x['expert_read_vs_shard']:.2f}" if x.get("expert_read_vs_shard") else ""
        gbps = f"{x['disk_bps'] / 1e9:.2f}" if x.get("disk_bps") else ""
        pred = (f"{format_bytes(x['expert_predicted_bytes_per_token'])} "
                f"({format_bytes(x['expert_predicted_used_bytes_per_token'])})"
                if x.get("expert_predicted_bytes_per_token") else "")
        out.append(f"| {x['run']} | {x['router']} | {x['cache']} | {x['s_per_token_min']:.3f} | "
                   f"{x['s_per_token_median']:.3f} | {format_bytes(rd) if rd is not None else ''} | "
                   f"{format_bytes(x['io_read_bytes_per_token'])} | {format_bytes(x['device_read_bytes_per_token'])} | "
                   f"{'' if hr is None else f'{hr:.2f}'} | "
                   f"{pred} | {x['distinct_experts_per_layer_decode']:.1f} | "
                   f"{gbps} | "
                   f"{'' if fl is None else f'{fl:.3f}'} | {ebw} | {sbw} | {ratio} | "
                   f"{x['same_tokens']} |")
    out += [f"skipped: {x}" for x in r.get("skipped", [])]
    first = {}
    for x in r["rows"]:
        first.setdefault((x["run"], x["router"]), x["s_per_token_median"])
    own = "own (random weights)"
    a = next((v for (run, _), v in first.items() if run.startswith("(a)")), None)
    for router in dict.fromkeys(x["router"] for x in r["rows"]):
        d = next((v for (run, rt), v in first.items() if run.startswith("(d)") and rt == router), None)
        for (run, rt), v in first.items():
            if rt != router:
                continue
            if run.startswith("(b)") and a:
                out.append(f"[{router}] {run} vs (a) whole blocks ({own}): {a / v:.2f}x faster (target >= 5)")
            if run.startswith("(c)") and d:
                out.append(f"[{router}] {run} vs (d) Accelerate: {d / v:.2f}x faster (target >= 2.5)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
