"""Soak: thousands of forwards with prefetch on a small model; RSS, open fds and threads at start and end.

    python benchmarks/soak.py --forwards 2000 --json bench-out/soak.json
A unit load is one streamed block read; the default run does 2000 forwards x 8 blocks = 16,000 loads.
The --json file's folder is created up front (a path that cannot be written is refused before the run).
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments, checked before the run: counts >= 1, and the --json file's folder created now."""
    def count(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
        return int(text)

    ap = argparse.ArgumentParser(description="Soak: forwards with prefetch; RSS, fds and threads at start and end.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--forwards", type=count, default=2000, help="forwards to run after the warm-up")
    ap.add_argument("--prefetch", type=count, default=2, help="units read ahead")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON here (its folder is created)")
    ap.error = lambda message: (print(f"soak.py: error: {message}", file=sys.stderr), sys.exit(2))  # type: ignore[method-assign]
    a = ap.parse_args(argv)
    if a.json:
        folder = os.path.dirname(os.path.abspath(a.json))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            ap.error(f"--json {a.json}: cannot create its folder {folder}: {e.strerror}")
        if os.path.isdir(a.json) or not os.access(folder, os.W_OK):
            ap.error(f"--json {a.json}: not a writable file path")
    return a


def main() -> int:
    a = parse_args(sys.argv[1:])
    import transformers as tf

    import offload
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=512, hidden_size=128, n_layer=8, n_head=4)).eval()
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        expected = model(x).logits
    with tempfile.TemporaryDirectory() as d:
        h = offload.enable(model, prefetch=a.prefetch, ram_tier=0, store=os.path.join(d, "s"), progress=False)
        with torch.no_grad():
            for _ in range(50):  # warm-up: allocator and caches settle
                model(x)
        h._prefetcher.wait_idle()
        start, t0 = snapshot(), time.perf_counter()
        loads0 = h.stats().units_loaded
        mismatches = 0
        with torch.no_grad():
            for i in range(a.forwards):
                if not torch.equal(model(x).logits, expected):
                    mismatches += 1
        h._prefetcher.wait_idle()
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
