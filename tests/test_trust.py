"""Trust (issue 17): a run computes with the weights its source holds, or says why it cannot.

Each test here fails when the protection it names is removed; waits are gates and hang guards,
never measurements.
"""
from __future__ import annotations

import copy
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import offload
import offload.prefetch as prefetch_mod
from offload.config import StagingConfig
from offload.hooks import Offloaded
from offload.io import PythonReader
from offload.prefetch import Prefetcher, _Task
from conftest import inputs_for, make_model
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
    import offload.writer as writer  # write_store looks write_unit_file up there
    real, count = writer.write_unit_file, {"n": 0}

    def counting(*args, **kwargs):
        if count["n"] == units:
            raise _Interrupt()
        count["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(writer, "write_unit_file", counting)


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


def _set_config(folder, **changes):
    import json
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_an_edited_config_in_the_folder_is_picked_up_without_rebuilding_the_weights(tmp_path, capfd,
                                                                                       no_thread_leak):
    import transformers as tf
    folder = _tiny_folder(tmp_path)
    model, h = offload.load(folder, ram_tier=0, progress=False)
    h.disable()
    store = sys.modules["offload.convert"].store_cache_path(str(folder), torch.float32)
    units_before = {p.name: p.stat().st_mtime_ns for p in Path(store).glob("0*.safetensors")}
    _set_config(folder, layer_norm_epsilon=0.25)
    model, h = offload.load(folder, ram_tier=0, progress=True)
    try:
        assert model.config.layer_norm_epsilon == 0.25
        ids = torch.tensor([[1, 5, 9, 30]])
        ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
    finally:
        h.disable()
    assert "refreshed config.json" in capfd.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in Path(store).glob("0*.safetensors")}
    assert after == units_before, "the weights were rewritten for a config change"


def test_an_edited_config_inside_a_store_is_refused(tmp_path):
    store = offload.convert(_tiny_folder(tmp_path), tmp_path / "st", progress=False)
    _set_config(tmp_path / "st", layer_norm_epsilon=0.25)
    with pytest.raises(offload.ChecksumError, match=r"config.json changed after the store was written"):
        offload.load(store.path, ram_tier=0, progress=False)


def test_two_builders_of_one_cached_store_take_turns(tmp_path, monkeypatch):
    """A second loader of the same folder waits for the first build and reuses it: one build, one path
    that exists (before: both wrote the same .partial folder; one failed, or returned a deleted path)."""
    conv = sys.modules["offload.convert"]
    folder = _tiny_folder(tmp_path)
    real, calls = conv.write_index, []
    in_build, go, second_waits = threading.Event(), threading.Event(), threading.Event()

    def gated_convert(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            in_build.set()
            assert go.wait(30)
        else:
            second_waits.set()  # without the lock, the second loader builds too
        return real(*args, **kwargs)
    monkeypatch.setattr(conv, "write_index", gated_convert)  # the folder is indexed in place (no copy)
    out: dict = {}

    def build(k):
        out[k] = conv.cached_store(str(folder), progress=False,
                                   note=lambda s: second_waits.set() if "waiting" in s else None)
    t1 = threading.Thread(target=build, args=(1,), daemon=True)
    t1.start()
    assert in_build.wait(30)
    t2 = threading.Thread(target=build, args=(2,), daemon=True)
    t2.start()
    assert second_waits.wait(30)
    go.set()
    t1.join(30)
    t2.join(30)
    assert len(calls) == 1, "two processes built the same store"
    assert out[1] == out[2] and (Path(out[1]) / "manifest.json").exists()


class _Uneven(nn.Module):
    """Two large blocks and six small ones: the tier can hold the large ones, the small ones stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.ModuleList(nn.Linear(128, 128) for _ in range(2))
        self.small = nn.ModuleList(nn.Linear(8, 128) for _ in range(6))
        self.proj = nn.Linear(128, 8)

    def forward(self, x):
        for b in self.big:
            x = torch.tanh(b(x))
        for s in self.small:
            x = x + torch.tanh(s(self.proj(x)))
        return x


def test_the_ring_is_sized_for_the_units_that_stream_after_the_tier_is_chosen(tmp_path, no_thread_leak):
    """Issue 17.6: the ring was sized for the largest unit before the RAM tier was chosen (3 slots of
    a 4.2 MB unit the tier then kept, for streamed units of 69 KB)."""
    model = _Uneven()
    ref = copy.deepcopy(model)
    names = [f"big.{i}" for i in range(2)] + [f"small.{i}" for i in range(6)]
    store = offload.convert(model, tmp_path / "s", units=names, progress=False)
    sizes = {u.name: u.data_bytes for u in store.units}
    resident = sum(p.numel() * p.element_size() for p in model.proj.parameters())
    budget = resident + 2 * sizes["big.0"] + 3 * sizes["small.0"]  # big ones in RAM + a ring of small slots
    x = torch.randn(3, 128)
    with offload.enable(model, prefetch=2, cpu_memory=budget, units=names, store=tmp_path / "s", progress=False) as h:
        tier = {h._prefetcher.units[i].name for i in h._prefetcher.ram_tier}
        assert tier == {"big.0", "big.1"}
        assert h._prefetcher.config.slot_bytes == sizes["small.0"] and h._prefetcher.config.ring_slots == 3
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))


def test_the_cli_plan_is_what_load_allocates(tmp_path, no_thread_leak):
    import re
    import subprocess
    store = offload.convert(_tiny_folder(tmp_path), tmp_path / "st", progress=False)
    unit = store.units[0].data_bytes
    resident = store.resident.data_bytes
    budget = resident + 3 * unit + unit // 2  # one unit in the RAM tier + a ring of two for the others (prefetch 1)
    r = subprocess.run([sys.executable, "-m", "offload.cli", "run", store.path, "--dry-run", "--prefetch", "1",
                        "--cpu-memory", str(budget)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"^(RAM tier.*?|host staging ring.*?)\s+RAM\s+.*?(\d+)\s*$",
                                                                      r.stdout, re.M)}
    model, h = offload.load(store.path, 1, cpu_memory=budget, progress=False)
    try:
        assert row["RAM tier (read once)"] == h.stats().ram_tier_units == 1
        assert row["host staging ring (prefetch 1 + 1)"] == h._prefetcher.config.ring_slots == 2
    finally:
        h.disable()


def test_the_library_never_imports_the_cli():
    """Every library module imports without pulling in ``offload.cli`` (speculate used to, for meta_model)."""
    import subprocess
    code = ("import importlib, pkgutil, sys, offload\n"
            "for m in pkgutil.iter_modules(offload.__path__):\n"
            "    if m.name not in ('cli', '__main__'):\n"
            "        importlib.import_module('offload.' + m.name)\n"
            "print(sorted(k for k in sys.modules if k.startswith('offload.cli')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def _import_graph() -> dict[str, set[str]]:
    """Every ``from .x import`` among offload's modules, deferred (in-function) ones included."""
    import ast
    root = os.path.dirname(offload.__file__)
    mods: dict[str, str | None] = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            stem, ext = os.path.splitext(f)
            if ext in (".py", ".so"):
                rel = os.path.relpath(os.path.join(dp, stem.split(".")[0]), os.path.dirname(root)).replace(os.sep, ".")
                rel = rel.removesuffix(".__init__")
                mods[rel] = os.path.join(dp, f) if ext == ".py" else None
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        if path is None:
            continue
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(open(path).read())):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
                subs = [f"{target}.{a.name}" for a in n.names if f"{target}.{a.name}" in mods]
                graph[m] |= {t for t in (subs or [target]) if t in mods and t != m}
    return graph


def test_no_import_cycle_deferred_imports_included():
    """A split that sends imports both ways makes a bigger circle; an in-function import hides one."""
    graph = _import_graph()
    assert "offload.store" in graph and "offload.integrity" in graph["offload.store"]  # the walk sees imports
    seen: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if t == "offload" or m == "offload":
                continue  # the package's __init__ re-exports the public names: not a dependency of them
            if seen.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in seen:
                visit(t)
        path.pop()
        seen[m] = 2
    for m in sorted(graph):
        if m not in seen:
            visit(m)


def test_an_install_ships_every_subpackage():
    """``pip install .`` (not editable) ships what pyproject names: a listed ``packages`` missed
    ``offload.quant`` and ``offload.speculate`` once they became folders, so a wheel failed on import."""
    import tomllib

    from setuptools import find_packages
    root = os.path.dirname(os.path.dirname(offload.__file__))
    cfg = tomllib.load(open(os.path.join(root, "pyproject.toml"), "rb")).get("tool", {}).get("setuptools", {})
    if "packages" in cfg and isinstance(cfg["packages"], list):
        shipped = set(cfg["packages"])
    else:
        find = cfg.get("packages", {}).get("find", {})
        shipped = set(find_packages(root, include=find.get("include", ["*"]), exclude=find.get("exclude", ())))
    folders = {os.path.relpath(dp, root).replace(os.sep, ".") for dp, _, fs in os.walk(os.path.dirname(offload.__file__))
               if "__init__.py" in fs}
    assert folders and folders <= shipped, sorted(folders - shipped)


def test_a_refused_cast_changes_nothing_and_a_no_op_one_goes_through(no_thread_leak):
    """torch's _apply cast the tensors before the first streamed one (the embeddings) and only then hit the
    stand-in's refusal: model.half() failed and left the model in mixed dtypes, its weights changed after
    disable(). Now the streamed tensors are asked first; and .to("cpu") / .float(), which change none of
    them, go through instead of raising."""
    model = make_model("opt")
    ids = inputs_for("opt")["input_ids"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(ids).logits
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False):
        for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.model.decoder.layers[1].half()):
            with pytest.raises(offload.OffloadError, match="nothing was changed"):
                cast(model)
            assert model.model.decoder.embed_tokens.weight.dtype == torch.float32
        assert model.to("cpu") is model and model.float() is model and model.cpu() is model
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_backward_through_an_enabled_forward_is_a_named_error(no_thread_leak):
    """The units' weights are freed as each forward ends, so a backward failed deep in autograd with a size
    mismatch; it now says why and what to do, and the model keeps working."""
    model = make_model("opt")
    ids = inputs_for("opt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False):
        model.train()
        loss = model(ids, labels=ids).loss
        with pytest.raises(offload.OffloadError, match="backward.*torch.no_grad"):
            loss.backward()
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)


def test_a_backward_through_units_that_keep_their_weights_is_not_refused(no_thread_leak):
    """Units in the RAM tier on the CPU keep their weights between forwards, so a backward through them
    works (a gradient with respect to the input, weights frozen); only streamed weights are refused."""
    model = make_model("opt")
    ids = inputs_for("opt")["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach()
    for p in model.parameters():
        p.requires_grad_(False)
    x = embeds.clone().requires_grad_(True)
    model(inputs_embeds=x).logits.sum().backward()
    expected = x.grad.clone()
    with offload.enable(model, prefetch=1, cpu_memory="1GiB", progress=False) as h:
        assert h.stats().streamed_units == 0
        y = embeds.clone().requires_grad_(True)
        model(inputs_embeds=y).logits.sum().backward()
        assert torch.equal(y.grad, expected)


@pytest.mark.parametrize("route", ["ram-tier", "streamed", "int8", "routed-experts"])
def test_a_forward_with_grad_mode_after_one_under_inference_mode(route):
    """Views of a unit's buffers are built once and kept; built under ``torch.inference_mode()`` they were
    inference tensors, so a later forward with grad mode on (a first probe under inference mode, then a loss)
    failed with "Inference tensors cannot be saved for backward". Each route binds its own kind of view."""
    import transformers as tf
    from conftest import moe_config
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(moe_config("qwen3_moe" if route == "routed-experts" else "llama")).eval()
    x = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    kw: dict = {"ram_tier": None if route == "ram-tier" else 0, "quantize": "int8" if route == "int8" else None}
    if route == "int8":  # the reference: the same int8 units, all in RAM
        quantized = copy.deepcopy(model)
        with offload.enable(quantized, ram_tier="1GiB", quantize="int8", progress=False, tune=False):
            want = quantized(x).logits.detach()  # grad mode on, as below (int8's kernels differ under no_grad)
    else:
        want = model(x).logits.detach()
    with offload.enable(model, progress=False, tune=False, **kw) as h:
        with torch.inference_mode():
            model(x)
            model(x)  # every ring slot meets a unit under inference mode
        got = model(x).logits  # grad mode on
        assert torch.equal(got.detach(), want)
        if route == "routed-experts":
            assert h.stats().expert_bytes_read > 0


def test_stats_after_disable_are_what_they_were_at_disable(tmp_path):
    """A handle's stats after ``disable()`` (or a ``with`` block): they zeroed the reads but kept the passes and
    counted every unit as streamed, a summary no run had."""
    model = Stack(3)
    with offload.enable(model, ram_tier=0, prefetch=1, progress=False, tune=False) as h:
        for _ in range(2):
            model(torch.randn(2, D))
        during = h.stats()
    assert during.bytes_read > 0 and during.streamed_units == 3 and during.passes == 2
    assert h.stats() == during
    h.reset_stats()  # a no-op once disabled
    assert h.stats() == during


def test_stats_prefetch_is_the_depth_the_ring_allows():
    """``prefetch=16`` over 3 streamed units: the ring has 3 slots (one computing), so 2 units are read ahead;
    stats() said 16."""
    model = Stack(3)
    with offload.enable(model, ram_tier=0, prefetch=16, progress=False, tune=False) as h:
        model(torch.randn(2, D))
        assert h.stats().prefetch == 2 and h.stats().streamed_units == 3
    with offload.enable(model, ram_tier=0, prefetch=1, progress=False, tune=False) as h:
        assert h.stats().prefetch == 1


def test_a_loaded_model_after_disable_says_it_has_no_weights(tmp_path):
    """A model ``offload.load`` built on meta, disabled: its forward failed inside torch ("Tensor on device cpu
    is not on the expected device meta"). Now an OffloadError says why, until it is enabled again."""
    import transformers as tf
    from conftest import moe_config
    torch.manual_seed(0)
    reference = tf.AutoModelForCausalLM.from_config(moe_config("llama", layers=2)).eval()
    reference.save_pretrained(tmp_path / "m")
    x = torch.randint(0, 256, (1, 5))
    model, h = offload.load(tmp_path / "m", progress=False, tune=False)
    store = h.stats().store
    h.disable()
    with pytest.raises(offload.OffloadError, match="was disabled and its weights are not in memory"):
        model(x)
    with offload.enable(model, store=store, progress=False, tune=False), torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    with pytest.raises(offload.OffloadError, match="was disabled"):
        model(x)
    model.load_state_dict(reference.state_dict(), assign=True)  # its weights given back: the refusal goes
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


def test_disable_tears_down_when_the_stats_cannot_be_read(monkeypatch):
    """disable() reads the stats first (what stats() answers after it); a read that raises (a sticky CUDA error
    in the pass meter's events) must not stop the teardown: the model gets its weights back."""
    model = Stack(2)
    want = model.blocks[0].lin.weight.detach().clone()
    h = offload.enable(model, ram_tier=0, progress=False, tune=False)
    run(model, torch.randn(2, D))

    def broken() -> float:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(h._meter, "s_per_pass", broken)
    h.disable()
    assert h.closed and not isinstance(model.blocks[0].lin.weight, Offloaded)
    assert torch.equal(model.blocks[0].lin.weight, want) and h.stats().bytes_read == 0


@pytest.mark.parametrize("keep_vars", [False, True])
def test_state_dict_taken_while_another_thread_is_inside_a_unit(keep_vars):
    """A checkpoint thread's ``state_dict()`` while the forward thread is inside unit 1 collected unit 1's bound
    tensors: views of a ring slot that the next units overwrite, so it kept other blocks' weights, silently.
    Those entries are now read from the store (``keep_vars``: the stand-ins). Gates, no sleeps."""
    model = Stack(3)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    inside, go = threading.Event(), threading.Event()

    def hold(module, args):
        if not inside.is_set():
            inside.set()
            assert go.wait(30)
    with offload.enable(model, ram_tier=0, prefetch=1, progress=False, tune=False):
        gate = model.blocks[1].out.register_forward_pre_hook(hold)  # unit 1 bound, its forward underway
        forward = threading.Thread(target=lambda: [run(model, torch.randn(2, D)) for _ in range(2)])
        forward.start()
        try:
            assert inside.wait(30)
            got = model.state_dict(keep_vars=keep_vars)
        finally:
            go.set()
            forward.join(30)
        gate.remove()
        run(model, torch.randn(2, D))  # every ring slot written again
        for k, v in want.items():
            g = got[k]
            if isinstance(g, Offloaded):
                g = g.materialize()
            assert torch.equal(g, v), k


@pytest.mark.parametrize("where", ["model built", "folder loaded"])
def test_a_model_made_under_inference_mode_runs_in_every_mode(where, tmp_path):
    """Parameters made under ``torch.inference_mode()`` (a model built there, or ``offload.load`` called there,
    which makes the Parameters of a model built on meta) are inference tensors: binding them to views made
    outside inference mode failed every forward ("Inference tensors do not track version counter"). Such a
    Parameter is not kept: the unit binds a Parameter made outside inference mode."""
    import transformers as tf
    from conftest import moe_config
    x = torch.randint(0, 256, (1, 5))
    torch.manual_seed(0)
    reference = tf.AutoModelForCausalLM.from_config(moe_config("llama", layers=2)).eval()
    with torch.no_grad():
        want = reference(x).logits
    if where == "model built":
        with torch.inference_mode():
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(moe_config("llama", layers=2)).eval()
        handle = offload.enable(model, ram_tier=0, progress=False, tune=False)
    else:
        reference.save_pretrained(tmp_path / "m")
        with torch.inference_mode():
            model, handle = offload.load(tmp_path / "m", ram_tier=0, progress=False, tune=False)
    try:
        with torch.inference_mode():
            assert torch.equal(model(x).logits, want)
        with torch.no_grad():
            assert torch.equal(model(x).logits, want)
    finally:
        handle.disable()


def test_assigning_a_streamed_weight_while_enabled_is_refused():
    """``module.weight = nn.Parameter(...)`` (or ``register_buffer``) on a streamed slot was silently undone at the
    unit's next forward, which binds the store's tensor: refused now, the model unchanged; resident weights, and
    every weight after ``disable``, take assignments as usual."""
    model = Stack(2)
    x = torch.randn(2, D)
    want = run(model, x)
    new = nn.Parameter(torch.zeros(D, D))
    with offload.enable(model, ram_tier=0, progress=False, tune=False):
        with pytest.raises(offload.OffloadError, match=r"Linear.weight is streamed by offload"):
            model.blocks[0].lin.weight = new
        with pytest.raises(offload.OffloadError, match="is streamed by offload"):
            model.blocks[1].out.register_parameter("bias", nn.Parameter(torch.zeros(D)))
        assert torch.equal(run(model, x), want)
        model.head.bias = nn.Parameter(model.head.bias.detach().clone())  # resident: assignable
    model.blocks[0].lin.weight = new  # disabled: the model is the user's again
    assert model.blocks[0].lin.weight is new


def test_buffers_made_during_an_inference_mode_forward_serve_later_forwards():
    """Host buffers (a ring made when units first stream, expert tables) can be made during a forward under
    ``torch.inference_mode()``; as inference tensors, their views could not serve a later forward with grad
    mode on, nor take an in-place write outside inference mode."""
    from offload.staging import HostBuffer
    with torch.inference_mode():
        buf = HostBuffer(1 << 20)
    assert not buf.tensor.is_inference()
    buf.tensor[:4].copy_(torch.arange(4, dtype=torch.uint8))  # outside inference mode: allowed
    buf.close()


def test_a_submodule_kept_after_its_model_was_dropped_takes_weights_again():
    """A model enabled and dropped without ``disable()``: a submodule the user kept still counted as streamed, so
    assigning it weights was refused for good, naming a model that no longer exists."""
    import gc
    model = Stack(2)
    lin = model.blocks[0].lin
    offload.enable(model, ram_tier=0, progress=False, tune=False)
    del model
    gc.collect()
    new = nn.Parameter(torch.zeros(D, D))
    lin.weight = new
    assert lin.weight is new


def test_enabling_a_model_that_shares_a_streamed_module_with_an_enabled_one_is_refused():
    """Two models sharing a block: enabling the second while the first streams it planned from the first's
    stand-ins and, depending on the order of its steps, failed half-installed or streamed nothing of it.
    Refused before anything is touched; once the first is disabled the second enables as usual."""
    a, b = Stack(2), Stack(2, seed=1)
    b.blocks[0] = a.blocks[0]
    x = torch.randn(2, D)
    want_a, want_b = run(a, x), run(b, x)
    with offload.enable(a, ram_tier=0, progress=False, tune=False):
        with pytest.raises(offload.OffloadError, match="streamed by another model"):
            offload.enable(b, ram_tier=0, progress=False, tune=False)
        assert torch.equal(run(a, x), want_a)
    with offload.enable(b, ram_tier=0, progress=False, tune=False):
        assert torch.equal(run(b, x), want_b)
