"""What checking each unit's CRC32 on its first read costs on the decode path, cold, in one run.

Alternates ``verify=True`` / ``verify=False`` loads of the same store (every block streamed,
``ram_tier=0``), evicting the store's files before every forward (the eviction is not timed), and
reports per mode the median time of the first pass (prefill: every unit read *and checked* once) and
of the steady-state decode steps (already checked: the CRC is skipped), with the ratio verify/off.

    python benchmarks/bench_verify.py --random bloom-1b7 --dtype fp32 --repeats 3 --json bench-out/verify.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

import offload
from offload.cli.bench import evict
from offload.cli.models import DTYPES, random_checkpoint
from offload.config import cache_dir
from offload.convert import cached_store


def one_run(store: str, verify: bool, new_tokens: int) -> dict[str, float]:
    model, handle = offload.load(store, prefetch=2, ram_tier=0, verify=verify, progress=False)
    try:
        ids = torch.tensor([[(17 * i + 3) % model.config.vocab_size for i in range(16)]])
        marks: list[float] = []

        def pre(module, args):
            marks.append(time.perf_counter())
            evict([store])
            marks.append(time.perf_counter())
        hk = model.register_forward_pre_hook(pre)
        t_end = []
        try:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
            t_end.append(time.perf_counter())
        finally:
            hk.remove()
        starts = marks[1::2]  # after each eviction
        ends = marks[2::2] + t_end  # the next forward's arrival (before its eviction), or the end
        steps = [e - s for s, e in zip(starts, ends)]
        s = handle.stats()
        return {"first_pass_s": steps[0], "steady_s_per_token": statistics.median(steps[1:]),
                "verified_units": s.verified_units, "verify_seconds": s.verify_seconds}
    finally:
        handle.disable()
        del model
        gc.collect()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", default="bloom-560m", help="random model of a real architecture (offload run --help)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3, help="alternating verify/off pairs")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--json", help="write the report here")
    a = p.parse_args()
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        p.error(f"folder of {a.json} does not exist")
    dtype = DTYPES[a.dtype]
    folder = random_checkpoint(a.random, dtype, os.path.join(cache_dir(), "random", f"{a.random}-{a.dtype}"))
    store = cached_store(folder, dtype)
    runs: dict[str, list[dict[str, float]]] = {"verify": [], "off": []}
    for k in range(a.repeats):
        for mode in (("verify", "off") if k % 2 == 0 else ("off", "verify")):
            r = one_run(store, mode == "verify", a.new_tokens)
            runs[mode].append(r)
            print(f"  {mode:6s} first pass {r['first_pass_s']:.3f} s, steady {r['steady_s_per_token']:.3f} s/token, "
                  f"crc time {r['verify_seconds']:.3f} s over {r['verified_units']:.0f} units", file=sys.stderr)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    report = {"model": a.random, "dtype": a.dtype, "runs": runs, "median": med,
              "first_pass_ratio": med["verify"]["first_pass_s"] / med["off"]["first_pass_s"],
              "steady_ratio": med["verify"]["steady_s_per_token"] / med["off"]["steady_s_per_token"]}
    print(f"{'mode':8s} {'first pass s':>13s} {'steady s/token':>15s} {'CRC s (readers)':>16s}")
    for m in ("off", "verify"):
        print(f"{m:8s} {med[m]['first_pass_s']:13.3f} {med[m]['steady_s_per_token']:15.3f} {med[m]['verify_seconds']:16.3f}")
    print(f"verify / off: first pass {report['first_pass_ratio']:.3f}, steady state {report['steady_ratio']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
