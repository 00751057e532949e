"""Measure once, then plan: the disk's rate, a unit's compute, and the seconds per pass they predict.

Why here: the right look-ahead depth depends on the machine (how many reads in flight this disk needs
to reach its rate, how long a unit computes), so a fixed default is wrong somewhere. This module owns
the three things a plan needs and the one model that combines them:

  * ``DiskProfile``: aggregate read rate with 1, 2, 3 ... units read at once, measured with the run's
    own reader on the model's own files (read only, page cache evicted first, nothing written), once
    per (machine, filesystem, reader, unit size) and cached under ``<cache>/tune/``. A cached profile
    is used only when every field of where it was measured matches (``_disk_key``).
  * compute per unit: measured by the hooks in decode passes (``Handle`` records it and caches it per
    store, batch size, threads and device when disabled), or, before any run, estimated from a linear
    kernel timed on this machine at the store's dtype/quantization (``estimate_compute``).
  * ``simulate``: the pipeline of ``prefetch.py`` replayed on those numbers — reads share the disk
    (``DiskProfile.rate(k)`` for k reads in flight), a read of streamed unit m starts when unit m-N is
    acquired (the window is the next N streamed units, the ring has N+1 slots), a unit computes once its
    read is done and the previous unit has computed; RAM-tier units only compute; on CUDA a copy stage
    at the measured host-to-device rate sits between read and compute. The last of several passes is
    the steady state. ``choose_prefetch`` runs it for each depth the memory budget allows.

Everything is an estimate with its sources named (``Prediction.basis``); the plan prints it beside the
bound (disk, compute or PCIe) and the run's summary prints measured against it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._fileio import evict
from .config import cache_dir
from .errors import OffloadError

log = logging.getLogger("offload")

VERSION = 1
MAX_CONCURRENCY = 8  # unit reads in flight measured (and the deepest look-ahead chosen)
MEASURE_CAP_BYTES = 128 << 20  # a read longer than this measures no differently; caps the buffers
MIN_STREAMED_BYTES = 64 << 20  # below this per pass, tuning cannot matter: depth 2, nothing measured
POINT_SECONDS = 0.5  # time spent per concurrency level per round
GOOD_ENOUGH = 1.03  # the shallowest depth within 3% of the best predicted time wins (memory is not free)
DEFAULT_PREFETCH = 2  # what "auto" means when nothing is measured (no tune, tiny models)


# ---------------------------------------------------------------------------------------------- disk

@dataclasses.dataclass
class DiskProfile:
    """Aggregate bytes/s with ``k`` unit reads of ``read_bytes`` each in flight, as measured."""
    key: dict[str, Any]
    bps: dict[int, float]
    read_bytes: int
    seconds: float
    measured_at: float

    def rate(self, k: int) -> float:
        """Aggregate rate with ``k`` reads in flight, for planning: the best measured at ``k`` or fewer
        (a deeper queue can always hold back to fewer, and on a shared disk a dip at one depth is
        mostly noise), interpolated between the levels measured; beyond them, the deepest."""
        if k <= 0:
            return 0.0
        env, best = {}, 0.0
        for x in sorted(self.bps):
            best = max(best, self.bps[x])
            env[x] = best
        ks = sorted(env)
        if k in env:
            return env[k]
        lo = max((x for x in ks if x < k), default=ks[0])
        hi = min((x for x in ks if x > k), default=None)
        if hi is None:
            return env[lo]
        f = (k - lo) / (hi - lo)
        return env[lo] + f * (env[hi] - env[lo])

    @property
    def peak(self) -> float:
        return max(self.bps.values())

    def as_json(self) -> dict[str, Any]:
        return {"version": VERSION, "key": self.key, "bps": {str(k): v for k, v in self.bps.items()},
                "read_bytes": self.read_bytes, "seconds": self.seconds, "measured_at": self.measured_at}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DiskProfile:
        return cls(d["key"], {int(k): float(v) for k, v in d["bps"].items()}, int(d["read_bytes"]),
                   float(d["seconds"]), float(d["measured_at"]))


def _machine() -> dict[str, str]:
    mid = ""
    with contextlib.suppress(OSError):
        with open("/etc/machine-id") as f:
            mid = f.read().strip()
    return {"host": socket.gethostname(), "machine_id": mid, "cpu": platform.processor() or platform.machine(),
            "cores": str(os.cpu_count())}


def _mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, filesystem type, source device) of ``path``, from /proc/self/mountinfo."""
    best = ("/", "?", "?")
    real = os.path.realpath(path)
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                mnt = parts[4]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, parts[sep + 1], parts[sep + 2])
    return best


def _disk_key(path: str, reader: str, read_bytes: int) -> dict[str, Any]:
    """Where a disk profile was measured; a cached one is used only when all of it matches."""
    st = os.stat(path)
    mnt, fstype, source = _mount_of(path)
    return {**_machine(), "dev": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", "mount": mnt, "fstype": fstype,
            "source": source, "reader": reader, "read_bytes": read_bytes}


def cache_root() -> str:
    return os.path.join(cache_dir(), "tune")


def _cache_file(kind: str, key: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_root(), f"{kind}-{h}.json")


def forget_disks() -> int:
    """Remove this cache's disk profiles (``offload tune`` measures afresh); nothing else is touched."""
    n = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(cache_root()):
            if name.startswith("disk-") and name.endswith(".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(cache_root(), name))
                    n += 1
    return n


def _read_cached(path: str, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("version") != VERSION or d.get("key") != key:
        return None  # another machine's, another disk's, or an older format: never trusted
    return d


def _write_cached(path: str, doc: dict[str, Any]) -> None:
    """Atomic, and only after checking there is room: a tune cache must never fill a disk."""
    from ._memory import ensure_free_space
    from .writer import write_atomic
    data = json.dumps(doc, indent=1).encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ensure_free_space(os.path.dirname(path), len(data) + (1 << 20), f"the tuning cache file {path}")
    write_atomic(path, data)


Reads = Sequence[tuple[str, int, int]]  # (path, offset, length): one unit's byte ranges


def _capped(reads: Reads, cap: int) -> list[tuple[str, int, int]]:
    out, left = [], cap
    for path, off, n in reads:
        if left <= 0:
            break
        take = min(n, left) // 4096 * 4096 or min(n, left)
        out.append((path, off, take))
        left -= take
    return out


def measure_disk(units: Sequence[Reads], reader: Any, *, max_concurrency: int = MAX_CONCURRENCY,
                 point_seconds: float = POINT_SECONDS, rounds: int = 3) -> tuple[dict[int, float], int, float]:
    """Aggregate read rate of ``units`` (each a list of byte ranges) with 1..``max_concurrency`` read at once.

    Reads cycle through the units, so no range is read twice in a row; the page cache is evicted first
    and the readers use O_DIRECT where the filesystem allows it. Concurrency levels alternate up then
    down over ``rounds`` and each level's rate is the median of its rounds (a shared disk drifts).
    Returns (rate per level, bytes per read, seconds spent).
    """
    from .staging import HostBuffer
    t_all = time.perf_counter()
    from ._memory import available_memory
    size = max(sum(n for _, _, n in u) for u in units)
    # the buffers (one per read in flight) stay within an eighth of free memory (a container's limit too)
    room = max(16 << 20, available_memory() // 8) // max_concurrency // (2 << 20) * (2 << 20)
    cap = max(4096, min(size, MEASURE_CAP_BYTES, room))
    plans = [_capped(u, cap) for u in units]
    plans = [p for p in plans if p]
    per_read = max(sum(n for _, _, n in p) for p in plans)
    paths = sorted({path for p in plans for path, _, _ in p})
    handles = {p: reader.open(p) for p in paths}
    bufs = [HostBuffer(per_read) for _ in range(max_concurrency)]
    step = getattr(reader, "task_bytes", None)
    levels = [k for k in (1, 2, 3, 4, 6, 8) if k <= max_concurrency]
    got: dict[int, list[float]] = {k: [] for k in levels}
    cursor = [0]
    lock = threading.Lock()

    def one(buf: Any) -> int:
        with lock:
            p = plans[cursor[0] % len(plans)]
            cursor[0] += 1
        into = 0
        for path, off, n in p:
            for o in range(0, n, step or n):
                m = min(step or n, n - o)
                reader.read(handles[path], off + o, buf.view(into + o, m))
            into += n
        return into

    try:
        evict(paths)
        order = [k for r in range(rounds) for k in (levels if r % 2 == 0 else levels[::-1])]
        for k in order:
            done = [0] * k
            stop = time.perf_counter() + point_seconds
            errors: list[BaseException] = []

            def worker(i: int) -> None:
                try:
                    while time.perf_counter() < stop or done[i] == 0:
                        done[i] += one(bufs[i])
                except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller
                    errors.append(e)

            t0 = time.perf_counter()
            ts = [threading.Thread(target=worker, args=(i,), name=f"offload-tune-{i}") for i in range(k)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if errors:
                raise errors[0]
            got[k].append(sum(done) / (time.perf_counter() - t0))
            evict(paths)
    finally:
        for h in handles.values():
            reader.close(h)
        for b in bufs:
            b.close()
    return {k: statistics.median(v) for k, v in got.items() if v}, per_read, time.perf_counter() - t_all


def disk_profile(units: Sequence[Reads], reader: Any, *, measure: bool = True, refresh: bool = False,
                 say: Callable[[str], None] | None = None) -> DiskProfile | None:
    """The cached profile of the disk holding ``units`` for this reader and read size, measured now if
    there is none (and ``measure``), or again with ``refresh``. ``None``: nothing cached, not measured."""
    if not units:
        return None
    size = max(sum(n for _, _, n in u) for u in units)
    read_bytes = min(size, MEASURE_CAP_BYTES)
    bucket = 1 << max(0, (read_bytes - 1).bit_length())  # profiles are shared by units of similar size
    key = _disk_key(units[0][0][0], getattr(reader, "name", type(reader).__name__), bucket)
    path = _cache_file("disk", key)
    if not refresh:
        d = _read_cached(path, key)
        if d is not None:
            return DiskProfile.from_json(d)
    if not measure:
        return None
    if say:
        say(f"offload: measuring this disk's read rate with {key['reader']} on the model's own files "
            f"(once per disk; cached in {os.path.dirname(path)}; --no-tune skips)")
    bps, per_read, secs = measure_disk(units, reader)
    prof = DiskProfile(key, bps, per_read, secs, time.time())
    try:
        _write_cached(path, prof.as_json())
    except (OSError, OffloadError) as e:  # not cached: measured again next time, nothing else lost
        log.warning("offload: the disk measurement could not be cached (%s)", e)
    if say:
        say("offload: disk " + ", ".join(f"{k} in flight {v / 1e9:.2f} GB/s" for k, v in sorted(bps.items()))
            + f" ({secs:.1f} s)")
    return prof


# ------------------------------------------------------------------------------------------- compute

def _compute_key(store_id: str, batch: int, device: str) -> dict[str, Any]:
    return {**_machine(), "store": store_id, "batch": batch, "threads": torch.get_num_threads(), "device": device}


@dataclasses.dataclass
class Compute:
    """Seconds per unit and per pass outside the units (embeddings, head, sampling) in a decode pass."""
    unit_s: list[float]
    other_s: float
    measured: bool  # False: estimated from a kernel benchmark, before any run

    def as_json(self) -> dict[str, Any]:
        return {"unit_s": self.unit_s, "other_s": self.other_s}


def cached_compute(store_id: str, batch: int, device: str, n_units: int) -> Compute | None:
    key = _compute_key(store_id, batch, device)
    d = _read_cached(_cache_file("compute", key), key)
    if d is None or len(d.get("unit_s", ())) != n_units:
        return None
    return Compute([float(x) for x in d["unit_s"]], float(d["other_s"]), True)


def save_compute(store_id: str, batch: int, device: str, compute: Compute) -> None:
    key = _compute_key(store_id, batch, device)
    _write_cached(_cache_file("compute", key), {"version": VERSION, "key": key, **compute.as_json()})


_kernel_cache: dict[tuple[str, int, int], float] = {}


def seconds_per_byte(kind: str, batch: int) -> float:
    """Time per weight byte of a decode-shaped linear layer (``kind``: a float dtype name or int8/int4),
    on this machine now. A block's decode compute is mostly such layers, so unit bytes x this is a fair
    first estimate; the hooks' measurement replaces it after the first run."""
    k = (kind, batch, torch.get_num_threads())
    if k in _kernel_cache:
        return _kernel_cache[k]
    n = kk = 4096  # 16-64 MB of weights: large enough that per-call overhead does not dominate
    act = torch.bfloat16 if kind in ("int8", "int4") else getattr(torch, kind)
    w = torch.randn(n, kk, dtype=torch.float32).to(act)
    x = torch.randn(batch, kk, dtype=torch.float32).to(act)
    nbytes = w.numel() * w.element_size()
    if kind in ("int8", "int4"):
        from .quant import QuantizedWeight
        w = QuantizedWeight.from_float(w, kind, 64)
        nbytes = n * kk if kind == "int8" else n * kk // 2
    fn = torch.nn.functional.linear
    with torch.no_grad():
        for _ in range(3):
            fn(x, w)
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 0.3:
            fn(x, w)
            reps += 1
    spb = (time.perf_counter() - t0) / reps / nbytes
    _kernel_cache[k] = spb
    return spb


def estimate_compute(unit_bytes: Sequence[int], resident_bytes: int, kind: str, batch: int) -> Compute:
    spb = seconds_per_byte(kind, batch)
    return Compute([b * spb for b in unit_bytes], resident_bytes * spb, False)


# ---------------------------------------------------------------------------------------------- model

@dataclasses.dataclass
class Prediction:
    """Predicted steady-state seconds per decode pass, and what bounds it."""
    s_per_pass: float
    bound: str  # "disk", "compute" or "pcie"
    read_s: float  # streamed bytes / the disk's rate at this depth: the disk floor
    compute_s: float  # all units' compute plus the rest of the pass: the compute floor
    copy_s: float  # host-to-device copies (CUDA), else 0
    prefetch: int
    basis: str  # where the numbers came from, in words

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class UnitCost:
    nbytes: int
    compute_s: float
    read: bool  # streamed from disk each pass (not in a tier)
    copy: bool = False  # copied host -> device each pass (CUDA, not in the GPU tier)


def simulate(units: Sequence[UnitCost], prefetch: int, rate: Callable[[int], float], *, other_s: float = 0.0,
             h2d_bps: float | None = None, passes: int = 12) -> float:
    """Mean seconds of passes 2..``passes`` through the pipeline ``prefetch.py`` runs (see module doc).

    Reads in flight share ``rate(k)`` equally. Read m (the m-th streamed unit, counting across passes)
    starts when streamed unit m - ``prefetch`` is acquired: its slot was freed and the window reached it.
    A copy (CUDA) starts when its read is done, the previous copy is done and device slot m - N - 1 is
    released; a unit computes after its read/copy and the previous unit. ``other_s`` (resident work:
    embeddings, head) runs at the end of each pass; reads continue meanwhile. One pass more than
    measured is simulated, so the last measured pass shares the disk with the next one's reads.
    """
    total = passes + 1  # one more pass than measured: its reads share the disk with the last measured one
    seq = [u for _ in range(total) for u in units]
    n_units = len(units)
    streamed = [g for g, u in enumerate(seq) if u.read]
    ordinal = {g: m for m, g in enumerate(streamed)}
    remaining: dict[int, float] = {}  # read ordinal -> bytes left
    read_end: dict[int, float] = {}
    started: set[int] = set()
    t = 0.0

    def start(m: int) -> None:
        if m < len(streamed) and m not in started:
            started.add(m)
            remaining[m] = float(seq[streamed[m]].nbytes)
            if remaining[m] <= 0:
                del remaining[m]
                read_end[m] = t

    def run_until(deadline: float | None, want: int | None = None) -> None:
        """Advance time: to ``deadline``, or until read ``want`` is done (reads progress meanwhile)."""
        nonlocal t
        while remaining:
            if want is not None and want not in remaining:
                return
            k = len(remaining)
            each = rate(k) / k
            if each <= 0:
                raise ValueError("the disk profile gives no rate")
            m_first = min(remaining, key=lambda m: remaining[m])
            dt = remaining[m_first] / each
            if deadline is not None and t + dt > deadline:
                for m in remaining:
                    remaining[m] -= each * (deadline - t)
                t = deadline
                return
            t += dt
            for m in list(remaining):
                remaining[m] -= each * dt
                if remaining[m] <= 1e-6:
                    del remaining[m]
                    read_end[m] = t
        if deadline is not None and t < deadline:
            t = deadline

    copy_free = 0.0
    copy_end: dict[int, float] = {}
    compute_end: dict[int, float] = {}
    pass_start = [0.0] * (total + 1)
    for g, u in enumerate(seq):
        if g % n_units == 0:
            pass_start[g // n_units] = t
        # acquire(g): the window covers the next `prefetch` streamed units after g
        first = ordinal[g] + 1 if g in ordinal else next((ordinal[x] for x in streamed if x > g), len(streamed))
        for m in range(first, first + prefetch):
            start(m)
        if g in ordinal:
            m = ordinal[g]
            start(m)  # a demand read, when the window never reached it
            run_until(None, want=m)
            ready = max(t, read_end[m])
        else:
            ready = t
        if u.copy and h2d_bps:
            slot_free = compute_end.get(_slot_owner(seq, g, prefetch), 0.0)
            c0 = max(ready, copy_free, slot_free)
            copy_free = c0 + u.nbytes / h2d_bps
            copy_end[g] = copy_free
            ready = copy_free
        run_until(max(ready, t))
        run_until(t + u.compute_s)
        compute_end[g] = t
        if g % n_units == n_units - 1 and other_s:
            run_until(t + other_s)
    pass_start[total] = t
    # The first pass fills the pipeline; reads finish in waves of prefetch+1 that need not divide a pass,
    # so one pass alone can alias: the mean of the rest is the steady state.
    return (pass_start[passes] - pass_start[1]) / (passes - 1)


def _slot_owner(seq: Sequence[UnitCost], g: int, prefetch: int) -> int:
    """The unit whose device slot copy g reuses: the (prefetch+1)-th copied unit before g."""
    count = 0
    for x in range(g - 1, -1, -1):
        if seq[x].copy:
            count += 1
            if count == prefetch + 1:
                return x
    return -1


def predict(units: Sequence[UnitCost], prefetch: int, disk: DiskProfile | None, *, other_s: float = 0.0,
            h2d_bps: float | None = None, basis: str = "") -> Prediction:
    """``simulate`` plus the floors it is compared with, for one depth."""
    streamed = sum(u.nbytes for u in units if u.read)
    compute = sum(u.compute_s for u in units) + other_s
    copy = sum(u.nbytes for u in units if u.copy) / h2d_bps if h2d_bps else 0.0
    if disk is None or streamed == 0:
        s = max(compute, copy)
        read_s = 0.0 if streamed == 0 else float("nan")
    else:
        read_s = streamed / disk.rate(min(prefetch + 1, MAX_CONCURRENCY))
        # No pass beats a floor; the simulation's pass boundaries can alias by a few % (reads finish in
        # waves that need not divide a pass), so the floors also clamp it.
        s = max(simulate(units, prefetch, disk.rate, other_s=other_s, h2d_bps=h2d_bps), streamed / disk.peak,
                compute, copy)
    bound = max((("disk", read_s if read_s == read_s else 0.0), ("compute", compute), ("pcie", copy)),
                key=lambda kv: kv[1])[0]
    return Prediction(s, bound, read_s, compute, copy, prefetch, basis)


def choose_prefetch(candidates: Sequence[tuple[int, Sequence[UnitCost]]], disk: DiskProfile, *,
                    other_s: float = 0.0, h2d_bps: float | None = None, basis: str = "") -> Prediction:
    """The shallowest depth within ``GOOD_ENOUGH`` of the best predicted time. ``candidates`` pairs each
    depth the memory budget allows with the units as that depth's plan places them (a deeper ring
    leaves less room for the RAM tier, so the costs differ per depth).

    A compute estimate can be far off before the first run, and if it is too high every depth looks
    compute-bound and the shallowest (the slowest to read) would win. So each depth is also scored as
    if compute were free, and must be near the best in both cases (else the best worst-case ratio wins).
    """
    preds = [predict(units, d, disk, other_s=other_s, h2d_bps=h2d_bps, basis=basis) for d, units in candidates]
    free = [predict([dataclasses.replace(u, compute_s=0.0) for u in units], d, disk, h2d_bps=h2d_bps).s_per_pass
            for d, units in candidates]
    best, best_free = min(p.s_per_pass for p in preds), min(free)
    score = [max(p.s_per_pass / best if best else 1.0, f / best_free if best_free else 1.0) for p, f in zip(preds, free)]
    # Preference: the default depth and up, shallowest first; shallower than the default only when every
    # deeper ring is worse by more than the margin (a budget it squeezes): a flat profile is often a
    # noisy one, and one more slot costs only memory the budget did not need.
    order = sorted(range(len(preds)), key=lambda i: (preds[i].prefetch < DEFAULT_PREFETCH, preds[i].prefetch))
    ok = [i for i in order if score[i] <= GOOD_ENOUGH]
    return preds[ok[0] if ok else min(range(len(preds)), key=score.__getitem__)]


# ---------------------------------------------------------------------------- a model's plan, predicted

def store_id(store: Any, records: Sequence[Any]) -> str:
    """What a compute measurement belongs to: the store's source, its quantization and the units as read
    (a block read without its routed experts computes differently from the whole block)."""
    doc = [store.source.get("fingerprint"), store.quantization, str(store.dtype),
           [(r.name, r.data_bytes) for r in records]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _compute_for(t: dict[str, Any], batch: int, measured: Compute | None) -> tuple[Compute, str]:
    n = len(t["sizes"])
    if measured is not None and len(measured.unit_s) == n:
        return measured, f"compute measured in this run at batch {batch}"
    cached = cached_compute(t["store_id"], batch, t["device"], n)
    if cached is not None:
        return cached, f"compute measured in an earlier run of this store at batch {batch}"
    if t["device"] != "cpu":
        return Compute([0.0] * n, 0.0, False), "GPU compute not modelled (bounded by disk and PCIe)"
    return (estimate_compute(t["sizes"], t["resident_bytes"], t["kind"], batch),
            f"compute estimated from a {t['kind']} linear kernel at batch {batch}")


def _costs(t: dict[str, Any], mp: Any, compute: Compute) -> list[UnitCost]:
    streamed = set(mp.streamed)
    cuda = t["device"] == "cuda"
    return [UnitCost(b, compute.unit_s[i], i in streamed, cuda and i not in mp.gpu_tier)
            for i, b in enumerate(t["sizes"])]


def _basis(t: dict[str, Any], compute_basis: str) -> str:
    d: DiskProfile = t["disk"]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.measured_at))
    return f"disk {d.peak / 1e9:.2f} GB/s at best ({d.key['reader']}, measured {when}); {compute_basis}"


def choose_plan(t: dict[str, Any], candidates: Sequence[tuple[int, Any]], batch: int = 1) -> Prediction:
    """``choose_prefetch`` over memory plans (``budget.MemoryPlan`` per depth) of the model ``t`` describes."""
    compute, cb = _compute_for(t, batch, None)
    return choose_prefetch([(d, _costs(t, mp, compute)) for d, mp in candidates], t["disk"], other_s=compute.other_s,
                           h2d_bps=t.get("h2d_bps"), basis=_basis(t, cb))


def predict_plan(t: dict[str, Any], batch: int, measured: Compute | None) -> Prediction:
    """The prediction for the plan ``t`` settled on (``t["plan"]``, ``t["prefetch"]``) at ``batch`` rows."""
    compute, cb = _compute_for(t, batch, measured)
    return predict(_costs(t, t["plan"], compute), t["prefetch"], t["disk"], other_s=compute.other_s,
                   h2d_bps=t.get("h2d_bps"), basis=_basis(t, cb))


_h2d: dict[str, float] = {}


def h2d_rate(device: torch.device) -> float:
    """Pinned host -> device copy rate on this device (256 MiB, best of 3), measured once per process."""
    name = str(device)
    if name not in _h2d:
        src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
        dst = torch.empty_like(src, device=device)
        best = 0.0
        for _ in range(3):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            best = max(best, src.numel() / (time.perf_counter() - t0))
        _h2d[name] = best
        del src, dst
    return _h2d[name]


# ------------------------------------------------------------------------------ measured in the run

def _batch_and_length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """(rows, new positions) of a top-level forward: a decoder's ids when there are two (encoder-decoder)."""
    for name in ("decoder_input_ids", "input_ids", "decoder_inputs_embeds", "inputs_embeds"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0]), int(t.shape[1])
    t = args[0] if args else None
    if isinstance(t, torch.Tensor) and t.dim() >= 2:
        return int(t.shape[0]), int(t.shape[1])
    return None


class PassMeter:
    """Times each top-level forward and splits it into unit compute (the hooks' ``compute_s``), waits
    for reads (the prefetcher's) and the rest. Decode passes (one new position per row) are summed per
    batch size: that is the compute a prediction needs, measured where it runs."""

    def __init__(self, hooks: Sequence[Any], waited: Callable[[], float]):
        self.hooks, self.waited = hooks, waited
        self._open: tuple[float, tuple[int, int] | None, list[float], float] | None = None
        self.reset()

    def reset(self) -> None:
        self.decode: dict[int, tuple[int, list[float], float]] = {}  # batch -> (passes, unit seconds, other)
        self.seconds: list[float] = []  # every pass since reset, in order (capped)
        self.decode_seconds: list[float] = []

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._open = (time.perf_counter(), _batch_and_length(args, kwargs), [h.compute_s for h in self.hooks],
                      self.waited())

    def end(self) -> None:
        if self._open is None:
            return
        t0, shape, c0, w0 = self._open
        self._open = None
        dt = time.perf_counter() - t0
        if len(self.seconds) < 100_000:
            self.seconds.append(dt)
        if shape is None or shape[1] != 1:
            return  # a prefill, or a forward we cannot classify: not a decode step
        units = [h.compute_s - c for h, c in zip(self.hooks, c0)]
        other = max(0.0, dt - sum(units) - (self.waited() - w0))
        self.decode_seconds.append(dt)
        n, acc, oth = self.decode.get(shape[0], (0, [0.0] * len(units), 0.0))
        self.decode[shape[0]] = (n + 1, [a + u for a, u in zip(acc, units)], oth + other)

    def compute(self, batch: int) -> Compute | None:
        """Mean decode compute at ``batch`` rows, once at least two decode passes were seen."""
        n, acc, oth = self.decode.get(batch, (0, [], 0.0))
        if n < 2:
            return None
        return Compute([a / n for a in acc], oth / n, True)
