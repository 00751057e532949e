"""``offload cache``: list what the cache folder holds; ``offload cache clean`` removes what nothing needs.

What each entry is and how its state is decided: ``offload._cache``. ``clean`` removes stale stores,
partial (interrupted) builds and orphaned temporary stores; ``--all`` everything but what a running
process uses (a build holding its lock, a live process's temporary store, a store a handle reads). Nothing outside the cache
folder is ever removed: a symlink in it is removed as a link, its target untouched.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from .._memory import format_bytes
from .options import UsageError, add_command


def _root() -> str:
    from ..config import cache_dir
    return cache_dir()


def _where() -> str:
    return "$OFFLOAD_CACHE" if os.environ.get("OFFLOAD_CACHE") else "the default; set OFFLOAD_CACHE to move it"


def _row(e: Any) -> str:
    why = "; ".join(x for x in (e.source, e.detail) if x)
    return f"{e.state:10s} {format_bytes(e.size):>11s}  {e.rel}" + (f"  ({why})" if why else "")


def cmd_list(a: argparse.Namespace) -> int:
    from .. import _cache
    root = _root()
    items = _cache.entries(root)
    print(f"cache {root} ({_where()}): {len(items)} entries, {format_bytes(sum(e.size for e in items))}")
    if items:
        print(f"{'state':10s} {'size':>11s}  entry  (source; why)")
    for e in items:
        print(_row(e))
    cleanable = _cache.to_remove(items, everything=False)
    if cleanable:
        print(f"`offload cache clean` would free {format_bytes(sum(e.size for e in cleanable))} "
              f"({len(cleanable)} entries: {', '.join(sorted({e.state for e in cleanable}))})")
    return 0


def cmd_clean(a: argparse.Namespace) -> int:
    from .. import _cache
    root = _root()
    items = _cache.entries(root)
    gone = _cache.to_remove(items, everything=a.all)
    verb = "would remove" if a.dry_run else "removed"
    for e in gone:
        if not a.dry_run:
            _cache.remove(root, e)
        print(f"{verb} {_row(e)}")
    kept = [e for e in items if e not in gone]
    counts: dict[str, int] = {}
    for e in kept:
        counts[e.state] = counts.get(e.state, 0) + 1
    print(f"{'would free' if a.dry_run else 'freed'} {format_bytes(sum(e.size for e in gone))} ({len(gone)} entries) "
          f"in {root}; kept {len(kept)}" + (f": {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}"
                                            if kept else "")
          + ("" if a.all or not any(e.state == "current" for e in kept) else " (--all removes current ones too)"))
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    if a.action == "list":
        if a.all or a.dry_run:
            raise UsageError("--all and --dry-run apply to `offload cache clean`")
        return cmd_list(a)
    return cmd_clean(a)


def add_parser(sub: Any) -> None:
    c = add_command(sub, "cache", "list the cache folder's stores and builds; clean removes what is stale",
                    "List every entry of the cache folder ($OFFLOAD_CACHE, default ~/.cache/offload): cached "
                    "stores (current, or stale when their source folder changed or is gone), partial (interrupted) "
                    "builds, temporary stores of enable() (and whether their process still runs), anything else. "
                    "`clean` removes stale, partial and orphaned entries; never anything in use or outside the cache.")
    c.add_argument("action", nargs="?", choices=("list", "clean"), default="list", help="what to do")
    c.add_argument("--all", action="store_true",
                   help="clean: remove every entry not in use, current stores and random checkpoints included")
    c.add_argument("--dry-run", action="store_true", help="clean: say what would be removed, remove nothing")
    c.set_defaults(fn=cmd_cache)
