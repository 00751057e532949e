"""Plan from measurements: the seconds per pass a look-ahead depth and tier split predict, and the depth
``prefetch="auto"`` picks. Pure arithmetic on numbers ``measure.py`` took on this machine (the disk's
rate per depth, each unit's compute, the host-to-device rate), so it is tested with made-up ones.

Why: the right depth depends on the machine (how many reads in flight this disk needs to reach its
rate, how long a unit computes), so a fixed default is wrong somewhere.

  * ``simulate``: the pipeline of ``prefetch.py`` replayed on those numbers — reads share the disk
    (``DiskProfile.rate(k)`` for k reads in flight), a read of streamed unit m starts when unit m-N is
    acquired (the window is the next N streamed units, the ring has N+1 slots), a unit computes once its
    read is done and the previous unit has computed; RAM-tier units only compute; on CUDA a copy stage
    at the measured host-to-device rate sits between read and compute.
  * ``predict`` adds the floors; ``choose_prefetch`` runs it for each depth the memory budget allows
    and takes the shallowest near the best; ``choose_plan`` / ``predict_plan`` do it for a model's plan.

Everything is an estimate with its sources named (``Prediction.basis``); the plan prints it beside the
bound (disk, compute or PCIe) and the run's summary prints measured against it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from .measure import MAX_CONCURRENCY, Compute, DiskProfile, cached_compute, estimate_compute

MIN_STREAMED_BYTES = 64 << 20  # below this per pass, tuning cannot matter: depth 2, nothing measured
GOOD_ENOUGH = 1.03  # the shallowest depth within 3% of the best predicted time wins (memory is not free)
DEFAULT_PREFETCH = 2  # what "auto" means when nothing is measured (no tune, tiny models)


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
             h2d_bps: float | None = None, busy: float = 1.0, passes: int = 12) -> float:
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

    def run_until(deadline: float | None, want: int | None = None, factor: float = 1.0) -> None:
        """Advance time: to ``deadline``, or until read ``want`` is done (reads progress meanwhile, at
        ``factor`` times the disk's rate)."""
        nonlocal t
        while remaining:
            if want is not None and want not in remaining:
                return
            k = len(remaining)
            each = factor * rate(k) / k
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
            ready = copy_free
        run_until(max(ready, t))
        run_until(t + u.compute_s, factor=busy)
        compute_end[g] = t
        if g % n_units == n_units - 1 and other_s:
            run_until(t + other_s, factor=busy)
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
        rate = disk.curve()
        read_s = streamed / rate(min(prefetch + 1, MAX_CONCURRENCY))
        # No pass beats a floor; the simulation's pass boundaries can alias by a few % (reads finish in
        # waves that need not divide a pass), so the floors also clamp it.
        busy = disk.busy if h2d_bps is None else 1.0  # compute on a GPU leaves the cores to the readers
        s = max(simulate(units, prefetch, rate, other_s=other_s, h2d_bps=h2d_bps, busy=busy),
                streamed / rate(max(disk.bps)), compute, copy)
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
        return Compute([0.0] * n, 0.0), "GPU compute not modelled (bounded by disk and PCIe)"
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
    drift = f", x{1 / d.drift:.2f} from recent disk-bound runs' measured / predicted" if d.drift != 1.0 else ""
    how = (f", through bounce regions ({d.bounce_gain:.2f}x direct)" if d.bounce and d.bounce_gain else
           ", through bounce regions" if d.bounce else "")
    return (f"disk {d.peak / 1e9:.2f} GB/s fitted at depth, {d.busy:.0%} of it while computing ({d.key['reader']}{how}, "
            f"measured {when}{drift}); {compute_basis}")


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
