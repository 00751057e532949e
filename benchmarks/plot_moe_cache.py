"""Expert-cache hit rate against cache size, from ``bench_moe.py --runs cached`` JSON files (one per
``--cpu-memory``), as a PNG and a markdown table.

    for m in 2GiB 3GiB 4GiB 6GiB; do python benchmarks/bench_moe.py --random qwen3-30b-a3b:6 --cpu-memory $m \\
        --new-tokens 5 --runs cached --no-skew --uniform --json moe-$m.json; done
    python benchmarks/plot_moe_cache.py moe-*.json --png moe-cache-hit-rate.png
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--png", required=True)
    a = ap.parse_args()
    series: dict[str, list[tuple[float, float, float]]] = {}
    for path in a.files:
        with open(path) as f:
            doc = json.load(f)
        for r in doc["rows"]:
            if r.get("expert_predicted_bytes_per_token"):
                continue  # prediction rows: the cache alone is what this plot is about
            series.setdefault(r["router"], []).append((r["expert_cache_bytes"] / 2**30, r["expert_hit_rate"],
                                                       r["s_per_token_median"]))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    print("| router | experts held (GiB) | hit rate | s/token (median) |\n|---|---|---|---|")
    for router, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=router)
        for gib, hit, s in pts:
            print(f"| {router} | {gib:.2f} | {hit:.2f} | {s:.3f} |")
    ax.set_xlabel("experts held at the end (GiB; the budget bounds it)")
    ax.set_ylabel("hit rate (decode steps)")
    ax.set_ylim(0, 1)
    ax.set_title("routed experts: cache hit rate vs cache size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.png, dpi=100)


if __name__ == "__main__":
    main()
