"""The ``offload`` command: bench-disk, convert, info, run, bench.

User errors (a bad path, a damaged store, an invalid option) print one line and exit with code 2;
a traceback means a bug.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ._memory import format_bytes, parse_bytes
from .errors import OffloadError


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_bench_disk(a: argparse.Namespace) -> int:
    from . import benchdisk
    path = a.path or os.getcwd()
    parent = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} is not a folder: pass a folder or a file path on the disk to measure")
    return benchdisk.main(path, a.size, a.repeats, a.json, a.block_size, a.depth, a.keep, huge=a.pages == "huge")


def _cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert
    if not os.path.exists(a.src):
        raise UsageError(f"{a.src} does not exist: pass a Hugging Face model folder or an Accelerate offload folder")
    store = convert(a.src, a.dst, dtype=a.dtype, allow_pickle=a.allow_pickle, progress=not a.quiet)
    total = sum(u.data_bytes for u in store.units)
    print(f"wrote {store.path}: {len(store.units)} units, {format_bytes(total)}"
          + (f", resident {format_bytes(store.resident.data_bytes)}" if store.resident else ""))
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from .store import Store
    if not os.path.exists(a.store):
        raise UsageError(f"{a.store} does not exist")
    store = Store.open(a.store)
    src = store.source
    dtypes = sorted({t.dtype for u in store.units for t in u.tensors})
    print(f"store    {store.path}")
    print(f"source   {src.get('kind', '?')} {src.get('path', src.get('class', ''))} (fingerprint {str(src.get('fingerprint', ''))[:12]})")
    print(f"units    {len(store.units)}, {format_bytes(sum(u.data_bytes for u in store.units))}, dtype {','.join(dtypes)}")
    if store.resident:
        print(f"resident {len(store.resident.tensors)} tensors, {format_bytes(store.resident.data_bytes)}")
    if a.verify:
        from .convert import _progress
        units = store.units + ([store.resident] if store.resident else [])
        bar = _progress(sum(u.data_bytes for u in units), "verifying", not a.quiet)
        try:
            for u in units:
                store.verify_unit(u)
                bar.update(u.data_bytes)
        finally:
            bar.close()
        print(f"checksum ok ({len(units)} files)")
    else:
        print("checksum not checked (use --verify)")
    if a.units:
        for u in store.units:
            print(f"  {u.name:40s} {format_bytes(u.data_bytes):>12s}  {len(u.tensors):3d} tensors  {u.file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offload", description="Run models bigger than memory by streaming blocks from disk.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what offload decides (budgets, readers)")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench-disk", help="measure read bandwidth of each reader backend (and fio) on a disk")
    b.add_argument("path", nargs="?", help="folder or file on the disk to measure (default: current folder)")
    b.add_argument("--size", type=_bytes, default=parse_bytes("4GiB"), help="test file size (default 4GiB)")
    b.add_argument("--block-size", type=_bytes, action="append", help="block size to try (repeatable)")
    b.add_argument("--depth", type=int, action="append", help="queue depth to try (repeatable)")
    b.add_argument("--repeats", type=int, default=3, help="alternating fio/backend repeats (default 3)")
    b.add_argument("--json", help="write the full report as JSON to this file")
    b.add_argument("--keep", action="store_true", help="keep the test file it created")
    b.add_argument("--pages", choices=("huge", "4k"), default="huge",
                   help="destination buffer pages: huge (2 MiB, what offload.enable uses) or 4k, to see the difference")
    b.set_defaults(fn=_cmd_bench_disk)

    c = sub.add_parser("convert", help="convert a checkpoint folder into a store of per-unit files")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    c.add_argument("--allow-pickle", action="store_true", help="accept *.bin pickle checkpoints (weights_only=True)")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(fn=_cmd_convert)

    i = sub.add_parser("info", help="describe a store; --verify re-reads every unit and checks its checksum")
    i.add_argument("store")
    i.add_argument("--verify", action="store_true")
    i.add_argument("--units", action="store_true", help="list every unit")
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(fn=_cmd_info)

    from . import run as run_mod
    run_mod.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.fn(args) or 0)
    except (UsageError, OffloadError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"offload {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"offload {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
