"""prefetch="auto": the pipeline model, the disk measurement and its cache, and what enable does with them.

The model is checked against cases with a known answer (a disk-bound pass is bytes / rate, a
compute-bound one the sum of compute, a disk that needs k reads in flight wants depth >= k-1). The
disk measurement runs on tiny files with very short measuring windows; nothing here asserts a time.
"""
from __future__ import annotations

import json
import os
import threading
import types

import pytest
import torch
from torch import nn

import offload
from offload import measure, tune
from offload.tune import DiskProfile, UnitCost, choose_prefetch, predict, simulate

GB = 1e9


def flat(rate: float):
    return lambda k: rate


def needs(k_full: int, rate: float):
    """A disk that reaches ``rate`` only with ``k_full`` reads in flight (each read alone gets rate/k_full)."""
    return lambda k: rate * min(k, k_full) / k_full


def units(n: int, nbytes: int, compute: float, read=lambda i: True) -> list[UnitCost]:
    return [UnitCost(nbytes, compute, read(i)) for i in range(n)]


def test_disk_bound_pass_is_bytes_over_rate():
    assert simulate(units(10, 100_000_000, 0.0), 2, flat(GB)) == pytest.approx(1.0, rel=0.02)
    assert simulate(units(10, 100_000_000, 0.05), 2, flat(GB)) == pytest.approx(1.0, rel=0.02)


def test_compute_bound_pass_is_the_sum_of_compute():
    assert simulate(units(10, 100_000_000, 0.2), 2, flat(GB)) == pytest.approx(2.0, rel=0.01)


def test_ram_tier_units_only_compute_and_reads_overlap_them():
    # half the units in RAM: 0.5 GB to read at 1 GB/s while 10 x 50 ms compute: both 0.5 s, overlapped
    mixed = units(10, 100_000_000, 0.05, read=lambda i: i % 2 == 0)
    assert simulate(mixed, 2, flat(GB)) == pytest.approx(0.5, rel=0.02)
    # the same units with the RAM tier clumped at the start: a depth-1 window cannot read ahead through it
    clumped = units(10, 100_000_000, 0.05, read=lambda i: i >= 5)
    assert simulate(clumped, 1, flat(GB)) > simulate(clumped, 4, flat(GB)) * 1.2


def test_a_disk_that_needs_reads_in_flight_wants_depth():
    u = units(12, 100_000_000, 0.01)
    t = {d: simulate(u, d, needs(4, GB)) for d in (1, 2, 3, 4, 6)}
    assert t[1] > t[2] > t[3]  # deeper is faster until the disk is saturated
    assert t[1] == pytest.approx(2 * 1.2, rel=0.05)  # the awaited read and one ahead: half the rate
    assert t[6] == pytest.approx(1.2, rel=0.05)  # at the disk's rate: 1.2 GB / 1 GB/s


def test_copy_stage_bounds_a_cuda_pass_by_pcie():
    u = [UnitCost(100_000_000, 0.0, False, True) for _ in range(10)]  # all in RAM, copied each pass
    assert simulate(u, 2, flat(GB), h2d_bps=0.5 * GB) == pytest.approx(2.0, rel=0.02)
    p = predict(u, 2, DiskProfile({}, {1: GB}, 1, 0, 0), h2d_bps=0.5 * GB)
    assert p.bound == "pcie"


def _profile(fn, levels=(1, 2, 3, 4, 6, 8)) -> DiskProfile:
    return DiskProfile({}, {k: fn(k) for k in levels}, 100_000_000, 0.0, 0.0)


def test_choice_is_the_shallowest_depth_near_the_best():
    u = units(12, 100_000_000, 0.01)
    p = choose_prefetch([(d, u) for d in range(1, 9)], _profile(needs(4, GB)))
    assert p.prefetch in (3, 4)  # saturates the disk; 6 or 8 would only cost ring memory
    assert p.bound == "disk"
    # a disk as fast with one read in flight as with eight gets the default ring, not deeper
    assert choose_prefetch([(d, u) for d in range(1, 9)], _profile(flat(GB))).prefetch == tune.DEFAULT_PREFETCH
    # and depth 1 when a deeper ring costs the RAM tier more than it gains (here: 4 units streamed more)
    squeezed = [(1, units(12, 100_000_000, 0.01, read=lambda i: i >= 8))] + [(d, u) for d in range(2, 9)]
    assert choose_prefetch(squeezed, _profile(flat(GB))).prefetch == 1


def test_an_overestimated_compute_does_not_pick_a_shallow_ring():
    # Estimated compute 10x the read time: every depth looks equal, but if the estimate is wrong the
    # shallow ring cannot keep the disk busy. Removing the compute-free check picks depth 1 here.
    u = units(12, 100_000_000, 1.0)
    p = choose_prefetch([(d, u) for d in range(1, 9)], _profile(needs(4, GB)))
    assert p.prefetch >= 3
    assert p.bound == "compute"


def test_a_flat_noisy_profile_plans_from_its_mean_not_its_best_level():
    # A disk that reads 2.0 GB/s at every depth, measured with +-10% noise per level (as here): the
    # running best of the levels said 2.2 and made disk-bound predictions ~10% fast; the fit says ~2.0.
    noisy = {1: 2.2, 2: 1.8, 3: 2.2, 4: 2.0, 6: 1.8, 8: 2.0}
    p = DiskProfile({}, {k: v * GB for k, v in noisy.items()}, 1, 0, 0)
    assert p.rate(4) == pytest.approx(2.0 * GB)
    assert p.peak == pytest.approx(2.0 * GB)
    u = units(12, 100_000_000, 0.0)
    assert predict(u, 4, p).s_per_pass == pytest.approx(1.2 / 2.0, rel=0.02)
    # a real rise with depth survives the fit
    rising = DiskProfile({}, {1: 1.0 * GB, 2: 1.5 * GB, 4: 2.0 * GB}, 1, 0, 0)
    assert [rising.rate(k) for k in (1, 2, 3, 4)] == pytest.approx([1.0 * GB, 1.5 * GB, 1.75 * GB, 2.0 * GB])


def test_reads_slow_while_the_cpu_computes_only_when_it_computes_on_the_cpu():
    # 12 x 100 MB at 1 GB/s with 0.05 s compute per unit: disk-bound at 1.2 s. With the disk reading at
    # half its rate while a unit computes, the 0.6 s of compute cost 0.3 s of reading more.
    u = units(12, 100_000_000, 0.05)
    assert simulate(u, 4, flat(GB), busy=0.5) == pytest.approx(1.5, rel=0.03)
    prof = DiskProfile({}, {k: GB for k in (1, 2, 4, 8)}, 1, 0, 0, busy=0.5)
    assert predict(u, 4, prof).s_per_pass == pytest.approx(1.5, rel=0.03)
    # on a GPU the compute leaves the cores to the readers: the disk's own rate
    on_gpu = [UnitCost(100_000_000, 0.05, True, True) for _ in range(12)]
    assert predict(on_gpu, 4, prof, h2d_bps=50 * GB).s_per_pass == pytest.approx(1.2, rel=0.03)


# ------------------------------------------------------------------------------- measuring the disk

@pytest.fixture
def quick(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(measure, "POINT_SECONDS", 0.01)
    monkeypatch.setattr(tune, "MIN_STREAMED_BYTES", 1 << 20)
    calls = []
    real = measure.measure_disk

    def counted(*a, **k):
        calls.append(1)
        k["point_seconds"] = 0.01
        return real(*a, **k)
    monkeypatch.setattr(measure, "measure_disk", counted)
    return calls


def _files(tmp_path, n=4, size=1 << 20):
    out = []
    for i in range(n):
        p = tmp_path / f"u{i}.bin"
        p.write_bytes(os.urandom(size))
        out.append([(str(p), 0, size)])
    return out


def test_disk_profile_is_measured_once_then_cached_and_files_are_untouched(quick, tmp_path):
    from offload.io import get_reader
    units_ = _files(tmp_path)
    before = {r[0][0]: (os.stat(r[0][0]).st_mtime_ns, open(r[0][0], "rb").read()) for r in units_}
    reader = get_reader("python")
    a = measure.disk_profile(units_, reader)
    assert a is not None and len(quick) == 1 and all(v > 0 for v in a.bps.values())
    b = measure.disk_profile(units_, reader)
    assert len(quick) == 1 and b.bps == a.bps  # from the cache
    assert {r[0][0]: (os.stat(r[0][0]).st_mtime_ns, open(r[0][0], "rb").read()) for r in units_} == before
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert all(f.startswith(str(tmp_path / "cache" / "tune")) or f.endswith(".bin") for f in written)
    assert measure.disk_profile(units_, reader, refresh=True) is not None and len(quick) == 2


class _FakeClock:
    """``measure``'s clock, advanced by the fake readers below (``ms`` per read, twice that while the
    CPU is busy), so a measurement's answer is exact and no time is asserted."""
    now = 0.0
    busy = False

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        clock = self

        class Busy:
            def __enter__(self): clock.busy = True
            def __exit__(self, *a): clock.busy = False

        monkeypatch.setattr(measure, "time", self)
        monkeypatch.setattr(measure, "_Busy", Busy)
        monkeypatch.setattr(measure, "evict", lambda paths: None)

    def perf_counter(self):
        return self.now

    def time(self):
        return 0.0

    def spend(self, ms):
        with self.lock:
            self.now += ms * (2 if self.busy else 1) / 1000


class _TimedReader:
    name, task_bytes = "fake", None

    def __init__(self, clock, ms=1.0):
        self.clock, self.ms = clock, ms

    def open(self, path): return path
    def close(self, h): pass

    def read(self, h, off, dest):
        self.clock.spend(self.ms)


def _bouncing_reader(bounce_ms):
    """A fake reader that may bounce (as the native one with O_DIRECT): 1 ms a read direct, ``bounce_ms``
    through its regions."""
    class Reader(_TimedReader):
        bounce, bounce_auto, bounce_min_read = False, True, 0

        def open(self, path):
            return types.SimpleNamespace(direct=True, path=path)

        def read(self, h, off, dest):
            self.clock.spend(bounce_ms if self.bounce else 1.0)
    return Reader


def test_the_rate_kept_while_computing_is_measured_in_pairs(tmp_path, monkeypatch):
    """``busy`` is each round's level read again with the CPU busy over the same level idle (1 ms a read
    idle, 2 ms busy)."""
    m = measure.measure_disk(_files(tmp_path), _TimedReader(_FakeClock(monkeypatch)), point_seconds=0.05)
    assert m.busy == pytest.approx(0.5, rel=0.1)
    assert all(v == pytest.approx((1 << 20) / 0.001, rel=0.1) for v in m.bps.values())  # idle levels untouched


@pytest.mark.parametrize("bounce_ms,chosen", [(0.8, True), (0.98, False)])
def test_a_reader_bounces_only_where_that_measured_faster_and_the_profile_keeps_it(tmp_path, monkeypatch, bounce_ms,
                                                                                   chosen):
    """A reader that may bounce is measured both ways at the busy level, computing; the winner reads the
    levels and is what the profile (and a reader planned from it) uses. A read costs 1 ms direct,
    ``bounce_ms`` through the region, twice that while computing."""
    clock = _FakeClock(monkeypatch)
    Reader = _bouncing_reader(bounce_ms)
    reader = Reader(clock)
    m = measure.measure_disk(_files(tmp_path), reader, point_seconds=0.05)
    assert m.bounce is chosen and reader.bounce is chosen
    assert m.bounce_gain == pytest.approx(1 / bounce_ms, rel=0.05)
    per_read = (bounce_ms if chosen else 1.0) / 1000
    assert all(v == pytest.approx((1 << 20) / per_read, rel=0.1) for v in m.bps.values())  # read as chosen
    assert m.busy == pytest.approx(0.5, rel=0.1)  # the winner's side, computing, over its idle level
    # a profile with the choice round-trips through its cache file and sets a fresh reader that may bounce
    prof = measure.DiskProfile({"k": 1}, m.bps, m.read_bytes, m.seconds, 0.0, m.busy, m.bounce, m.bounce_gain)
    again = measure.DiskProfile.from_json(json.loads(json.dumps(prof.as_json())))
    assert (again.bounce, again.bounce_gain) == (prof.bounce, prof.bounce_gain)
    fresh, fixed = Reader(clock), Reader(clock)
    fixed.bounce_auto = False
    measure.use_profile(fresh, again)
    measure.use_profile(fixed, again)
    assert fresh.bounce is chosen and fixed.bounce is False  # a reader told how to read is left as told


def test_a_cached_profile_sets_how_a_reader_lands_its_reads_and_only_for_readers_it_was_measured_for(
        quick, tmp_path, monkeypatch):
    clock = _FakeClock(monkeypatch)
    Reader = _bouncing_reader(0.8)
    units_ = _files(tmp_path)
    first = Reader(clock)
    assert measure.disk_profile(units_, first).bounce and first.bounce  # measured: the regions won
    fresh = Reader(clock)
    assert measure.disk_profile(units_, fresh, measure=False) is not None and fresh.bounce  # from the cache
    told = Reader(clock)
    told.bounce_auto = False
    assert measure.disk_profile(units_, told, measure=False) is None and not told.bounce  # not its profile
    (tmp_path / "other").mkdir()
    other = _files(tmp_path / "other", n=2, size=3 << 20)  # another unit size: nothing cached for it
    assert measure.disk_profile(other, fresh, measure=False) is None and not fresh.bounce  # direct again


def test_no_a_b_where_no_read_would_go_through_a_region(tmp_path, monkeypatch):
    """Ranges under ``bounce_min_read`` (or no O_DIRECT) read the same either way: comparing them would
    only measure noise, so nothing is compared and the reader reads direct."""
    reader = _bouncing_reader(0.5)(_FakeClock(monkeypatch))
    reader.bounce_min_read = 2 << 20  # the files are 1 MiB
    m = measure.measure_disk(_files(tmp_path), reader, point_seconds=0.05)
    assert m.bounce_gain is None and m.bounce is False and reader.bounce is False


def test_a_failed_measurement_leaves_the_reader_reading_direct(tmp_path, monkeypatch):
    clock = _FakeClock(monkeypatch)

    class Failing(_bouncing_reader(0.8)):
        def read(self, h, off, dest):
            if self.bounce:
                raise OSError(5, "Input/output error", h.path)
            super().read(h, off, dest)

    reader = Failing(clock)
    with pytest.raises(OSError):
        measure.measure_disk(_files(tmp_path), reader, point_seconds=0.05)
    assert reader.bounce is False


def test_a_profile_from_another_machine_is_not_trusted(quick, tmp_path, monkeypatch):
    from offload.io import get_reader
    units_ = _files(tmp_path)
    reader = get_reader("python")
    measure.disk_profile(units_, reader)
    assert measure.disk_profile(units_, reader, measure=False) is not None
    real = measure._machine
    monkeypatch.setattr(measure, "_machine", lambda: {**real(), "machine_id": "another"})
    assert measure.disk_profile(units_, reader, measure=False) is None  # same file name, other machine
    # a damaged cache file is ignored, not an error
    monkeypatch.setattr(measure, "_machine", real)
    for d, _, fs in os.walk(tmp_path / "cache" / "tune"):
        for f in fs:
            with open(os.path.join(d, f), "w") as fh:
                fh.write("{not json")
    assert measure.disk_profile(units_, reader, measure=False) is None


def test_a_full_disk_is_not_written_and_the_measurement_still_serves(quick, tmp_path, monkeypatch):
    from offload import _memory
    from offload.io import get_reader
    monkeypatch.setattr(_memory, "free_disk_bytes", lambda path: (0, path))
    prof = measure.disk_profile(_files(tmp_path), get_reader("python"))
    assert prof is not None
    assert not (tmp_path / "cache" / "tune").exists() or not os.listdir(tmp_path / "cache" / "tune")


# ------------------------------------------------------------------------------------ through enable

def _stack(seed=0, width=512, n=8):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(n)]).eval()


def test_enable_auto_measures_predicts_and_stays_exact(quick, tmp_path):
    m = _stack()
    x = torch.randn(3, 512)
    with torch.no_grad():
        want = m(x)
    h = offload.enable(m, store=str(tmp_path / "s"), ram_tier=0, progress=False)
    try:
        assert len(quick) == 1
        assert h.prediction is not None and h.stats().prefetch == h.prediction.prefetch
        assert h.prediction.s_per_pass > 0 and h.prediction.bound in ("disk", "compute")
        assert "disk" in h.prediction.basis and "estimated" in h.prediction.basis
        with torch.no_grad():
            assert torch.equal(m(x), want)
        s = h.stats()
        assert s.predicted_s_per_pass == h.prediction.s_per_pass and s.passes == 1 and s.compute_seconds > 0
    finally:
        h.disable()
    # a second enable on the same disk and unit size reads the cached profile
    h = offload.enable(_stack(), store=str(tmp_path / "s2"), ram_tier=0, progress=False)
    h.disable()
    assert len(quick) == 1


def test_a_model_that_fits_in_memory_says_nothing_is_read_per_pass_and_measures_no_disk(quick, tmp_path):
    h = offload.enable(_stack(), store=str(tmp_path / "a"), progress=False)  # the default budget holds it all
    assert h.stats().streamed_units == 0 and h.prediction is None and quick == []
    assert "nothing is read per pass" in h.why_no_prediction
    h.disable()


def test_explicit_prefetch_wins_and_no_tune_never_measures(quick, tmp_path):
    h = offload.enable(_stack(), prefetch=3, store=str(tmp_path / "a"), ram_tier=0, progress=False)
    assert h.stats().prefetch == 3 and quick == []
    h.disable()
    h = offload.enable(_stack(), store=str(tmp_path / "b"), ram_tier=0, progress=False, tune=False)
    assert h.stats().prefetch == tune.DEFAULT_PREFETCH and quick == [] and h.prediction is None
    h.disable()
    with pytest.raises(ValueError, match="'auto'"):
        offload.enable(_stack(), prefetch="fast")


def test_decode_compute_is_measured_saved_and_predicts_the_next_run(quick, tmp_path):
    import transformers as tf
    from tests.conftest import make_model
    model = make_model("bloom")
    monkey_min = 1  # the tiny model streams little: let it be tuned anyway
    tune.MIN_STREAMED_BYTES, old = monkey_min, tune.MIN_STREAMED_BYTES
    try:
        h = offload.enable(model, store=str(tmp_path / "s"), ram_tier=0, progress=False)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        meter = h._meter
        assert 1 in meter.decode and meter.decode[1][0] == 3  # 4 tokens: 1 prefill + 3 decode passes
        assert h.stats().passes == 4
        p = h.predict(1)
        assert p is not None and "measured in this run" in p.basis
        h.disable()
        h = offload.enable(make_model("bloom"), store=str(tmp_path / "s"), ram_tier=0, progress=False)
        assert "earlier run" in h.predict(1).basis  # the saved decode compute
        assert "estimated" in h.predict(2).basis  # no measurement at batch 2 yet
        h.disable()
    finally:
        tune.MIN_STREAMED_BYTES = old
    del tf


def test_pass_meter_tells_decode_from_prefill():
    class H:
        compute_s = 0.0
    hooks = [H(), H()]
    m = measure.PassMeter(hooks, lambda: 0.0)
    m.start((torch.zeros(2, 7, dtype=torch.long),), {})
    m.end()
    for _ in range(3):
        m.start((), {"input_ids": torch.zeros(2, 1, dtype=torch.long)})
        hooks[0].compute_s += 0.01
        hooks[1].compute_s += 0.02
        m.end()
    assert list(m.decode) == [2] and m.decode[2][0] == 3 and len(m._seconds) == 4
    c = m.compute(2)
    assert c.unit_s == pytest.approx([0.01, 0.02])
    assert m.compute(1) is None


def test_cached_compute_belongs_to_its_store(quick):
    measure.save_compute("store-a", 1, "cpu", measure.Compute([0.1, 0.2], 0.05))
    assert measure.cached_compute("store-a", 1, "cpu", 2).unit_s == [0.1, 0.2]
    assert measure.cached_compute("store-b", 1, "cpu", 2) is None
    assert measure.cached_compute("store-a", 4, "cpu", 2) is None
    assert measure.cached_compute("store-a", 1, "cpu", 3) is None  # other units: not this store's plan
    path = measure._cache_file("compute", measure._compute_key("store-a", 1, "cpu"))
    doc = json.load(open(path))
    doc["key"]["store"] = "store-b"  # a file whose contents say it belongs elsewhere
    json.dump(doc, open(path, "w"))
    assert measure.cached_compute("store-a", 1, "cpu", 2) is None


def test_a_dip_in_the_measured_rate_does_not_make_a_deeper_ring_look_slower():
    p = DiskProfile({}, {1: 1.9 * GB, 2: 1.7 * GB, 3: 1.8 * GB, 4: 2.0 * GB}, 1, 0, 0)
    # the dip is averaged with the level before it (1.9 and 1.7 -> 1.8), never a deeper level below a shallower
    assert [p.rate(k) for k in (1, 2, 3, 4, 8)] == pytest.approx([1.8 * GB, 1.8 * GB, 1.8 * GB, 2.0 * GB, 2.0 * GB])
    u = units(12, 100_000_000, 0.01)
    assert choose_prefetch([(d, u) for d in range(1, 9)], p).prefetch >= tune.DEFAULT_PREFETCH


def test_pass_meter_counts_every_pass_but_keeps_a_bounded_record(monkeypatch):
    """A server runs for days: the pass count keeps counting, the times kept for the median do not grow."""
    monkeypatch.setattr(measure, "_KEEP", 3)

    class H:
        compute_s = 0.0
    m = measure.PassMeter([H()], lambda: 0.0)
    for _ in range(5):
        m.start((), {"input_ids": torch.zeros(1, 1, dtype=torch.long)})
        m.end()
    assert m.passes == 5 and len(m._seconds) == 3 and len(m._decode_seconds) == 3 and m.decode[1][0] == 5


@pytest.mark.parametrize("extra", [["--prefetch", "3"], ["--no-tune"], ["--dry-run"]])
def test_offload_tune_refuses_the_options_it_would_ignore(extra, tmp_path):
    """``offload tune`` measures and picks the depth itself: a --prefetch N or --no-tune given to it is a
    one-line error (exit 2) before any work, not silently dropped."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "offload.cli", "tune", "--random", "tiny-bloom", *extra],
                       capture_output=True, text=True, env={**os.environ, "OFFLOAD_CACHE": str(tmp_path / "c")})
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "do not apply" in lines[0], r.stderr
    assert not (tmp_path / "c" / "random").exists()  # nothing built


def test_offload_tune_without_a_model_is_a_usage_error(capsys):
    """Its size check resolved the model before run's check that one was given: a TypeError traceback."""
    from offload.cli import main
    assert main(["tune"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "pass MODEL" in err[0]


def test_offload_tune_of_a_model_too_small_to_measure_keeps_the_cached_disk_profiles(tmp_path):
    """A model whose units total under MIN_STREAMED_BYTES measures nothing: ``offload tune`` forgot the machine's
    disk profiles first, so the next run of a large model measured again, and said it had cached measurements."""
    import subprocess
    import sys
    cache = tmp_path / "c"
    (cache / "tune").mkdir(parents=True)
    profile = cache / "tune" / "disk-0123.json"
    profile.write_text("{}")
    r = subprocess.run([sys.executable, "-m", "offload.cli", "tune", "--random", "tiny-bloom"],
                       capture_output=True, text=True, env={**os.environ, "OFFLOAD_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert "nothing measured, nothing forgotten" in r.stderr and "forgot " not in r.stderr
    assert profile.exists()


def test_offload_tune_weighs_a_moe_block_without_its_routed_experts(monkeypatch, tmp_path):
    """enable measures the disk only when the units *it streams* reach MIN_STREAMED_BYTES, and a MoE block streams
    without its routed experts: tune's check counted whole blocks, so it forgot the profiles for a run that
    measured none. The threshold is set between the two sums; nothing is run (cmd_run stubbed)."""
    import offload.tune as tune_mod
    from offload.cli import build_parser
    from offload.cli import run as R
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "c"))
    a = build_parser().parse_args(["tune", "--random", "tiny-qwen3-moe", "--device", "cpu"])
    t = R.resolve(a)
    dense, experts = R.unit_sizes(t, "cpu")
    assert experts is not None and sum(dense) < sum(t.unit_bytes)
    monkeypatch.setattr(tune_mod, "MIN_STREAMED_BYTES", (sum(dense) + sum(t.unit_bytes)) // 2)
    forgot, ran = [], []
    monkeypatch.setattr(R.measure, "forget_disks", lambda: forgot.append(1) or 0)
    monkeypatch.setattr(R, "cmd_run", lambda a, work=None: ran.append(1) or 0)
    assert R.cmd_tune(a) == 0
    assert not forgot and not ran


def test_recent_disk_bound_runs_correct_a_stale_profile(monkeypatch):
    p = DiskProfile({}, {1: GB, 8: GB}, 1, 0, 0)
    u = units(10, 100_000_000, 0.0)
    assert predict(u, 2, p).s_per_pass == pytest.approx(1.0, rel=0.02)
    now = measure.time.time()
    p.observed = [(now - 60, 1.2), (now - 30, 1.3), (now - 10, 1.25)]  # the disk read ~25% slower than profiled
    assert p.drift == pytest.approx(1.25)
    assert predict(u, 2, p).s_per_pass == pytest.approx(1.25, rel=0.02)
    p.observed = [(now - 2 * measure.OBSERVED_TTL_S, 1.5)] * 3  # too old to say anything about the disk now
    assert p.drift == 1.0
    p.observed = [(now + 600, 1.5)] * 3  # from the future (a clock set back, a copied cache): never counted
    assert p.drift == 1.0
    p.observed = [(now - 10, 1.5)]  # one run alone (a warm page cache, a neighbour's burst) moves nothing
    assert p.drift == 1.0
    p.observed = [(now - 20, 0.0), (now - 10, 0.0)]  # a damaged cache cannot divide by zero: bounded on read
    assert p.drift == 0.5 and predict(u, 2, p).s_per_pass == pytest.approx(0.5, rel=0.02)


def test_a_disk_bound_run_records_how_far_it_was_from_the_prediction(quick, tmp_path, monkeypatch):
    """The handle's disable tells the cached profile measured / predicted (with the run's own compute);
    the next plan on that disk predicts from it. Profile rates are made tiny so the plan is disk-bound."""
    from tests.conftest import make_model
    monkeypatch.setattr(tune, "MIN_STREAMED_BYTES", 1)
    ids = torch.tensor([[1, 2, 3, 4]])

    def run():
        h = offload.enable(make_model("bloom"), store=str(tmp_path / "s"), ram_tier=0, progress=False)
        with torch.no_grad():
            h._model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        return h

    h = run()
    h.disable()  # measured the profile; now make it say the disk is far slower than it is
    path = next(p for p in (tmp_path / "cache" / "tune").iterdir() if p.name.startswith("disk-"))
    doc = json.load(open(path))
    doc["bps"], doc["observed"] = {k: 1e3 for k in doc["bps"]}, []
    json.dump(doc, open(path, "w"))
    h = run()
    before = h.predict(1)
    assert before.bound == "disk"
    h.disable()
    observed = json.load(open(path))["observed"]
    assert len(observed) == 1 and observed[0][1] == 0.5  # far faster than predicted: clamped to 0.5
    h = run()
    assert h.predict(1).s_per_pass == pytest.approx(before.s_per_pass, rel=0.05)  # one run alone moves nothing
    h.disable()
    h = run()  # two runs agree: the profile is stale
    assert h.predict(1).s_per_pass == pytest.approx(0.5 * before.s_per_pass, rel=0.05)
    assert "recent disk-bound runs" in h.predict(1).basis
    h.disable()
    # what a run records is against the profile alone: the two before (with the drift applied) were still 0.5
    assert [r for _, r in json.load(open(path))["observed"]] == [0.5, 0.5, 0.5]


def test_a_run_with_routed_experts_records_nothing_about_the_disk(quick, tmp_path, monkeypatch):
    """Its expert reads are not in the prediction, so its measured / predicted says nothing about the disk.
    Two checks keep it out (routed experts; compute measured for the plan's own units, which an experts
    module's hooks outnumber): without both, this disk-bound MoE run records an observation."""
    import transformers as tf
    from tests.conftest import moe_config
    monkeypatch.setattr(tune, "MIN_STREAMED_BYTES", 1)
    ids = torch.tensor([[1, 2, 3, 4]])

    def run():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(moe_config("qwen3_moe", layers=3, hidden=64)).eval()
        h = offload.enable(model, store=str(tmp_path / "s"), ram_tier=0, progress=False, predict_experts=False)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        return h

    h = run()
    assert h._experts is not None
    h.disable()
    path = next(p for p in (tmp_path / "cache" / "tune").iterdir() if p.name.startswith("disk-"))
    doc = json.load(open(path))
    doc["bps"], doc["observed"] = {k: 1e3 for k in doc["bps"]}, []  # disk-bound by the profile
    json.dump(doc, open(path, "w"))
    h = run()
    assert h.predict(1).bound == "disk"
    h.disable()
    assert json.load(open(path))["observed"] == []
