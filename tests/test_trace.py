"""``enable(trace=...)``: a valid Chrome trace whose own spans show reads of unit i+1 overlapping unit i's forward."""
from __future__ import annotations

import copy
import json
import threading

import pytest
import torch

import offload
from offload.io import PythonReader
from conftest import forward_logits, inputs_for, make_model


class GatedReader(PythonReader):
    """A read of a unit file starts, then waits until the test says the previous unit's forward is running."""

    def __init__(self):
        super().__init__()
        self.started: dict[str, threading.Event] = {}
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def events(self, path: str) -> tuple[threading.Event, threading.Event]:
        with self.lock:
            return self.started.setdefault(path, threading.Event()), self.gates.setdefault(path, threading.Event())

    def read(self, handle, offset, dest):
        started, gate = self.events(handle.path)
        started.set()
        gate.wait(30)
        super().read(handle, offset, dest)


def test_trace_is_chrome_json_and_shows_reads_overlapping_forwards(tmp_path, no_thread_leak):
    model = make_model("bloom")
    inputs = inputs_for("bloom")
    expected = forward_logits(copy.deepcopy(model), "bloom", inputs)
    reader = GatedReader()
    trace = tmp_path / "trace.json"
    h = offload.enable(model, prefetch=2, ram_tier=0, store=tmp_path / "s", reader=reader, trace=trace,
                       progress=False)
    paths = [h._store.file_path(hk.record) for hk in h._hooks]
    n = len(paths)
    reader.events(paths[0])[1].set()  # the first unit's read has no forward to overlap

    def opened(i):  # runs once unit i is bound: its forward has begun, so the read of i+1 may finish
        def hook(module, args):
            if i + 1 < n:
                reader.events(paths[i + 1])[1].set()
        return hook

    def held(i):  # runs before unit i unbinds: its forward does not end before the read of i+1 began
        def hook(module, args, output):
            if i + 1 < n:
                assert reader.events(paths[i + 1])[0].wait(30)
        return hook
    extra = [hk.module.register_forward_pre_hook(opened(i)) for i, hk in enumerate(h._hooks)]
    extra += [hk.module.register_forward_hook(held(i), prepend=True) for i, hk in enumerate(h._hooks)]
    assert torch.equal(forward_logits(model, "bloom", inputs), expected)
    for x in extra:
        x.remove()
    for path in paths:
        reader.events(path)[1].set()
    h.disable()

    doc = json.loads(trace.read_text())
    events = doc["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all({"name", "cat", "ts", "dur", "pid", "tid"} <= e.keys() and e["dur"] >= 0 for e in spans)
    assert any(t.startswith("offload-io") for t in tracks.values()) and "compute (host)" in tracks.values()
    forwards = {e["name"].split(" ", 1)[1]: e for e in spans if e["cat"] == "forward"}
    reads: dict[str, list[dict]] = {}
    for e in spans:
        if e["cat"] == "read":
            assert tracks[e["tid"]].startswith("offload-io")
            reads.setdefault(e["name"].split(" ", 1)[1], []).append(e)
    names = [hk.record.name for hk in h._hooks]
    assert set(forwards) == set(names)
    for a, b in zip(names, names[1:]):
        f = forwards[a]
        r = min(reads[b], key=lambda e: e["ts"])
        assert r["ts"] < f["ts"] + f["dur"] and r["ts"] + r["dur"] > f["ts"], (a, b)  # overlap


def test_trace_on_simulated_gpu_has_copy_and_device_compute_tracks(tmp_path, monkeypatch, no_thread_leak):
    import offload.placement
    from simgpu import SimBackend
    backend = SimBackend(copy_delay_s=0.001)
    monkeypatch.setattr(offload.placement, "_backend_for", lambda device: backend)
    model = make_model("opt")
    inputs = inputs_for("opt")
    expected = forward_logits(copy.deepcopy(model), "opt", inputs)
    try:
        with offload.enable(model, prefetch=1, ram_tier=0, gpu_tier=0, store=tmp_path / "s",
                            trace=tmp_path / "t.json", progress=False):
            assert torch.equal(forward_logits(model, "opt", inputs), expected)
    finally:
        backend.close()
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    cats = {(tracks[e["tid"]], e["cat"]) for e in events if e["ph"] == "X"}
    assert ("copy stream (device)", "copy") in cats and ("compute stream (device)", "forward") in cats


def test_write_trace_without_tracing_is_a_clear_error(tmp_path, no_thread_leak):
    with offload.enable(make_model("bloom"), ram_tier=0, store=tmp_path / "s", progress=False) as h:
        with pytest.raises(offload.OffloadError, match="trace="):
            h.write_trace(tmp_path / "x.json")
