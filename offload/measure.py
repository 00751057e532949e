"""What the planner plans from, measured on this machine: the disk's read rate per depth, a unit's
compute, and the host-to-device rate; each cached with where it was measured, and trusted only there.

Why a module of its own: measuring touches the outside world (the model's files, read only; the cache
folder, written atomically after a free-space check; the clock), while ``tune.py``'s model is pure
arithmetic on the numbers measured here, testable with made-up ones.

  * ``DiskProfile`` / ``disk_profile``: aggregate read rate with 1, 2, 4, 8 units read at once, and the
    share of it kept while every core computes, with the run's own reader on the model's own files
    (page cache evicted first), once per (machine, filesystem, reader, unit size), cached under
    ``<cache>/tune/``. A cached profile is used only when every field of where it was measured
    matches (``_disk_key``). Planning uses the closest non-decreasing curve through the levels.
  * compute: ``PassMeter`` splits each top-level forward into unit compute (the hooks' time with
    weights bound), waits and the rest; decode passes are summed per batch size; ``save_compute`` /
    ``cached_compute`` keep them per store, batch, threads and device. Before any run,
    ``estimate_compute`` times a linear kernel of the store's dtype or quantization.
  * ``h2d_rate``: pinned host-to-device copies on a CUDA device, once per process.
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
from .ranges import page_down

log = logging.getLogger("offload")

DISK_VERSION = 3  # 2: profiles carry the rate kept while computing (``busy``); 3: and whether reads bounce
COMPUTE_VERSION = 2
MAX_CONCURRENCY = 8  # unit reads in flight measured (and the deepest look-ahead the planner tries)
MEASURE_CAP_BYTES = 64 << 20  # a read longer than this measures no differently; caps the buffers
POINT_SECONDS = 0.5  # time spent per concurrency level per round
LEVELS = (1, 2, 4, 8)  # reads in flight measured; the fitted curve is interpolated between them
OBSERVED_KEEP = 5  # disk-bound runs whose measured / predicted a profile keeps (``DiskProfile.drift``)
OBSERVED_TTL_S = 3600.0  # and for how long they count
BUSY_LEVEL = 4  # the level also measured with every core computing (about the depth "auto" picks here)
BOUNCE_GAIN = 1.05  # reads go through a bounce region when that measured at least this much faster

# ---------------------------------------------------------------------------------------------- disk

@dataclasses.dataclass
class DiskProfile:
    """Aggregate bytes/s with ``k`` unit reads of ``read_bytes`` each in flight, as measured, and the
    fraction of it the disk keeps while the CPU computes (``busy``)."""
    key: dict[str, Any]
    bps: dict[int, float]
    read_bytes: int
    seconds: float
    measured_at: float
    busy: float = 1.0  # rate while every core computes / rate while idle, measured at one depth
    bounce: bool = False  # the reader lands each request in a small reused region and copies it (``use_profile``)
    bounce_gain: float | None = None  # rate through that region / rate direct, while computing (None: not tried)
    observed: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (when, measured / predicted)

    @property
    def drift(self) -> float:
        """How much slower than the profile recent disk-bound runs on this disk were: the median of their
        measured / predicted (predicted from the profile alone) over the last ``OBSERVED_KEEP`` runs
        younger than ``OBSERVED_TTL_S``, once there are at least two; else 1.0.

        Why: this shared disk moves 20-30% within minutes, so a profile taken once goes stale; the runs
        themselves are the freshest measurement of it. Each ratio is bounded to [0.5, 2], and one run
        alone never moves the plan (a warm page cache or a neighbour's burst); ``offload tune`` starts
        afresh."""
        now = time.time()
        recent = [min(2.0, max(0.5, r)) for t, r in self.observed[-OBSERVED_KEEP:] if 0 <= now - t < OBSERVED_TTL_S]
        return statistics.median(recent) if len(recent) >= 2 else 1.0

    def curve(self) -> Callable[[int], float]:
        """``rate`` with the fit and the drift worked out once (a simulation asks for it at every event)."""
        drift = self.drift
        env = {x: v / drift for x, v in _non_decreasing(self.bps).items()}
        ks = sorted(env)

        def rate(k: int) -> float:
            if k <= 0:
                return 0.0
            if k in env:
                return env[k]
            lo = max((x for x in ks if x < k), default=ks[0])
            hi = min((x for x in ks if x > k), default=None)
            if hi is None:
                return env[lo]
            return env[lo] + (k - lo) / (hi - lo) * (env[hi] - env[lo])
        return rate

    def rate(self, k: int) -> float:
        """Aggregate rate with ``k`` reads in flight, for planning: the measured levels fitted by the
        closest non-decreasing curve (a deeper queue can always hold back to fewer, so the true curve
        never falls; a dip is noise on a shared disk), interpolated between the levels measured; beyond
        them, the deepest; divided by ``drift``. Why a fit and not the best level so far: each level's
        median is noisy by ~10% here, and the running best of several noisy levels is biased high by
        about as much, which made every disk-bound prediction ~10% fast."""
        return self.curve()(k)

    @property
    def peak(self) -> float:
        """The fitted rate at the deepest level measured: the fastest this disk reads, for planning."""
        return self.curve()(max(self.bps))

    def as_json(self) -> dict[str, Any]:
        return {"version": DISK_VERSION, "key": self.key, "bps": {str(k): v for k, v in self.bps.items()},
                "read_bytes": self.read_bytes, "seconds": self.seconds, "measured_at": self.measured_at,
                "busy": self.busy, "bounce": self.bounce, "bounce_gain": self.bounce_gain, "observed": self.observed}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DiskProfile:
        return cls(d["key"], {int(k): float(v) for k, v in d["bps"].items()}, int(d["read_bytes"]),
                   float(d["seconds"]), float(d["measured_at"]), min(1.0, max(0.1, float(d["busy"]))),
                   bool(d.get("bounce", False)), None if d.get("bounce_gain") is None else float(d["bounce_gain"]),
                   [(float(t), float(r)) for t, r in d.get("observed", [])])


def _non_decreasing(bps: dict[int, float]) -> dict[int, float]:
    """The least-squares non-decreasing fit of ``bps`` over its levels (pool adjacent violators): a level
    below the one before it is averaged with it instead of being lifted to the best seen."""
    blocks: list[list[float]] = []  # [sum, count] per pooled run of levels
    for k in sorted(bps):
        blocks.append([bps[k], 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    fitted = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return dict(zip(sorted(bps), fitted))


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


def _read_cached(path: str, key: dict[str, Any], version: int) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("version") != version or d.get("key") != key:
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
        take = page_down(min(n, left)) or min(n, left)
        out.append((path, off, take))
        left -= take
    return out


@dataclasses.dataclass
class DiskRates:
    """What ``measure_disk`` found: the rate per level, the bytes per read, the fraction of the rate kept
    while the CPU computes, the seconds it took, and whether reads bounce (with the gain measured)."""
    bps: dict[int, float]
    read_bytes: int
    busy: float
    seconds: float
    bounce: bool = False
    bounce_gain: float | None = None


class _Busy:
    """Every core computing, as a decode step on the CPU does (a matrix-vector product on torch's
    intra-op threads), while a disk level is measured: on a small machine the reader threads share the
    cores with compute, and the disk then reads measurably slower (0.83-1.0x here; a trace of a real
    decode read 0.7x during unit forwards) for as long as it lasts."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offload-tune-busy", daemon=True)

    def _run(self) -> None:
        a = torch.ones(2048, 4096)
        x = torch.ones(4096)
        while not self._stop.is_set():
            torch.mv(a, x)

    def __enter__(self) -> _Busy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def measure_disk(units: Sequence[Reads], reader: Any, *, max_concurrency: int = MAX_CONCURRENCY,
                 point_seconds: float = POINT_SECONDS, rounds: int = 3) -> DiskRates:
    """Aggregate read rate of ``units`` (each a list of byte ranges) with ``LEVELS`` (up to ``max_concurrency``)
    read at once.

    Reads cycle through the units, so no range is read twice in a row; the page cache is evicted first
    and the readers use O_DIRECT where the filesystem allows it. Concurrency levels alternate up then
    down over ``rounds`` and each level's rate is the median of its rounds (a shared disk drifts). In
    each round one level (``BUSY_LEVEL``) is measured twice in a row, idle and with every core
    computing (``_Busy``); ``busy`` is the median of those pairs' ratios.

    A reader that can bounce (``bounce_auto``: the native reader unless told) is first measured at that
    level, computing, ``rounds`` times direct and through its bounce region alternately; it bounces for
    the rest (and in the runs this profile plans) when that was ``BOUNCE_GAIN`` faster, and the winner's
    side of each pair is that round's busy sample (no separate one). Why measured:
    on this VM a request landing in a small region read over and over arrived 20-30% faster than one
    landing in a ring of hundreds of MiB (the host copies into guest memory), which pays for the copy;
    on a machine whose disk DMAs straight into memory the copy is CPU spent for nothing.
    """
    from ._memory import available_memory
    from .staging import HostBuffer
    t_all = time.perf_counter()
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
    levels = [k for k in LEVELS if k <= max_concurrency]
    busy_level = min(BUSY_LEVEL, levels[-1])
    got: dict[int, list[float]] = {k: [] for k in levels}
    busy: list[float] = []
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

    def point(k: int) -> float:
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
        rate = sum(done) / (time.perf_counter() - t0)
        evict(paths)
        return rate

    gain: float | None = None
    try:
        evict(paths)
        ab: list[tuple[float, float]] = []  # (direct, bounce) at busy_level, computing: the busy samples too
        # the A/B only where the two ways differ: O_DIRECT reads long enough to go through regions
        can_bounce = (any(getattr(h, "direct", False) for h in handles.values())
                      and any(n >= getattr(reader, "bounce_min_read", 0) for p in plans for _, _, n in p))
        if getattr(reader, "bounce_auto", False) and not can_bounce:
            reader.bounce = False
        elif getattr(reader, "bounce_auto", False):
            with _Busy():
                for r in range(rounds):
                    side = {}
                    for bounce in ((False, True) if r % 2 == 0 else (True, False)):  # neither always first
                        reader.bounce = bounce
                        side[bounce] = point(busy_level)
                    ab.append((side[False], side[True]))
            gain = statistics.median(b / d for d, b in ab)
            reader.bounce = gain >= BOUNCE_GAIN
        order = [k for r in range(rounds) for k in (levels if r % 2 == 0 else levels[::-1])]
        for k in order:
            got[k].append(point(k))
            if k == busy_level and not ab:
                with _Busy():
                    busy.append(point(k) / got[k][-1])
        if ab:  # computing (the A/B, winner's side) over idle (the levels), round by round
            busy = [(b if reader.bounce else d) / idle for (d, b), idle in zip(ab, got[busy_level])]
    except BaseException:
        if getattr(reader, "bounce_auto", False):
            reader.bounce = False  # as if never measured
        raise
    finally:
        for h in handles.values():
            reader.close(h)
        for b in bufs:
            b.close()
    return DiskRates({k: statistics.median(v) for k, v in got.items() if v}, per_read,
                     min(1.0, statistics.median(busy)) if busy else 1.0, time.perf_counter() - t_all,
                     bool(getattr(reader, "bounce", False)), gain)


def disk_profile(units: Sequence[Reads], reader: Any, *, measure: bool = True, refresh: bool = False,
                 say: Callable[[str], None] | None = None) -> DiskProfile | None:
    """The cached profile of the disk holding ``units`` for this reader and read size, measured now if
    there is none (and ``measure``), or again with ``refresh``. ``None``: nothing cached, not measured.
    The reader is left as the profile says it reads (``use_profile``)."""
    if not units:
        return None
    size = max(sum(n for _, _, n in u) for u in units)
    read_bytes = min(size, MEASURE_CAP_BYTES)
    bucket = 1 << max(0, (read_bytes - 1).bit_length())  # profiles are shared by units of similar size
    key = _disk_key(units[0][0][0], _reader_key(reader), bucket)
    path = _cache_file("disk", key)
    if not refresh:
        d = _read_cached(path, key, DISK_VERSION)
        if d is not None:
            return use_profile(reader, DiskProfile.from_json(d))
    if not measure:
        return use_profile(reader, None)
    if say:
        say(f"offload: measuring this disk's read rate with {key['reader']} on the model's own files "
            f"(once per disk; cached in {os.path.dirname(path)}; --no-tune skips)")
    m = measure_disk(units, reader)
    prof = use_profile(reader, DiskProfile(key, m.bps, m.read_bytes, m.seconds, time.time(), m.busy, m.bounce,
                                           m.bounce_gain))
    try:
        _write_cached(path, prof.as_json())
    except (OSError, OffloadError) as e:  # not cached: measured again next time, nothing else lost
        log.warning("offload: the disk measurement could not be cached (%s)", e)
    if say:
        say("offload: disk " + ", ".join(f"{k} in flight {v / 1e9:.2f} GB/s" for k, v in sorted(m.bps.items()))
            + f"; {m.busy:.0%} of it while computing"
            + ("" if m.bounce_gain is None else
               f"; through a bounce region {m.bounce_gain:.2f}x direct: {'bounce' if m.bounce else 'direct'}")
            + f" ({m.seconds:.1f} s)")
    return prof


def use_profile(reader: Any, profile: DiskProfile | None) -> DiskProfile | None:
    """Make ``reader`` read as ``profile`` was measured (through its bounce regions or not; direct when
    there is no profile), unless its owner fixed that (``bounce_auto`` false). The rates are only true
    for reads made that way. A reader shared by several live handles shares this setting."""
    if getattr(reader, "bounce_auto", False):
        reader.bounce = profile is not None and profile.bounce
    return profile


def _reader_key(reader: Any) -> str:
    """The reader as a disk profile's key names it: with how it lands requests when that can vary (a profile
    measured by a reader told to bounce, or not, says nothing about the other way, nor about the choice)."""
    name = getattr(reader, "name", type(reader).__name__)
    if not hasattr(reader, "bounce"):
        return name
    return name + ("+auto" if getattr(reader, "bounce_auto", False) else "+bounce" if reader.bounce else "+direct")


def observe_disk(profile: DiskProfile, measured_over_predicted: float) -> None:
    """Add a disk-bound run's measured / predicted seconds per pass (predicted from the profile alone, no
    drift) to its cached profile (``DiskProfile.drift``), clamped to [0.5, 2]. A profile no longer
    cached (forgotten, measured afresh meanwhile, or another machine's) is left alone."""
    path = _cache_file("disk", profile.key)
    d = _read_cached(path, profile.key, DISK_VERSION)
    if d is None or float(d.get("measured_at", -1)) != profile.measured_at:
        return
    cached = DiskProfile.from_json(d)
    ratio = min(2.0, max(0.5, measured_over_predicted))
    cached.observed = (cached.observed + [(time.time(), ratio)])[-OBSERVED_KEEP:]
    _write_cached(path, cached.as_json())


# ------------------------------------------------------------------------------------------- compute

def _compute_key(store_id: str, batch: int, device: str) -> dict[str, Any]:
    return {**_machine(), "store": store_id, "batch": batch, "threads": torch.get_num_threads(), "device": device}


@dataclasses.dataclass
class Compute:
    """Seconds per unit and per pass outside the units (embeddings, head, sampling) in a decode pass."""
    unit_s: list[float]
    other_s: float

    def as_json(self) -> dict[str, Any]:
        return {"unit_s": self.unit_s, "other_s": self.other_s}


def cached_compute(store_id: str, batch: int, device: str, n_units: int) -> Compute | None:
    key = _compute_key(store_id, batch, device)
    d = _read_cached(_cache_file("compute", key), key, COMPUTE_VERSION)
    if d is None or len(d.get("unit_s", ())) != n_units:
        return None
    return Compute([float(x) for x in d["unit_s"]], float(d["other_s"]))


def save_compute(store_id: str, batch: int, device: str, compute: Compute) -> None:
    key = _compute_key(store_id, batch, device)
    _write_cached(_cache_file("compute", key), {"version": COMPUTE_VERSION, "key": key, **compute.as_json()})


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
    return Compute([b * spb for b in unit_bytes], resident_bytes * spb)


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


_KEEP = 100_000  # pass times kept for the median: a server's memory must not grow with its uptime


class PassMeter:
    """Times each top-level forward and splits it into unit compute (the hooks' ``compute_s``), waits
    for reads (the prefetcher's) and the rest. Decode passes (one new position per row) are summed per
    batch size: that is the compute a prediction needs, measured where it runs.

    On a GPU the host returns from a forward once its kernels and copies are queued, long before they
    run (the first GPU run measured 0.042 s per pass for 0.203 s per token), so with a ``clock`` (the
    CUDA stager's backend) a pass is timed by events recorded on the compute stream at its start and
    end, read back once the end event has completed: no synchronisation is added."""

    def __init__(self, hooks: Sequence[Any], waited: Callable[[], float], clock: Any = None):
        self.hooks, self.waited, self.clock = hooks, waited, clock
        self._open: tuple[float, tuple[int, int] | None, list[float], float, Any] | None = None
        self.reset()

    def reset(self) -> None:
        self.decode: dict[int, tuple[int, list[float], float]] = {}  # batch -> (passes, unit seconds, other)
        self.passes = 0  # top-level forwards since reset
        self._seconds: list[float] = []  # their times, in order (the first _KEEP)
        self._decode_seconds: list[float] = []  # the decode passes' (the first _KEEP)
        self._pending: list[tuple[Any, Any, bool]] = []  # (start, end, decode) events not yet completed
        self._compute0 = sum(h.compute_s for h in self.hooks)

    @property
    def compute_seconds(self) -> float:
        """Time inside the units' forwards since reset (waits excluded)."""
        return sum(h.compute_s for h in self.hooks) - self._compute0

    def s_per_pass(self) -> float:
        """Median seconds of the decode passes, else of all passes (0: none timed yet)."""
        self._settle()
        return statistics.median(self._decode_seconds or self._seconds or [0.0])

    def _event(self) -> Any:
        ev = self.clock.event(timing=True)
        ev.record(self.clock.current_stream())
        return ev

    def _keep(self, dt: float, decode: bool) -> None:
        if len(self._seconds) < _KEEP:
            self._seconds.append(dt)
        if decode and len(self._decode_seconds) < _KEEP:
            self._decode_seconds.append(dt)

    def _settle(self) -> None:
        """Keep the device times of the passes whose end event has completed (in order; never waits)."""
        while self._pending and self._pending[0][1].query():
            start, end, decode = self._pending.pop(0)
            self._keep(start.elapsed_time(end) / 1e3, decode)

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._settle()
        self._open = (time.perf_counter(), _batch_and_length(args, kwargs), [h.compute_s for h in self.hooks],
                      self.waited(), self._event() if self.clock is not None else None)

    def end(self, failed: bool = False) -> None:
        """The forward opened by ``start`` returned; ``failed``: it raised, so its time is no pass's (a
        part-done forward's compute would skew what tuning saves)."""
        if self._open is None:
            return
        t0, shape, c0, w0, ev0 = self._open
        self._open = None
        if failed:
            return
        dt = time.perf_counter() - t0
        self.passes += 1
        decode = shape is not None and shape[1] == 1  # else a prefill, or a forward we cannot classify
        if ev0 is not None:
            if len(self._pending) < _KEEP:
                self._pending.append((ev0, self._event(), decode))
        else:
            self._keep(dt, decode)
        if not decode:
            return
        units = [h.compute_s - c for h, c in zip(self.hooks, c0)]
        other = max(0.0, dt - sum(units) - (self.waited() - w0))
        n, acc, oth = self.decode.get(shape[0], (0, [0.0] * len(units), 0.0))
        self.decode[shape[0]] = (n + 1, [a + u for a, u in zip(acc, units)], oth + other)

    def compute(self, batch: int) -> Compute | None:
        """Mean decode compute at ``batch`` rows, once at least two decode passes were seen."""
        n, acc, oth = self.decode.get(batch, (0, [], 0.0))
        if n < 2:
            return None
        return Compute([a / n for a in acc], oth / n)
