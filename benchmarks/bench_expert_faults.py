"""Routed expert reads in a fresh process, with and without the page pool's spare pages, alternated.

A read into memory the process has not backed yet faults every page in first, inside the read a forward waits
for. On a VM the host may have to back the guest's page too (memory the guest has not touched lately: ~0.45
GB/s on the 2-core VM, against ~8 GB/s for pages it recycles). The expert cache's tables are such memory until
the cache is full. ``PagePool`` faults spare huge pages in on a thread of its own while experts compute and
moves them under the next reads (``offload/experts/pages.py``); ``_SPARE_PAGES`` off faults them in the reads.

Each run is a fresh process (nothing else in it has freed memory the tables could recycle, unlike a benchmark
that measured the disk first): load the folder in place under ``cpu_memory``, one greedy ``generate``, and
report the decode steps' s/token (the prefill and first step left out) and the routed (demand) expert reads'
rate by the reader's own timing (each layer's batch: first read's start to last read's end), for one-expert
batches and all. Off and on alternate ``--pairs`` times, off first in each pair.

    python benchmarks/bench_expert_faults.py --folder /root/bench-work/random/qwen3-30b-a3b-6-bf16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch, offload
import offload.experts.pages as P, offload.experts.tables as T
P._SPARE_PAGES = sys.argv[4] == "1"
spans, decode = [], [False]
want = T.ExpertsStager.want
def timed_want(self, k, experts):
    rs, rb = self.cache.read_seconds, self.cache.read_bytes
    want(self, k, experts)
    if decode[0] and self.cache.read_bytes > rb:
        spans.append((self.cache.read_bytes - rb, self.cache.read_seconds - rs))
T.ExpertsStager.want = timed_want
model, h = offload.load(sys.argv[1], cpu_memory=sys.argv[2], progress=False)
times = []
class Clock:  # a streamer: put() once per new token (the prompt first)
    t = None
    def put(self, x):
        now = time.perf_counter()
        if self.t is not None:
            times.append(now - self.t)
            decode[0] = True
        self.t = now
    def end(self):
        pass
g = torch.Generator().manual_seed(int(sys.argv[5]))
ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=g)
with torch.no_grad():
    model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False, streamer=Clock())
stager = next(st for st in h._stagers if hasattr(st, "tables"))
expert = max(t.group.expert_bytes for t in stager.tables.values())
one = [b / s for b, s in spans if s > 0 and b <= 2 * expert]
stats = h.stats()
h.disable()
print(json.dumps({"spare": P._SPARE_PAGES, "s_per_token": statistics.median(times[1:]) if len(times) > 1 else None,
                  "batches": len(spans), "read_bytes": sum(b for b, _ in spans),
                  "read_bps": sum(b for b, _ in spans) / sum(s for _, s in spans) if spans else None,
                  "small_batch_bps_median": statistics.median(one) if one else None,
                  "expert_hits": stats.expert_hits, "expert_misses": stats.expert_misses}))
""".replace("import json, sys", "import json, statistics, sys")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True, help="a MoE checkpoint folder (e.g. bench_moe.py's random one)")
    p.add_argument("--cpu-memory", default="4GiB")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--json")
    a = p.parse_args()
    runs = []
    for i in range(a.pairs):
        for spare in ("0", "1"):
            out = subprocess.run([sys.executable, "-c", CHILD, a.folder, a.cpu_memory, str(a.new_tokens), spare,
                                  str(i)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-3000:])
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["pair"] = i
            runs.append(r)
            print(f"pair {i} spare pages {'on ' if r['spare'] else 'off'}: {r['s_per_token']:.3f} s/token, expert reads "
                  f"{r['read_bps'] / 1e9:.2f} GB/s (batches of 1-2 experts: {r['small_batch_bps_median'] / 1e9:.2f}), "
                  f"{r['batches']} batches", flush=True)
    summary = {}
    for spare in (False, True):
        rs = [r for r in runs if r["spare"] == spare]
        summary["on" if spare else "off"] = {k: statistics.median(r[k] for r in rs)
                                             for k in ("s_per_token", "read_bps", "small_batch_bps_median")}
    print("| spare pages | s/token (median of runs) | expert reads GB/s | batches of 1-2 experts GB/s |")
    print("|---|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['s_per_token']:.3f} | {v['read_bps'] / 1e9:.2f} | {v['small_batch_bps_median'] / 1e9:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"folder": a.folder, "cpu_memory": a.cpu_memory, "new_tokens": a.new_tokens, "runs": runs,
                       "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
