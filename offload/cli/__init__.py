"""The ``offload`` command: run, tune, convert, info, bench-disk, bench, cache, serve.

User errors (a bad path, a damaged store, an invalid option) print one line and exit with code 2,
before anything is converted, loaded or measured; a traceback means a bug.

Layout: ``run.py`` (offload run and offload tune, a measured short run), ``bench.py`` (offload bench), ``benchdisk.py`` (offload bench-disk),
``cache.py`` (offload cache), ``models.py`` (the random-model zoo), ``options.py`` (argument types,
one-line errors). Each command module imports ``options`` and ``models`` only, never another command.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .._memory import format_bytes
from ..errors import OffloadError
from . import bench, benchdisk, cache, run, serve
from .options import HelpFormatter, Parser, UsageError, add_command, quiet_third_party, require, verbose_parent

__all__ = ["main", "build_parser", "UsageError"]


def _cmd_convert(a: argparse.Namespace) -> int:
    from ..convert import convert
    if not os.path.exists(a.src):
        raise UsageError(f"{a.src} does not exist: pass a Hugging Face model folder or an Accelerate offload folder")
    if a.quantize:
        require("torchao", "quant", f"convert --quantize {a.quantize}")
    store = convert(a.src, a.dst, dtype=a.dtype, allow_pickle=a.allow_pickle, quantize=a.quantize,
                    group_size=a.group_size, progress=not a.quiet)
    total = sum(u.data_bytes for u in store.units)
    dtype = str(store.dtype).removeprefix("torch.") + (f", units {a.quantize}" if a.quantize else "")
    print(f"wrote {store.path}: {len(store.units)} units, {format_bytes(total)}"
          + (f", resident {format_bytes(store.resident.data_bytes)}" if store.resident else "") + f", {dtype}")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from ..store import Store
    if not os.path.exists(a.store):
        raise UsageError(f"{a.store} does not exist")
    store = Store.open(a.store)
    src = store.source
    dtypes = sorted({t.dtype for u in store.units for t in u.tensors})
    print(f"store    {store.path}")
    print(f"source   {src.get('kind', '?')} {src.get('path', src.get('class', ''))} (fingerprint "
          f"{str(src.get('fingerprint', ''))[:12]}, source files recorded: {len(src.get('files') or [])})")
    print(f"units    {len(store.units)}, {format_bytes(sum(u.data_bytes for u in store.units))}, dtype {','.join(dtypes)}"
          f" (holds {str(store.dtype).removeprefix('torch.')}, quantization {src.get('quantization') or 'none'})")
    if store.resident:
        print(f"resident {len(store.resident.tensors)} tensors, {format_bytes(store.resident.data_bytes)}")
    if a.verify:
        from ..writer import _progress
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
    from .. import __version__
    p = Parser(prog="offload", description="Run models bigger than memory by streaming blocks from disk.",
               parents=[verbose_parent()], formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"offload {__version__}")
    p.set_defaults(verbose=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    run.add_parser(sub)
    run.add_tune_parser(sub)

    c = add_command(sub, "convert", "convert a checkpoint folder into a store of per-unit files",
                    "Convert a Hugging Face folder (safetensors shards) or an Accelerate offload folder into a store: "
                    "one file per block, the resident weights, config and tokenizer files, and a manifest recording "
                    "the source files and the dtype. Streaming, resumable, atomic.")
    c.add_argument("src", help="Hugging Face model folder or Accelerate offload folder")
    c.add_argument("dst", help="store folder to create (new or empty; an interrupted conversion into it resumes)")
    c.add_argument("--dtype", choices=sorted(run.DTYPES), help="cast floating-point weights (default: keep the checkpoint's)")
    c.add_argument("--allow-pickle", action="store_true", help="accept *.bin pickle checkpoints (torch.load(weights_only=True))")
    c.add_argument("--quantize", choices=("int8", "int4"),
                   help="store the blocks' linear weights int8 (per output channel) or int4 (group-wise); "
                        "norms, biases, embeddings and head stay as they are (needs torchao)")
    c.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="int4 group size")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_convert)

    i = add_command(sub, "info", "describe a store; --verify re-reads every unit and checks its checksum")
    i.add_argument("store", help="store folder")
    i.add_argument("--verify", action="store_true", help="re-read every unit file and check its checksum")
    i.add_argument("--units", action="store_true", help="list every unit")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    i.set_defaults(fn=_cmd_info)

    benchdisk.add_parser(sub)
    bench.add_parser(sub)
    cache.add_parser(sub)
    serve.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    quiet_third_party()  # before anything imports transformers (which imports torchao)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.fn(args) or 0)
    except (UsageError, OffloadError, OSError, ValueError) as e:
        message = str(e).replace("\n", " ")
        print(f"offload {args.cmd}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"offload {args.cmd}: interrupted", file=sys.stderr)
        return 130
