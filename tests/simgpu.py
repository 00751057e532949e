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

What a GPU does that the host-side kernels cannot show, added for issue 22:
  * deferred kernels (``read_later``): the test model enqueues, on the compute stream, a read of its
    weights' bytes that runs ``compute_delay_s`` later and is checked against the store's bytes, so a
    slot overwritten before the kernels that read it ran (a ``free`` event recorded too early) is a
    counted wrong read (``bad_reads``), and the host runs up to ``prefetch + 1`` units ahead of them;
  * a byte-counting allocator: ``empty``/``activation`` count device bytes, raise
    ``torch.OutOfMemoryError`` ("Tried to allocate ...") past ``cap``; ``free_bytes`` moves with every
    allocation, free and ``hold`` (another process taking memory); ``peak``/``allocated`` as torch.cuda's;
  * host registration through a fake cudart (``SimCudart``) that can refuse (an error code) and keeps
    CUDA's sticky last error: a copy after an uncleared error raises, as PyTorch's launch check would;
  * ``fail(msg)``: from then on every event's ``query()`` raises (a persistent CUDA error);
  * ``capture``: the current stream reports that it is capturing a CUDA graph.
"""
from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
import torch


class SimEvent:
    def __init__(self, timing: bool = False, backend: SimBackend | None = None) -> None:
        self._done: threading.Event | None = None  # the latest record's completion; None: never recorded
        self._t = 0.0  # when the stream reached the latest record (for elapsed_time)
        self._backend = backend

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
        if self._backend is not None and self._backend.broken is not None:
            self._backend.failed_queries.append(threading.current_thread().name)
            raise RuntimeError(self._backend.broken)
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
        self._busy = False
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
                self._busy = True
            try:
                fn()
            finally:
                with self._cv:
                    self._busy = False
            self.ops += 1

    def pending(self) -> int:
        """Operations enqueued and not finished (the one running included)."""
        with self._cv:
            return len(self._q) + (1 if self._busy else 0)

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


class SimCudart:
    """The part of ``torch.cuda.cudart()`` that host registration uses, with CUDA's sticky last error."""

    def __init__(self, register_error: int = 0, unregister_error: int = 0):
        self.register_error, self.unregister_error = register_error, unregister_error
        self.last_error = 0
        self.ranges: dict[int, int] = {}  # registered address -> bytes

    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
        if self.register_error:
            self.last_error = self.register_error
            return self.register_error
        self.ranges[address] = nbytes
        return 0

    def cudaHostUnregister(self, address: int) -> int:  # noqa: N802
        self.ranges.pop(address, None)
        if self.unregister_error:
            self.last_error = self.unregister_error
        return self.unregister_error

    def cudaGetLastError(self) -> int:  # noqa: N802
        err, self.last_error = self.last_error, 0
        return err

    def cudaGetErrorString(self, err: int) -> str:  # noqa: N802
        return f"simulated error {err}"

    def pinned(self, address: int) -> bool:
        return any(a <= address < a + n for a, n in self.ranges.items())


class SimBackend:
    """The ``CudaStager`` backend interface over ``SimStream``/``SimEvent``; memory is CPU memory, counted."""

    def __init__(self, copy_delay_s: float = 0.0, compute_delay_s: float = 0.0, free_bytes: int = 1 << 40,
                 register_error: int = 0):
        self.device = torch.device("cpu")
        self.copy_delay_s, self.compute_delay_s = copy_delay_s, compute_delay_s
        self.cap = free_bytes
        self.compute = SimStream("compute", host_waits=True)
        self.streams: list[SimStream] = [self.compute]
        self.copies = 0
        self.registered = 0
        self.cudart = SimCudart(register_error)
        self.pageable_copies = 0  # copies whose source was not registered
        self.copy_spans: list[tuple[float, float]] = []  # when each copy ran on its stream
        self.broken: str | None = None
        self.failed_queries: list[str] = []  # threads whose query() raised
        self.capture = False
        self.bad_reads: list[str] = []  # deferred kernels that read other bytes than the store's
        self.kernels_issued = 0
        self.kernels_done = 0
        self.max_ahead = 0  # the most kernels the host had issued that the compute stream had not run
        self._lock = threading.Lock()
        self._allocated = 0
        self._peak = 0
        self._held = 0

    # ---- streams and events
    def stream(self) -> SimStream:
        s = SimStream(f"copy-{len(self.streams)}")
        self.streams.append(s)
        return s

    def event(self, timing: bool = False) -> SimEvent:
        return SimEvent(timing, self)

    def current_stream(self) -> SimStream:
        return self.compute

    def capturing(self) -> bool:
        return self.capture

    def fail(self, message: str = "CUDA error: an illegal memory access was encountered") -> None:
        """A persistent CUDA error: every ``query()`` from now on raises it."""
        self.broken = message

    # ---- memory
    def _alloc(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if self._allocated + self._held + nbytes > self.cap:
                raise torch.OutOfMemoryError(
                    f"simulated CUDA out of memory. Tried to allocate {nbytes / 2**20:.2f} MiB. "
                    f"{self.cap - self._allocated - self._held} bytes free of {self.cap}")
            self._allocated += nbytes
            self._peak = max(self._peak, self._allocated)
        arr = np.empty(max(nbytes, 1), dtype=np.uint8)
        weakref.finalize(arr, self._free, nbytes)  # the tensor keeps the array alive as long as any view
        return torch.from_numpy(arr)[:nbytes]

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self._allocated -= nbytes

    def empty(self, nbytes: int) -> torch.Tensor:
        return self._alloc(nbytes).fill_(0xAB)  # garbage until a copy lands

    def activation(self, nbytes: int) -> torch.Tensor:
        """A forward's temporary (the test model calls it); freed when the caller drops it."""
        return self._alloc(nbytes)

    def hold(self, nbytes: int) -> None:
        """Another process takes ``nbytes`` of the device (mem_get_info drops, nothing here frees it)."""
        with self._lock:
            self._held += nbytes

    def allocated(self) -> int:
        return self._allocated

    def peak(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._allocated

    def free_bytes(self) -> int:
        return self.cap - self._allocated - self._held

    def release_cached(self) -> None:
        pass

    # ---- copies and kernels
    def copy(self, stream: SimStream, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.cudart.last_error:  # as PyTorch's launch check: an uncleared error is raised by the next call
            raise RuntimeError(f"CUDA error {self.cudart.last_error} (left by an earlier call)")
        delay = self.copy_delay_s
        if not self.cudart.pinned(src.data_ptr()):
            self.pageable_copies += 1

        def run() -> None:
            t0 = time.perf_counter()
            if delay:
                time.sleep(delay)  # the copy engine's time: the host goes on meanwhile
            dst.copy_(src)
            self.copy_spans.append((t0, time.perf_counter()))
        self.copies += 1
        stream.enqueue(run)

    def lag(self) -> None:
        """The compute stream's kernels for one unit (called by the test model, once per forward)."""
        if self.compute_delay_s:
            self.compute.enqueue(lambda: time.sleep(self.compute_delay_s))

    def read_later(self, what: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
        """A kernel reading ``tensor`` (a view into a device slot) ``compute_delay_s`` after the host issued
        it, as the GPU would: its bytes then must still be ``expected`` (the store's)."""
        if self.cudart.last_error:
            raise RuntimeError(f"CUDA error {self.cudart.last_error} (left by an earlier call)")
        delay = self.compute_delay_s
        with self._lock:
            self.kernels_issued += 1
            self.max_ahead = max(self.max_ahead, self.kernels_issued - self.kernels_done)

        def run() -> None:
            if delay:
                time.sleep(delay)
            if not torch.equal(tensor, expected):
                self.bad_reads.append(what)
            with self._lock:
                self.kernels_done += 1
        self.compute.enqueue(run)

    # ---- host memory
    def register(self, buf: object) -> None:
        from offload.transfer import register_host_buffer
        register_host_buffer(buf, cudart=self.cudart)  # type: ignore[arg-type]
        self.registered += 1

    def close(self) -> None:
        for s in self.streams:
            s.close()
