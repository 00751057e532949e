"""A timeline of what the runtime did: reads per I/O thread, copies, forwards and waits, per unit.

Written as Chrome trace JSON (open it in https://ui.perfetto.dev or chrome://tracing): one track per
reader thread, one for the forwards on the compute thread (with the time it waited for a unit as its
own span), and on CUDA one for the copy stream and one for the compute stream, whose spans come from
CUDA events (``elapsed_time``), not host clocks, so they show when the GPU really ran the work.

``torch.profiler`` records kernels and CUDA activity well but cannot see our reader threads; a trace
from here can be put beside one from the profiler (both use microseconds since an arbitrary origin).

Cost when off: one ``is None`` check per unit per forward and per read task.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

COMPUTE_TRACK = "compute (host)"
COPY_TRACK = "copy stream (device)"
DEVICE_COMPUTE_TRACK = "compute stream (device)"


class Tracer:
    """Collects spans from any thread; ``write`` turns them into a Chrome trace file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._spans: list[tuple[str, str, str, float, float, dict[str, Any]]] = []
        self._device: list[tuple[str, str, str, Any, Any, dict[str, Any]]] = []  # spans between two events
        self._origin: Any = None  # a device event recorded at a known host time: maps device time to host

    def now(self) -> float:
        return time.perf_counter()

    def span(self, track: str, name: str, cat: str, start: float, end: float, **args: Any) -> None:
        """A span on ``track`` between two ``perf_counter`` readings."""
        with self._lock:
            self._spans.append((track, name, cat, start, end, args))

    def device_span(self, track: str, name: str, cat: str, start_event: Any, end_event: Any, **args: Any) -> None:
        """A span between two timing events of a stream (resolved at ``write``, never synchronising now)."""
        with self._lock:
            self._device.append((track, name, cat, start_event, end_event, args))

    def set_device_origin(self, event: Any, host_time: float) -> None:
        """An event recorded (and synchronised) at ``host_time``: device spans are placed relative to it."""
        self._origin = (event, host_time)

    def events(self) -> list[dict[str, Any]]:
        """The Chrome trace events: complete ("X") spans in µs, plus a name for every track."""
        pid = os.getpid()
        with self._lock:
            spans = list(self._spans)
            device = list(self._device)
        if device and self._origin is not None:
            origin_event, origin_host = self._origin
            for track, name, cat, a, b, args in device:
                b.synchronize()
                start = origin_host + origin_event.elapsed_time(a) / 1e3
                spans.append((track, name, cat, start, start + a.elapsed_time(b) / 1e3, args))
        tracks = sorted({s[0] for s in spans}, key=lambda t: (t.startswith("offload-io"), t))
        tid = {t: k + 1 for k, t in enumerate(tracks)}
        out: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": "offload"}}]
        out += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid[t], "args": {"name": t}} for t in tracks]
        for track, name, cat, start, end, args in sorted(spans, key=lambda s: s[3]):
            out.append({"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid[track],
                        "ts": round((start - self._t0) * 1e6, 3), "dur": round(max(0.0, end - start) * 1e6, 3),
                        "args": args})
        return out

    def write(self, path: str | os.PathLike[str]) -> str:
        """Write the trace atomically; returns the path."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": self.events(), "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)
        return path


def plot(trace_path: str, png_path: str) -> str:
    """A PNG timeline of a trace (one row per track), for people who would rather look than read.

    Needs matplotlib (``pip install offload[plot]``).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting a trace needs matplotlib: pip install matplotlib") from None
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    rows = sorted(names, key=lambda t: names[t])
    colors = {"read": "tab:blue", "forward": "tab:green", "wait": "tab:red", "copy": "tab:orange"}
    fig, ax = plt.subplots(figsize=(14, 0.5 + 0.45 * len(rows)))
    for y, tid in enumerate(rows):
        bars = [(e["ts"] / 1e3, max(e["dur"] / 1e3, 1e-3)) for e in spans if e["tid"] == tid]
        cats = [colors.get(e.get("cat", ""), "tab:gray") for e in spans if e["tid"] == tid]
        ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=cats)
    ax.set_yticks(range(len(rows)), [names[t] for t in rows])
    ax.set_xlabel("ms")
    ax.set_title("offload timeline: read (blue), wait (red), forward (green), copy (orange)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
