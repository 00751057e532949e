"""Byte sizes and memory budgets, including the container limits psutil does not see."""
from __future__ import annotations

import os
import re

import psutil

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: int | float | str) -> int:
    """Accept 1234, "1.5GB", "8GiB" (binary and decimal suffixes, case-insensitive)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size, got {value!r}")
    if isinstance(value, (int, float)):
        if not value >= 0 or value == float("inf"):  # nan fails the comparison
            raise ValueError(f"byte size must be a finite number >= 0, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a byte size: use a number of bytes or e.g. '512MiB', '8GiB', '4GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


_PROC_CGROUP, _CGROUP_ROOT = "/proc/self/cgroup", "/sys/fs/cgroup"  # tests point them at a tree of their own


def cgroup_memory_headroom() -> int | None:
    """Bytes this process's memory cgroup still allows (limit - usage), or None without a limit.

    psutil reports the host's memory; inside a container (or a benchmark's cgroup) the
    cgroup limit is what triggers the OOM killer, so a budget must respect it.
    """
    try:
        with open(_PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            root, names = _CGROUP_ROOT, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # cgroup v1
            root, names = os.path.join(_CGROUP_ROOT, "memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        # this cgroup and every ancestor: a limit on a parent (a systemd slice, a Kubernetes pod) binds
        # too. A path that is not there is a container whose own cgroup is mounted as the root (cgroup
        # v1 without a namespace): the walk reaches the mount's root, which is that cgroup.
        parts = [x for x in rel.split("/") if x]
        for depth in range(len(parts), -1, -1):
            base = os.path.join(root, *parts[:depth])
            limit, usage = _read_int(os.path.join(base, names[0])), _read_int(os.path.join(base, names[1]))
            if limit is not None and limit >= 1 << 60:  # v1 reports "no limit" as a huge number
                limit = None
            if limit is not None:
                headroom = max(0, limit - (usage or 0))
                best = headroom if best is None else min(best, headroom)
    return best


def available_memory() -> int:
    """Memory a new allocation can use without swapping or tripping a container limit."""
    avail = psutil.virtual_memory().available
    cg = cgroup_memory_headroom()
    return avail if cg is None else min(avail, cg)


def free_disk_bytes(path: str) -> tuple[int, str]:
    """Bytes free to this user on the filesystem that would hold ``path`` (which may not exist yet)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize, probe


def ensure_free_space(path: str, needed: int, what: str) -> None:
    """Refuse a write of ``needed`` bytes under ``path`` before it starts, naming what and both sizes.

    A write that fills the disk half way leaves a partial folder behind and breaks other programs on
    the same filesystem; checking first costs one ``statvfs``. (Another writer can still race us: this
    catches the common case, the write itself still fails cleanly on ENOSPC.)
    """
    free, probe = free_disk_bytes(path)
    if needed > free:
        from .errors import OffloadError
        raise OffloadError(f"{what} needs {format_bytes(needed)} on {probe} but only {format_bytes(free)} is free: "
                           f"free space there, or write elsewhere (e.g. OFFLOAD_CACHE=/bigger/disk)")
