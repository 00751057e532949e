"""A mixture-of-experts model's memory and load cost under ``cpu_memory``: ``offload.load`` of the folder read in
place, cold, then one prefill of a long prompt (which routes most experts of every layer).

Each measurement runs in a fresh process, so the peak resident memory (``VmHWM``) is its own: load seconds, bytes
the process read (``/proc/self/io``), peak RSS after the load and after the prefill, and the interpreter's own RSS
with torch and Transformers imported (outside ``cpu_memory``). ``--repeats`` alternates nothing: it repeats.

    python benchmarks/bench_moe_memory.py --random olmoe-1b-7b:2 --cpu-memory 700MiB --prompt-tokens 90 --json out.json
    python benchmarks/bench_moe_memory.py --folder /root/bench-work/random/qwen3-30b-a3b-6-bf16 --cpu-memory 4GiB
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time, torch, offload
from offload.cli.benchdisk import evict

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

def io_read():
    return next(int(l.split()[1]) for l in open("/proc/self/io") if l.startswith("read_bytes:"))

folder, budget, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = status("VmHWM")
for f in os.listdir(folder):
    if f.endswith(".safetensors"):
        evict(os.path.join(folder, f))
r0, t0 = io_read(), time.perf_counter()
model, h = offload.load(folder, cpu_memory=budget, progress=False)
out = {"load_s": time.perf_counter() - t0, "load_read_bytes": io_read() - r0, "peak_rss_after_load": status("VmHWM")}
ids = torch.tensor([[(17 * i + 3) % model.config.vocab_size for i in range(n)]])
with torch.no_grad():
    model(ids)
s = h.stats()
out.update(peak_rss_after_prefill=status("VmHWM"), interpreter_rss=base, expert_split_forwards=getattr(s, "expert_split_forwards", None))
h.disable()
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--random", help="NAME:LAYERS, as offload run --random (written once under the cache)")
    where.add_argument("--folder", help="a MoE checkpoint folder")
    p.add_argument("--cpu-memory", default="700MiB")
    p.add_argument("--prompt-tokens", type=int, default=90)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args()
    folder = a.folder
    if a.random:
        import torch
        from offload.cli.models import random_checkpoint
        from offload.config import cache_dir
        folder = random_checkpoint(a.random, torch.bfloat16, os.path.join(cache_dir(), "random", f"{a.random}-bf16"))
    runs = []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, folder, a.cpu_memory, str(a.prompt_tokens)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{folder}, cpu_memory {a.cpu_memory}, prefill of {a.prompt_tokens} tokens, cold load\n")
    print("| load s | read at load GB | peak RSS after load GiB | peak RSS after prefill GiB | interpreter GiB | "
          "split forwards |")
    print("|---|---|---|---|---|---|")
    g = 2 ** 30
    for r in runs:
        print(f"| {r['load_s']:.1f} | {r['load_read_bytes'] / 1e9:.2f} | {r['peak_rss_after_load'] / g:.2f} | "
              f"{r['peak_rss_after_prefill'] / g:.2f} | {r['interpreter_rss'] / g:.2f} | {r['expert_split_forwards'] if r['expert_split_forwards'] is not None else 'n/a'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"folder": folder, "cpu_memory": a.cpu_memory, "prompt_tokens": a.prompt_tokens,
                       "time": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
