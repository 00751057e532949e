"""Soak: thousands of forwards with prefetch on a small model; RSS, open fds and threads at start and end.

    python benchmarks/soak.py --forwards 2000 --json bench-out/soak.json
A unit load is one streamed block read; the default run does 2000 forwards x 8 blocks = 16,000 loads.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time

import psutil
import torch


def snapshot():
    gc.collect()
    p = psutil.Process()
    return {"rss_bytes": p.memory_info().rss, "open_fds": p.num_fds(), "threads": threading.active_count()}


def main() -> int:
    import transformers as tf

    import offload
    ap = argparse.ArgumentParser()
    ap.add_argument("--forwards", type=int, default=2000)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=512, hidden_size=128, n_layer=8, n_head=4)).eval()
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        expected = model(x).logits
    with tempfile.TemporaryDirectory() as d:
        h = offload.enable(model, prefetch=a.prefetch, cpu_memory=0, store=os.path.join(d, "s"), progress=False)
        with torch.no_grad():
            for _ in range(50):  # warm-up: allocator and caches settle
                model(x)
        h.prefetcher.wait_idle()
        start, t0 = snapshot(), time.perf_counter()
        loads0 = h.stats().units_loaded
        mismatches = 0
        with torch.no_grad():
            for i in range(a.forwards):
                if not torch.equal(model(x).logits, expected):
                    mismatches += 1
        h.prefetcher.wait_idle()
        end = snapshot()
        loads = h.stats().units_loaded - loads0
        h.disable()
        after = snapshot()
    report = {"forwards": a.forwards, "unit_loads": loads, "seconds": time.perf_counter() - t0, "start": start,
              "end": end, "after_disable": after, "mismatched_outputs": mismatches,
              "rss_growth_fraction": (end["rss_bytes"] - start["rss_bytes"]) / start["rss_bytes"]}
    print(f"{a.forwards} forwards, {loads} unit loads, {report['seconds']:.1f} s, outputs identical: {mismatches == 0}")
    print(f"| | RSS | open fds | threads |\n|---|---|---|---|")
    for k in ("start", "end", "after_disable"):
        r = report[k]
        print(f"| {k} | {r['rss_bytes'] / 2**20:.1f} MiB | {r['open_fds']} | {r['threads']} |")
    print(f"RSS growth start→end: {report['rss_growth_fraction']:+.2%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    ok = mismatches == 0 and report["rss_growth_fraction"] < 0.01 and end["open_fds"] <= start["open_fds"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
