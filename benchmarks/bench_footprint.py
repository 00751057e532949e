"""How fast the disk fills memory, by how much memory the reads land in (the destination's footprint).

The same reader (offload's default: the native reader, 1 MiB O_DIRECT requests, 16 in flight), the same
file, the same read calls (``--call`` bytes each, at consecutive offsets from a random start), the same
bytes per pass; only the destination differs: a huge-page buffer of ``S`` bytes, the calls cycling
through it. Alternated with fio's best (``offload bench-disk``'s: io_uring, 1 MiB, QD32 or 2 x QD16, into
its 32 MiB hugetlbfs buffer) in every round; medians over rounds, and per round the ratio to fio.

Why it exists: a runtime's reads land in its staging ring and its expert tables, hundreds of MiB to GiB
of distinct memory, while fio cycles through one 32 MiB buffer (shared by its jobs). Where the rate
depends on the destination, "runtime / fio floor" includes a gap no reader can close; this measures it
(README, Tuning). The file is evicted before every pass.

    python benchmarks/bench_footprint.py FILE [--footprints 8MiB,32MiB,128MiB,1GiB] [--rounds 5] --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

from offload._memory import format_bytes, parse_bytes
from offload.cli.benchdisk import evict, hugetlbfs_dir, run_fio
from offload.io import get_reader
from offload.staging import HostBuffer


def one_pass(reader: Any, path: str, buf: HostBuffer, nbytes: int, call: int, rng: random.Random) -> float:
    """GB/s of ``nbytes`` read in ``call``-byte calls into ``buf`` (cycled), from a random aligned start."""
    size = os.path.getsize(path)
    start = rng.randrange(0, (size - nbytes) // 4096 + 1) * 4096
    evict(path)
    h = reader.open(path)
    try:
        t0 = time.perf_counter()
        for i in range(nbytes // call):
            reader.read(h, start + i * call, buf.view((i * call) % buf.nbytes, call))
        return nbytes / (time.perf_counter() - t0) / 1e9
    finally:
        reader.close(h)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a file of at least --bytes on the disk to measure (e.g. a checkpoint shard)")
    p.add_argument("--footprints", default="8MiB,32MiB,128MiB,1GiB")
    p.add_argument("--bytes", default="1GiB", help="read per pass")
    p.add_argument("--call", default="8MiB", help="bytes per read call (at most the smallest footprint)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-fio", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    sizes = [parse_bytes(s) for s in a.footprints.split(",")]
    nbytes, call = parse_bytes(a.bytes), parse_bytes(a.call)
    if call > min(sizes) or call % 4096 or any(s % call for s in sizes):
        p.error("--call must be a multiple of 4 KiB, at most the smallest footprint, and divide every footprint")
    if os.path.getsize(a.file) < nbytes:
        p.error(f"{a.file} is smaller than --bytes {a.bytes}")
    nbytes = nbytes // call * call
    reader = get_reader()
    bufs = {s: HostBuffer(s) for s in sizes}
    for b in bufs.values():
        b.tensor.fill_(1)  # fault every page in now: page faults are not what is measured
    huge = hugetlbfs_dir()
    fio_size = min(os.path.getsize(a.file), 2 << 30) // (1 << 20) * (1 << 20)
    rng = random.Random(0)
    rounds: list[dict[str, Any]] = []
    for r in range(a.rounds):
        row: dict[str, Any] = {}
        for s in sizes:
            row[str(s)] = one_pass(reader, a.file, bufs[s], nbytes, call, rng)
        if not a.no_fio:
            f = run_fio(a.file, fio_size, huge)
            row["fio"] = f.gbps if f is not None else None
        rounds.append(row)
        print(f"round {r + 1}: " + "  ".join(f"{k if k == 'fio' else format_bytes(int(k))} {v:.2f}"
                                              for k, v in row.items() if v is not None), file=sys.stderr, flush=True)
    fio = [r["fio"] for r in rounds if r.get("fio")]
    table = []
    for s in sizes:
        v = [r[str(s)] for r in rounds]
        ratios = [r[str(s)] / r["fio"] for r in rounds if r.get("fio")]
        table.append({"footprint_bytes": s, "huge_pages": bufs[s].huge, "gbps_median": statistics.median(v),
                      "gbps": v, "vs_fio_median": statistics.median(ratios) if ratios else None})
    print(f"\n{format_bytes(nbytes)} per pass in {format_bytes(call)} calls with {reader.name} "
          f"(1 MiB requests, 16 in flight), {a.rounds} rounds alternated; fio: "
          f"{'median %.2f GB/s' % statistics.median(fio) if fio else 'not run'}\n")
    print("| destination footprint | huge pages | GB/s (median) | / fio (median of rounds) | every round |")
    print("|---|---|---|---|---|")
    for t in table:
        vs = f"{t['vs_fio_median']:.2f}" if t["vs_fio_median"] is not None else "-"
        print(f"| {format_bytes(t['footprint_bytes'])} | {'yes' if t['huge_pages'] else 'no'} | "
              f"{t['gbps_median']:.2f} | {vs} | {' '.join(f'{x:.2f}' for x in t['gbps'])} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"file": a.file, "bytes_per_pass": nbytes, "call_bytes": call, "reader": reader.name,
                       "rounds": rounds, "table": table, "fio_gbps": fio}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
