"""A simulated GPU: streams and events with CUDA's ordering rules, on CPU threads, with injectable delays.

It lets ``offload.transfer.CudaStager`` run unchanged on a CPU-only CI, so the rules it relies on are
tested where the H100 tests (tiny, CPU-bound models) cannot show them: a GPU behind the CPU, copies
slower than compute, and the reverse.

Rules kept from CUDA
  * operations on one stream run in order, each after the previous one finished, on the stream's
    own worker thread, asynchronously to the host that enqueued them;
  * ``event.record(stream)`` completes when the stream reaches it; ``stream.wait_event(e)`` makes
    later work on the stream wait for the *most recent* record of ``e`` at the time of the call (an
    event never recorded is complete); ``query()`` never blocks; ``synchronize()`` blocks the host;
  * a copy reads its source when the copy stream reaches it, not when it was enqueued: a host buffer
    reused before the copy ran gives wrong bytes on the device, as on a real GPU.

One difference, by necessity: the host runs the model's kernels, so the compute stream's
``wait_event`` also blocks the host until the event completes (on a GPU the kernels would wait,
not the host). The compute stream still lags: each ``record`` on it waits ``compute_delay_s``, as
if the kernels enqueued before it were still running, so ``free`` events come late when the GPU is
slower than the CPU.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import torch


class SimEvent:
    def __init__(self, timing: bool = False) -> None:
        self._done: threading.Event | None = None  # the latest record's completion; None: never recorded
        self._t = 0.0  # when the stream reached the latest record (for elapsed_time)

    def record(self, stream: SimStream) -> None:
        done = threading.Event()
        self._done = done

        def reached() -> None:
            self._t = time.perf_counter()
            done.set()
        stream.enqueue(reached)

    def elapsed_time(self, end: SimEvent) -> float:
        """Milliseconds from this event to ``end`` (both completed), as ``torch.cuda.Event.elapsed_time``."""
        return (end._t - self._t) * 1e3

    def query(self) -> bool:
        return self._done is None or self._done.is_set()

    def synchronize(self) -> None:
        if self._done is not None:
            self._done.wait()


class SimStream:
    """An in-order queue of operations run by one worker thread."""

    def __init__(self, name: str, delay_s: float = 0.0, host_waits: bool = False):
        self.delay_s, self.host_waits = delay_s, host_waits
        self._q: collections.deque[Callable[[], None]] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.ops = 0
        self._thread = threading.Thread(target=self._loop, name=f"simgpu-{name}", daemon=True)
        self._thread.start()

    def enqueue(self, fn: Callable[[], None]) -> None:
        with self._cv:
            self._q.append(fn)
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._closed:
                    self._cv.wait()
                if not self._q:
                    return
                fn = self._q.popleft()
            fn()
            self.ops += 1

    def wait_event(self, event: SimEvent) -> None:
        done = event._done  # captured now: a later re-record does not change what this waits for
        if done is None:
            return
        self.enqueue(done.wait)
        if self.host_waits:
            done.wait()

    def synchronize(self) -> None:
        done = threading.Event()
        self.enqueue(done.set)
        done.wait()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()


class SimBackend:
    """The ``CudaStager`` backend interface over ``SimStream``/``SimEvent``; memory is plain CPU memory."""

    def __init__(self, copy_delay_s: float = 0.0, compute_delay_s: float = 0.0, free_bytes: int = 1 << 40):
        self.device = torch.device("cpu")
        self.copy_delay_s, self.compute_delay_s = copy_delay_s, compute_delay_s
        self._free_bytes = free_bytes
        self.compute = SimStream("compute", host_waits=True)
        self.streams: list[SimStream] = [self.compute]
        self.copies = 0
        self.registered = 0

    def stream(self) -> SimStream:
        s = SimStream(f"copy-{len(self.streams)}")
        self.streams.append(s)
        return s

    def event(self, timing: bool = False) -> SimEvent:
        return SimEvent(timing)

    def current_stream(self) -> SimStream:
        return self.compute

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # garbage until a copy lands

    def copy(self, stream: SimStream, dst: torch.Tensor, src: torch.Tensor) -> None:
        delay = self.copy_delay_s

        def run() -> None:
            if delay:
                time.sleep(delay)  # the copy engine's time: the host goes on meanwhile
            dst.copy_(src)
        self.copies += 1
        stream.enqueue(run)

    def lag(self) -> None:
        """The compute stream's kernels for one unit (called by the test model, once per forward)."""
        if self.compute_delay_s:
            self.compute.enqueue(lambda: time.sleep(self.compute_delay_s))

    def register(self, buf: object) -> None:
        self.registered += 1

    def free_bytes(self) -> int:
        return self._free_bytes

    def close(self) -> None:
        for s in self.streams:
            s.close()
