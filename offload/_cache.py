"""What is in the cache folder (``config.cache_dir()``), whether each entry is still wanted, and removing one
without ever touching anything outside the cache.

Layout (what writes each entry):

* ``stores/<name>-<path hash>-<dtype>[-int8|-int4]``: the cached store of a checkpoint folder
  (``convert.cached_store``); *current* while its source files and dtype match (``convert``'s own check),
  else *stale* (the source changed or is gone).
* ``stores/.<store>.partial``: a build of that store, interrupted (*partial*), or in progress
  (*building*: the build's lock file ``stores/<store>.lock`` is held).
* ``stores/.<store>.old-<pid>``: a store swapped out by a rebuild and not yet removed (*stale*).
* ``stores/<fingerprint>``: the store ``enable()`` keeps for an Accelerate-dispatched model (*current*:
  it is found again by the model's fingerprint).
* ``store-XXXXXXXX``: ``enable()``'s temporary store of a plain module, removed by ``disable()``;
  ``OWNER_FILE`` in it names the process (pid and start time, so a reused pid is not taken for it):
  *temporary* while that process runs, *orphaned* once it is gone (a crash skipped ``disable()``).
* ``random/<name>-<dtype>``: the CLI's random-weight checkpoints (``.partial`` while written).
  These and ``enable()``'s model stores are written without a lock: an unfinished one counts as
  *building* while it was written to in the last ``RECENT_S``, then as *partial*.
* Any store a running handle reads (``enable``, ``load``, ``run``, ``serve``) holds a shared ``flock`` on its
  ``IN_USE_FILE`` for the handle's life (``hold``): *in-use*, never removed, ``--all`` included, whatever
  its state would be otherwise (a current store, a stale one, one a rebuild swapped out).
* ``stores/<store>.lock``: the build lock of ``<store>`` (``convert._build_lock``), shown as part of its
  store or build, and as *lock* once neither is left. Never removed, ``--all`` included: removing a lock
  file another process is about to take would let two builds run at once (and it is empty).
  Anything else is *other*, listed, and removed only by ``clean --all``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time

from ._fileio import IN_USE_FILE, in_use, lock_held

OWNER_FILE = ".offload-owner.json"
# A temporary store whose owner file is missing (offload before the file existed, or a process killed
# between creating the folder and writing the file) counts as orphaned once it is this old.
UNOWNED_GRACE_S = 3600.0
# Writes that take no lock (the CLI's --random checkpoints, enable()'s store of an Accelerate model)
# count as in progress ("building") while anything in them changed this recently.
RECENT_S = 600.0

CLEANED = ("stale", "partial", "orphaned")  # what ``clean`` removes without --all
KEPT = ("building", "temporary", "in-use", "lock")  # never removed, --all included


@dataclasses.dataclass
class Entry:
    rel: str  # path relative to the cache folder
    path: str
    state: str  # current, stale, partial, building, temporary, orphaned, lock, other
    size: int
    source: str = ""  # where it came from (a checkpoint folder, a process)
    detail: str = ""  # why it has that state


# ------------------------------------------------------------------------------ temporary stores' owners


def write_owner(folder: str) -> None:
    """Record this process as the owner of ``folder`` (a temporary store): pid and start time."""
    import psutil
    with open(os.path.join(folder, OWNER_FILE), "w") as f:
        json.dump({"pid": os.getpid(), "start_time": psutil.Process().create_time()}, f)


def owner_of(folder: str) -> tuple[int | None, bool | None]:
    """``(pid, alive)`` of a temporary store's owner; ``(None, None)`` when it recorded none."""
    import psutil
    try:
        with open(os.path.join(folder, OWNER_FILE)) as f:
            doc = json.load(f)
        pid, start = int(doc["pid"]), float(doc["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    try:
        return pid, abs(psutil.Process(pid).create_time() - start) < 0.01  # another process under a reused pid
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return pid, False
    except psutil.Error:  # cannot tell (another user's process): it may be alive
        return pid, True


# ------------------------------------------------------------------------------ sizes and states


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path``, symlinks counted as links (never followed)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total = 0
    with contextlib.suppress(OSError):
        with os.scandir(path) as it:
            for e in it:
                total += tree_bytes(e.path) if e.is_dir(follow_symlinks=False) else e.stat(follow_symlinks=False).st_size
    return total


def written_within(path: str, seconds: float) -> bool:
    """Whether ``path`` or a file directly in it was modified in the last ``seconds``."""
    newest = os.lstat(path).st_mtime
    with contextlib.suppress(OSError):
        with os.scandir(path) as it:
            for e in it:
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    return time.time() - newest < seconds


def _unlocked_write(e: Entry, what: str) -> Entry:
    """A write no lock announces: *building* while recently written to, else *partial*."""
    if written_within(e.path, RECENT_S):
        e.state, e.detail = "building", f"{what}, written to in the last {RECENT_S / 60:.0f} min"
    else:
        e.state, e.detail = "partial", f"{what}, interrupted"
    return e


def store_state(path: str) -> tuple[str, str, str]:
    """``(state, source, why)`` of a cached store: ``current`` or ``stale``, by ``convert``'s own check."""
    import torch

    from .convert import _stale_reason
    from .errors import OffloadError
    from .sources import source_files
    from .store import Store
    try:
        st = Store.open(path, check_files=False)
    except OffloadError as e:
        return "stale", "", f"damaged: {e}"
    src = st.source
    folder = src.get("path")
    if not folder or "files" not in src:  # a model's store (enable() of an Accelerate model): keyed by fingerprint
        return "current", f"model {src.get('class') or src.get('kind', '?')}", "reused by the model's fingerprint"
    if not os.path.isdir(folder):
        return "stale", folder, "its source folder is gone"
    try:
        why = _stale_reason(src, source_files(folder), st.dtype or getattr(torch, str(src.get("dtype"))))
    except (OffloadError, OSError, AttributeError) as e:
        why = f"its source cannot be read ({e})"
    return ("stale", folder, why) if why else ("current", folder, "source files and dtype unchanged")


def _classify(root: str, rel: str) -> Entry:
    path = os.path.join(root, rel)
    name = os.path.basename(rel)
    parent = os.path.dirname(rel)
    e = Entry(rel, path, "other", tree_bytes(path))
    if os.path.islink(path):
        e.detail = f"a link to {os.readlink(path)} (never followed)"
        return e
    is_dir = os.path.isdir(path)
    if name.endswith(".lock") and not is_dir:
        held = lock_held(path)
        e.state, e.detail = "lock", ("a build lock, held by a build in progress" if held else
                                     "a build lock, not held; never removed (two builds could then race)")
        return e
    if parent == "" and name.startswith("store-") and is_dir:
        pid, alive = owner_of(path)
        e.source = f"enable() in process {pid}" if pid is not None else "enable() (owner not recorded)"
        if alive is None:
            age = time.time() - os.lstat(path).st_mtime
            alive = age < UNOWNED_GRACE_S
            e.detail = f"no owner file; modified {age / 60:.0f} min ago"
        else:
            e.detail = "its process is running" if alive else "its process is gone: disable() never ran"
        e.state = "temporary" if alive else "orphaned"
        return e
    if parent == "stores" and is_dir and in_use(path):
        e.state, e.detail = "in-use", "a running process reads it"
        with contextlib.suppress(Exception):
            e.source = store_state(path)[1]
        return e
    if parent in ("stores", "random") and is_dir and name.startswith(".") and ".old-" in name:
        e.state, e.detail = "stale", "swapped out by a rebuild"
        return e
    if parent in ("stores", "random") and is_dir and name.endswith(".partial"):
        final = name[1:-len(".partial")] if name.startswith(".") else name[:-len(".partial")]
        if parent == "random":
            return _unlocked_write(e, f"the random checkpoint {os.path.join(parent, final)} being written")
        locks = [os.path.join(root, parent, final + ".lock"), path + ".lock"]
        if any(lock_held(x) for x in locks):
            e.state, e.detail = "building", f"a build of {os.path.join(parent, final)} in progress (it holds the lock)"
        else:
            e.state, e.detail = "partial", f"an interrupted build of {os.path.join(parent, final)}"
        return e
    if parent == "stores" and is_dir:
        from .manifest import MANIFEST
        if not os.path.exists(os.path.join(path, MANIFEST)):
            return _unlocked_write(e, "a store without its manifest (enable() writing it)")
        else:
            e.state, e.source, e.detail = store_state(path)
        return e
    if parent == "random" and is_dir:
        if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            return _unlocked_write(e, "offload run --random's checkpoint, not finished")
        e.state, e.detail = "current", "offload run --random's checkpoint"
    return e


def entries(root: str) -> list[Entry]:
    """Every entry of the cache folder ``root``: the children of ``stores/`` and ``random/``, everything else
    at the top (``stores`` and ``random`` themselves are folders of entries, not entries)."""
    out = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if name in ("stores", "random") and os.path.isdir(full) and not os.path.islink(full):
            names = set(os.listdir(full))
            out += [_classify(root, os.path.join(name, n)) for n in sorted(names)  # a lock goes with its store
                    if not (n.endswith(".lock") and ({n[:-5], f".{n[:-5]}.partial"} & names))]
        else:
            out.append(_classify(root, name))
    return out


def to_remove(items: list[Entry], everything: bool) -> list[Entry]:
    """What ``clean`` removes: stale, partial and orphaned entries; with ``everything``, all but what is in
    use (a build in progress, a running process's temporary store) and build locks."""
    return [e for e in items if (e.state not in KEPT if everything else e.state in CLEANED)]


def remove(root: str, e: Entry) -> None:
    """Remove one entry: only inside ``root`` (both resolved), a symlink as a link (its target untouched)."""
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.dirname(e.path))  # the entry's folder, links resolved; not the entry
    where = os.path.join(parent, os.path.basename(e.path))
    if os.path.commonpath([real_root, where]) != real_root or where == real_root:
        raise ValueError(f"{e.path} is not inside the cache folder {real_root}: not removed")
    if os.path.islink(where) or not os.path.isdir(where):
        os.unlink(where)
    else:
        shutil.rmtree(where)  # removes links inside as links, never following them
