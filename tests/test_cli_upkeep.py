"""The CLI's upkeep (issue 17): free space checked before writing, optional dependencies refused before any
work, nothing but the command's own output on stderr, ``offload cache`` and its ``clean``, and the
README's Python surface."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

import offload
from offload.cli import main
from conftest import make_model


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def one_error_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and all(w in lines[0] for w in words), lines[0]
    return lines[0]


def cache_files() -> list[str]:
    root = os.environ["OFFLOAD_CACHE"]
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in fs + ds)


@pytest.fixture
def ckpt(tmp_path, capsys):
    folder = tmp_path / "tiny"
    make_model("bloom").save_pretrained(folder, safe_serialization=True)
    capsys.readouterr()  # save_pretrained's progress bar is not the CLI's stderr
    return str(folder)


# ------------------------------------------------------------------------------ stderr (item 9)


def test_version_prints_nothing_on_stderr():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"offload {offload.__version__}" and r.stderr == ""


def test_torchao_import_noise_is_silenced():
    """Building a meta model imports transformers' quantizers, which import torchao: its CUDA-extension
    and triton warnings and torch's pytree notes must not reach stderr (a dry run prints none, and a
    budget error is exactly its one line)."""
    r = run_cli("run", "--random", "tiny-bloom", "--dry-run")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run_cli("run", "--random", "tiny-bloom", "--cpu-memory", "1KiB")
    assert r.returncode == 2
    one_error_line(r.stderr, "--cpu-memory")


# ------------------------------------------------------------------------------ optional dependencies (item 8)


def test_plot_without_matplotlib_is_refused_before_anything_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["run", "--random", "tiny-bloom", "--max-new-tokens", "2", "--plot", str(tmp_path / "t.png")]) == 2
    one_error_line(capsys.readouterr().err, "--plot", "matplotlib", "offload[plot]")
    assert cache_files() == []  # no random checkpoint, no store: nothing ran
    assert main(["bench", "--random", "tiny-bloom", "--plot", str(tmp_path / "b.png")]) == 2
    one_error_line(capsys.readouterr().err, "--plot", "matplotlib")
    assert cache_files() == []


def test_quantize_without_torchao_is_refused_before_anything_is_written(monkeypatch, capsys, ckpt, tmp_path):
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert main(["run", "--random", "tiny-bloom", "--quantize", "int8", "--max-new-tokens", "2"]) == 2
    one_error_line(capsys.readouterr().err, "--quantize int8", "torchao", "offload[quant]")
    assert main(["run", ckpt, "--quantize", "int4", "--max-new-tokens", "2"]) == 2
    one_error_line(capsys.readouterr().err, "torchao")
    assert cache_files() == []  # no .partial, no store
    assert main(["convert", ckpt, str(tmp_path / "q.store"), "--quantize", "int8", "-q"]) == 2
    one_error_line(capsys.readouterr().err, "convert --quantize int8", "torchao")
    assert not (tmp_path / "q.store").exists()
    assert main(["run", ckpt, "--speculate", "int8", "--dry-run"]) == 2
    one_error_line(capsys.readouterr().err, "--speculate int8", "torchao")


def test_native_reader_missing_is_refused_before_anything_is_written(monkeypatch, capsys):
    from offload import _native
    monkeypatch.setattr(_native, "_ext", None)
    monkeypatch.setattr(_native, "_error", "extension offload._ol_native not built: No module named 'offload._ol_native'")
    assert main(["run", "--random", "tiny-bloom", "--reader", "native", "--max-new-tokens", "2"]) == 2
    one_error_line(capsys.readouterr().err, "--reader native", "not built", "--reader python")
    assert cache_files() == []


# ------------------------------------------------------------------------------ free space (item 7)


@pytest.fixture
def tiny_disk(monkeypatch):
    """A filesystem with 64 KiB free, as ``ensure_free_space`` sees it."""
    import offload._memory as M
    monkeypatch.setattr(M, "free_disk_bytes", lambda path: (64 << 10, os.path.dirname(os.path.abspath(path))))


def test_a_folder_read_in_place_needs_room_for_its_index_only(tiny_disk, ckpt, capsys):
    """64 KiB free: the index of a folder in its own dtype fits; a cast (a copy of every weight) does not."""
    assert main(["run", ckpt, "--max-new-tokens", "2", "-q"]) == 0
    capsys.readouterr()
    assert main(["run", ckpt, "--dtype", "bf16", "--max-new-tokens", "2", "-q"]) == 2
    one_error_line(capsys.readouterr().err, "its store", "64.00 KiB is free")


def test_run_random_refuses_a_checkpoint_the_disk_cannot_hold(tiny_disk, capsys):
    assert main(["run", "--random", "tiny-bloom", "--max-new-tokens", "2", "-q"]) == 2
    line = one_error_line(capsys.readouterr().err, "random tiny-bloom checkpoint", "its index (read in place)",
                          "64.00 KiB is free")
    assert re.search(r"needs \d+\.\d+ (KiB|MiB)", line)
    assert cache_files() == []  # refused before the random checkpoint's folder was made
    # --dry-run plans anyway, and says it would not fit
    assert main(["run", "--random", "tiny-bloom", "--dry-run"]) == 0
    assert "note:" in capsys.readouterr().err and cache_files() == []


def test_convert_refuses_a_store_the_disk_cannot_hold(ckpt, tiny_disk, capsys, tmp_path):
    assert main(["convert", ckpt, str(tmp_path / "s.store")]) == 2
    one_error_line(capsys.readouterr().err, "64.00 KiB is free")
    assert not (tmp_path / "s.store").exists()


def test_random_checkpoint_refused_for_bench_too(tiny_disk, tmp_path):
    import torch

    from offload.cli.models import random_checkpoint
    with pytest.raises(offload.OffloadError, match="64.00 KiB is free"):
        random_checkpoint("tiny-bloom", torch.bfloat16, str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_bench_disk_refuses_a_test_file_the_disk_cannot_hold(tiny_disk, capsys, tmp_path):
    assert main(["bench-disk", str(tmp_path), "--size", "8MiB", "--repeats", "1"]) == 2
    one_error_line(capsys.readouterr().err, "test file", "8.00 MiB", "64.00 KiB is free")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ offload cache (item 10)


def _hold(path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _exited_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _entries(capsys) -> dict[str, str]:
    capsys.readouterr()
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    rows = [x.split() for x in out.splitlines()[2:] if x and not x.startswith("`offload cache clean`")]
    return {r[3]: r[0] for r in rows}  # entry -> state ("12.00 KiB" is two words)


def test_cache_lists_every_entry_and_clean_removes_only_what_nothing_needs(capsys, ckpt, tmp_path):
    from offload._cache import OWNER_FILE
    from offload.convert import cached_store
    root = os.environ["OFFLOAD_CACHE"]
    current = cached_store(ckpt, progress=False)
    other = tmp_path / "other"
    make_model("bloom", seed=1).save_pretrained(other, safe_serialization=True)
    stale = cached_store(str(other), progress=False)
    os.utime(next(other.glob("*.safetensors")), (1, 1))  # its source changed since
    stores = os.path.join(root, "stores")
    os.makedirs(os.path.join(stores, ".gone-0123-bfloat16.partial"))  # an interrupted build
    with open(os.path.join(stores, ".gone-0123-bfloat16.partial", "x.safetensors"), "wb") as f:
        f.write(b"x" * 1000)
    os.makedirs(os.path.join(stores, ".busy-0123-bfloat16.partial"))  # a build in progress: its lock is held
    lock = _hold(os.path.join(stores, "busy-0123-bfloat16.lock"))
    alive = os.path.join(root, "store-alive")
    dead = os.path.join(root, "store-dead")
    reused = os.path.join(root, "store-reused")
    for folder, owner in ((alive, None), (dead, {"pid": _exited_pid(), "start_time": 1.0}),
                          (reused, {"pid": os.getpid(), "start_time": 12345.0})):  # our pid, not our start time
        os.makedirs(folder)
        if owner is None:
            from offload._cache import write_owner
            write_owner(folder)
        else:
            with open(os.path.join(folder, OWNER_FILE), "w") as f:
                json.dump(owner, f)
    # things outside the cache, reachable through links in it: never removed, never followed
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    os.symlink(outside, os.path.join(stores, ".link-0123-bfloat16.partial"))
    os.symlink(outside, os.path.join(root, "store-link"))
    os.symlink(outside, os.path.join(stores, ".gone-0123-bfloat16.partial", "inner-link"))
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("mine")

    try:
        states = _entries(capsys)
        rel = lambda p: os.path.relpath(p, root)  # noqa: E731
        assert states == {rel(current): "current", rel(stale): "stale",
                          "stores/.gone-0123-bfloat16.partial": "partial",
                          "stores/.busy-0123-bfloat16.partial": "building",  # its lock file goes with it
                          "store-alive": "temporary", "store-dead": "orphaned", "store-reused": "orphaned",
                          "stores/.link-0123-bfloat16.partial": "other", "store-link": "other", "notes.txt": "other"}
        assert main(["cache", "clean", "--dry-run"]) == 0
        assert "would remove" in capsys.readouterr().out and _entries(capsys) == states  # nothing removed
        assert main(["cache", "clean"]) == 0
        out = capsys.readouterr().out
        assert out.count("removed ") == 4 and "freed" in out
        left = _entries(capsys)
        kept = {k: v for k, v in states.items() if v not in ("stale", "partial", "orphaned")}
        assert left == {**kept, rel(stale) + ".lock": "lock"}  # a build lock is never removed
        assert (outside / "precious.txt").read_text() == "keep me"
        assert main(["cache", "clean", "--all"]) == 0
        capsys.readouterr()
        assert _entries(capsys) == {"stores/.busy-0123-bfloat16.partial": "building", "store-alive": "temporary",
                                    rel(stale) + ".lock": "lock", rel(current) + ".lock": "lock"}
        assert (outside / "precious.txt").read_text() == "keep me" and os.listdir(outside) == ["precious.txt"]
    finally:
        os.close(lock)
    assert main(["cache", "--all"]) == 2  # --all belongs to clean
    one_error_line(capsys.readouterr().err, "clean")


def test_unlocked_writes_in_progress_are_kept_until_they_go_quiet(capsys):
    """A --random checkpoint being written (no lock) is *building* while its files change, *partial* once
    they stopped changing long ago: clean keeps the first and removes the second."""
    from offload._cache import RECENT_S
    root = os.environ["OFFLOAD_CACHE"]
    fresh, old = os.path.join(root, "random", "a-bf16.partial"), os.path.join(root, "random", "b-bf16.partial")
    for folder in (fresh, old):
        os.makedirs(folder)
        with open(os.path.join(folder, "model-00000.safetensors"), "wb") as f:
            f.write(b"x" * 100)
    past = time.time() - 2 * RECENT_S
    for p in (os.path.join(old, "model-00000.safetensors"), old):
        os.utime(p, (past, past))
    assert _entries(capsys) == {"random/a-bf16.partial": "building", "random/b-bf16.partial": "partial"}
    assert main(["cache", "clean"]) == 0
    assert _entries(capsys) == {"random/a-bf16.partial": "building"}


def test_a_crashed_enable_leaves_an_orphaned_store_that_clean_removes(capsys):
    """enable() of a plain module writes a temporary store that records its owner; a process that dies
    without disable() leaves it: `offload cache` calls it orphaned, `clean` removes it. While the owner
    runs, it is temporary and kept."""
    code = ("import os, sys, torch, offload\n"
            "m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])\n"
            "offload.enable(m, units=['0', '1', '2'])\n"
            "print('enabled', flush=True)\n"
            "sys.stdin.readline()\n"
            "os._exit(0)\n")  # no disable(): a crash, as far as the store is concerned
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "enabled"
        states = _entries(capsys)
        assert list(states.values()) == ["temporary"], states
        assert main(["cache", "clean"]) == 0 and _entries(capsys) == states  # its owner still runs: kept
    finally:
        p.communicate("\n")
    assert list(_entries(capsys).values()) == ["orphaned"]
    assert main(["cache", "clean"]) == 0
    capsys.readouterr()
    assert _entries(capsys) == {}


def test_a_store_a_running_process_reads_is_in_use_and_kept_by_clean_all(capsys, ckpt):
    """`clean --all` removed a cached store another process was streaming from (a store of more units than
    it kept open then failed its next forward). A handle holds its store's in-use lock for its life: the
    store is *in-use* and kept, and cleanable again once the process is gone."""
    code = ("import sys, torch, offload\n"
            f"m, h = offload.load({ckpt!r}, ram_tier=0, progress=False, tune=False)\n"
            "print(h.stats().store, flush=True)\n"
            "sys.stdin.readline()\n"
            "x = torch.tensor([[1, 2, 3]])\n"
            "with torch.no_grad(): m(x)\n"
            "h.disable()\n"
            "print('done', flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        store = os.path.relpath(p.stdout.readline().strip(), os.environ["OFFLOAD_CACHE"])
        assert _entries(capsys)[store] == "in-use"
        assert main(["cache", "clean", "--all"]) == 0
        assert _entries(capsys)[store] == "in-use"  # kept
        assert p.communicate("\n", timeout=120)[0].strip() == "done"  # its forward after the clean
    finally:
        if p.poll() is None:
            p.kill()
    assert _entries(capsys)[store] == "current"
    assert main(["cache", "clean", "--all"]) == 0
    assert store not in _entries(capsys)


def test_a_rebuild_keeps_the_folder_a_handle_reads_and_the_handle_reads_from_it(capsys, ckpt, monkeypatch):
    """A rebuild (`--rebuild`, or a changed source) swapped the store folder out and removed it, in-use or not;
    and a handle opening files per read (more than it keeps open) then read the new folder's files under its
    own manifest. The old folder is kept while in use, and such a handle reads through its own folder."""
    import offload
    import offload.prefetch as prefetch_mod
    from offload.convert import cached_store
    monkeypatch.setattr(prefetch_mod, "_MAX_OPEN", 0)  # every read opens its file: none pinned
    ids = torch.tensor([[1, 2, 3, 4]])
    model, h = offload.load(ckpt, dtype="bf16", ram_tier=0, progress=False, tune=False)  # a copy: files of its own
    try:
        with torch.no_grad():
            expected = model(ids).logits
        old_folder = h._store.path
        assert cached_store(ckpt, "bf16", rebuild=True, progress=False) == old_folder  # swapped in at the path
        kept = [n for n in os.listdir(os.path.dirname(old_folder)) if ".old-" in n]
        assert len(kept) == 1, "the folder in use was removed"
        for unit in h._store.units:  # the new store's weights, damaged: this handle must not read them
            for e in unit.reads:
                with open(os.path.join(old_folder, e.file), "r+b") as f:
                    f.seek(e.offset)
                    f.write(b"\x7f" * min(e.length, 4096))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
    finally:
        h.disable()
    assert _entries(capsys)[os.path.join("stores", kept[0])] == "stale"  # no longer in use: clean removes it


def test_damaged_cached_store_says_rebuild_and_info_verify_reports_the_same_checksums(capsys, ckpt):
    from offload.convert import cached_store
    store = cached_store(ckpt, "bf16", progress=False)  # a cast: a copy with unit files of its own
    unit = sorted(f for f in os.listdir(store) if f.startswith("00001."))[0]
    with open(os.path.join(store, unit), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert main(["run", ckpt, "--dtype", "bf16", "--max-new-tokens", "2", "--cpu-memory", "1MiB", "-q"]) == 2
    run_err = one_error_line(capsys.readouterr().err.strip().splitlines()[-1], unit, "--rebuild")  # after its notes
    assert "offload convert" not in run_err and f"offload run {ckpt} --dtype bf16 --rebuild" in run_err
    assert main(["info", store, "--verify", "-q"]) == 2
    info_err = one_error_line(capsys.readouterr().err, unit, "--rebuild")
    crc = re.compile(r"(CRC[-0-9A-Z]*) ([0-9a-f]{8}), the manifest recorded ([0-9a-f]{8})")
    assert crc.search(run_err) and crc.search(run_err).groups() == crc.search(info_err).groups()
    suggested = shlex.split(re.search(r"rebuild it with `([^`]*)`", run_err).group(1))
    assert suggested[:2] == ["offload", "run"]
    assert main(suggested[1:] + ["--max-new-tokens", "2", "-q"]) == 0  # the command the message names works


def test_plan_of_a_quantized_store_does_not_call_it_bf16(capsys):
    pytest.importorskip("torchao")
    assert main(["run", "--random", "tiny-bloom", "--quantize", "int8", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("int8 weights (the blocks' linear layers; the rest bf16)"), line


# ------------------------------------------------------------------------------ the README's surface (item 13)


def test_readme_python_names_resolve_as_written():
    """Every ``offload.a.b`` the README shows works as written after ``import offload`` (and importing the
    modules it names): ``offload.convert`` is the function, so ``offload.convert.cached_store`` must not
    appear."""
    import importlib
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    names = sorted(set(re.findall(r"(?<![\w./-])offload(?:\.[A-Za-z_]\w*)+", readme)))
    assert names, "no offload.* names found"
    bad = []
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):
            try:
                importlib.import_module(".".join(parts[:i]))
            except ImportError:
                break
        obj = offload
        try:
            for p in parts[1:]:
                obj = getattr(obj, p)
        except AttributeError:
            bad.append(name)
    assert not bad, f"README names that raise AttributeError: {bad}"
