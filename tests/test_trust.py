"""Trust (issue 17): a run computes with the weights its source holds, or says why it cannot.

Each test here fails when the protection it names is removed; waits are gates and hang guards,
never measurements.
"""
from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from torch import nn

import offload
import offload.prefetch as prefetch_mod
from offload.config import StagingConfig
from offload.io import PythonReader
from offload.prefetch import Prefetcher, _Task
from test_staging import D, Stack, run


def test_close_racing_a_waiting_forward_is_an_error_not_an_unread_buffer(tmp_path, monkeypatch):
    """disable() between a reader thread taking a task and running it: the task sees the load cancelled
    and skips the read. The forward waiting on that load must get an error, never the unread buffer."""
    store = offload.convert(Stack(3), tmp_path / "s", progress=False)
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=3)
    monkeypatch.setattr(prefetch_mod, "_POLL_S", 60.0)  # the waiter may only wake from the load itself
    taken, go = threading.Event(), threading.Event()
    original_run = _Task.run

    def gated_run(task):
        taken.set()
        assert go.wait(30)
        original_run(task)
    monkeypatch.setattr(_Task, "run", gated_run)
    pf = Prefetcher(store, store.units, PythonReader(), cfg)
    out: dict = {}

    def forward():
        try:
            out["lease"] = pf.acquire(0)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
    t = threading.Thread(target=forward, daemon=True)
    t.start()
    assert taken.wait(30)  # a reader thread holds unit 0's task, not yet run
    closing = threading.Thread(target=pf.close, daemon=True)
    closing.start()
    while not pf.closed:  # close() marks the loads cancelled, then joins the (gated) readers
        closing.join(0.01)
    go.set()
    t.join(30)
    closing.join(30)
    assert not t.is_alive() and not closing.is_alive()
    assert "lease" not in out, "a cancelled read was handed to its waiter as if it had been read"
    assert isinstance(out["error"], offload.OffloadError)


def test_nn_init_by_keyword_on_a_streamed_weight_is_refused(tmp_path, no_thread_leak):
    """``nn.init.constant_`` passes the tensor by keyword; it was filled into a copy and lost."""
    model = Stack(3)
    ref = copy.deepcopy(model)
    x = torch.randn(2, D)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False):
        w = model.blocks[1].lin.weight
        for init in (lambda: nn.init.constant_(w, 0.5), lambda: nn.init.uniform_(tensor=w),
                     lambda: nn.init.kaiming_uniform_(w)):
            with pytest.raises(offload.OffloadError, match=r"blocks.1.lin.weight in place"):
                init()
        assert torch.equal(run(model, x), run(ref, x))


class _Interrupt(BaseException):
    pass


def _interrupt_after(monkeypatch, units: int) -> None:
    """The next store write stops (as Ctrl-C would) after ``units`` unit files are finished."""
    conv = sys.modules["offload.convert"]  # the module (offload.convert is the function)
    real, count = conv.write_unit_file, {"n": 0}

    def counting(*args, **kwargs):
        if count["n"] == units:
            raise _Interrupt()
        count["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(conv, "write_unit_file", counting)


@pytest.mark.parametrize("route", ["enable", "convert"])
def test_a_resumed_write_never_keeps_units_of_another_model_of_the_same_shapes(tmp_path, monkeypatch, route,
                                                                                no_thread_leak):
    """enable(A, store=S) / convert(A, S) interrupted after 2 of 4 units, then the same with B (same shapes,
    other weights): B must compute with B's weights, and disable() must leave B's own parameters as they were."""
    a, b = Stack(4, seed=1), Stack(4, seed=2)
    ref_b = copy.deepcopy(b)
    x = torch.randn(2, D)
    write = ((lambda m: offload.enable(m, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False).disable())
             if route == "enable" else (lambda m: offload.convert(m, tmp_path / "s", progress=False)))
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        with pytest.raises(_Interrupt):
            write(a)
    write(b)
    with offload.enable(b, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False):
        assert torch.equal(run(b, x), run(ref_b, x))
    for (name, p), q in zip(b.state_dict().items(), ref_b.state_dict().values()):
        assert torch.equal(p, q), f"{name} was changed by disable()"


def _tiny_folder(tmp_path, arch="bloom"):
    from conftest import make_model
    folder = tmp_path / arch
    make_model(arch).save_pretrained(folder)
    return folder


def test_a_damaged_resident_file_is_a_named_error_on_load(tmp_path, no_thread_leak):
    """One flipped byte in the embeddings of a store: load(verify=True) refuses it, naming the file."""
    from offload.store import Store
    store = offload.convert(_tiny_folder(tmp_path), tmp_path / "st", progress=False)
    path = store.file_path(store.resident)
    with open(path, "r+b") as f:
        f.seek(store.resident.data_offset + 100)
        b = f.read(1)
        f.seek(store.resident.data_offset + 100)
        f.write(bytes([b[0] ^ 0x10]))
    Store.open(tmp_path / "st")  # sizes and headers are intact: only the checksum can tell
    with pytest.raises(offload.ChecksumError, match=rf"{store.resident.file}.*checksum"):
        offload.load(tmp_path / "st", ram_tier=0, progress=False)
    model, h = offload.load(tmp_path / "st", ram_tier=0, progress=False, verify=False)  # asked not to check
    h.disable()


@pytest.mark.parametrize("route", ["convert", "enable"])
def test_a_write_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch, route, no_thread_leak):
    import offload._memory as mem
    model = Stack(3)
    free = 10_000
    monkeypatch.setattr(mem, "free_disk_bytes", lambda path: (free, "/fake"))
    with pytest.raises(offload.OffloadError, match=r"needs .* on /fake but only 9.77 KiB is free"):
        if route == "convert":
            offload.convert(model, tmp_path / "s", progress=False)
        else:
            offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists(), "a refused write left a folder behind"
    free = 1 << 40
    offload.convert(model, tmp_path / "s", progress=False)
