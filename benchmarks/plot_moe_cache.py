"""Expert-cache hit rate against cache size, per cache policy, by replaying routing traces.

A trace is the routed experts of every experts forward, in order: ``(layer, [distinct experts])``.
``offload.experts.replay`` runs an ``ExpertCache`` of each policy and size over it exactly as the
stager does without prediction (hits, misses, evictions after each forward; a test checks a real run
gives the same counts), so the comparison is fast and deterministic. Traces (all labelled in the
output; none comes from a trained model):

* ``own``: recorded (``--record``) from the Qwen3-30B-A3B-shaped random model (``bench_moe.py
  --random``) run by offload, one token at a time over a seeded random token sequence (teacher-forced,
  so the tokens differ: a random model's greedy decode repeats one token); its routers are random
  weights, so the routing is near uniform;
* ``skewed``: the same with bench_moe's skewed router hook (16 of 128 experts per layer +2.0 logit);
* ``uniform``: synthetic, top-k of E drawn uniformly per token (bench_moe's ``--uniform`` router):
  no policy can beat ``size / all experts`` here;
* ``zipf``: synthetic, a "real-shaped" guess: expert popularity Zipf(s) over a random permutation
  per layer, and each of the previous token's experts kept with probability ``--zipf-repeat``
  (temporal locality between consecutive tokens); the rest drawn by popularity without replacement.

Hit rate counts the steps after ``--warmup`` tokens (the cache's fill is not counted).

    python benchmarks/plot_moe_cache.py --record /root/bench-work/moe-traces.json --tokens 96
    python benchmarks/plot_moe_cache.py --traces /root/bench-work/moe-traces.json \\
        --png benchmarks/moe-cache-hit-rate.png --json bench-out/moe-policies.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

GiB = 1 << 30
SHORT = {"own": "own routers, random weights\n(recorded)", "skewed": "skewed router: synthetic bias\n(recorded)",
         "uniform": "uniform\n(synthetic)", "zipf": "Zipf s=1 + locality\n(synthetic)"}


def synthetic(kind: str, layers: int, experts: int, k: int, tokens: int, seed: int, s: float = 1.0,
              repeat: float = 0.25) -> list[tuple[int, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    trace: list[tuple[int, list[int]]] = []
    if kind == "uniform":
        for _ in range(tokens):
            for layer in range(layers):
                trace.append((layer, sorted(torch.randperm(experts, generator=g)[:k].tolist())))
        return trace
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    perm = [torch.randperm(experts, generator=g) for _ in range(layers)]
    prev: list[list[int]] = [[] for _ in range(layers)]
    for _ in range(tokens):
        for layer in range(layers):
            kept = [e for e in prev[layer] if torch.rand((), generator=g).item() < repeat]
            w = torch.zeros(experts, dtype=torch.float64)
            w[perm[layer]] = ranks ** -s  # expert perm[layer][r] has popularity (r+1)^-s
            w[kept] = 0
            new = torch.multinomial(w, k - len(kept), replacement=False, generator=g).tolist()
            prev[layer] = kept + new
            trace.append((layer, sorted(prev[layer])))
    return trace


def record(a: argparse.Namespace) -> None:
    """Traces of the random Qwen3-30B-A3B-shaped model run by offload (routed experts + cache), one token at a
    time over seeded random tokens, with its own routers and with bench_moe's skewed router hook."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_moe
    import offload
    from offload.cli.models import DTYPES, random_checkpoint
    dtype = DTYPES["bf16"]
    tag = a.random.replace(":", "-")
    folder = random_checkpoint(a.random, dtype, os.path.join(a.workdir, "random", f"{tag}-bf16"))
    os.environ.setdefault("OFFLOAD_CACHE", os.path.join(a.workdir, "cache-moe"))
    out: dict[str, Any] = {"model": a.random, "tokens": a.tokens, "traces": {}}
    for name in ("own", "skewed"):
        model, h = offload.load(folder, prefetch=2, cpu_memory="4GiB", progress=False, predict_experts=False)
        cfg = model.config
        ids = torch.randint(0, cfg.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(0))
        count = bench_moe.Counter(model)
        ctx = bench_moe.skewed(model, 16, 2.0) if name == "skewed" else torch.no_grad()
        with ctx, torch.no_grad():
            import transformers as tf
            cache = tf.DynamicCache(config=cfg)
            for t in range(a.tokens):
                model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        count.close()
        h.disable()
        out["traces"][name] = {"label": f"{name} router, random weights, {a.tokens} random tokens one at a time "
                                        f"(recorded)" if name == "own" else
                               f"skewed router (16 of {cfg.num_experts} +2.0 logit, synthetic bias on random "
                               f"weights), {a.tokens} random tokens (recorded)",
                               "trace": count.trace}
        out.update(layers=len(count.seen), experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                   expert_bytes=3 * cfg.moe_intermediate_size * cfg.hidden_size * dtype.itemsize)
        print(f"recorded {name}: {len(count.trace)} experts forwards", file=sys.stderr)
    with open(a.record, "w") as f:
        json.dump(out, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", help="record traces into this JSON (runs the model) and exit")
    ap.add_argument("--random", default="qwen3-30b-a3b:6")
    ap.add_argument("--tokens", type=int, default=96, help="tokens per recorded trace")
    ap.add_argument("--workdir", default=os.path.expanduser("~/bench-work"))
    ap.add_argument("--traces", help="recorded traces (JSON from --record)")
    ap.add_argument("--synthetic-tokens", type=int, default=512)
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--zipf-repeat", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=16, help="tokens not counted (the cache filling)")
    ap.add_argument("--sizes", default="0.5,1,2,3,4,5", help="cache sizes, GiB")
    ap.add_argument("--png")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.record:
        record(a)
        return
    from offload.experts import POLICIES, replay
    rec = json.load(open(a.traces)) if a.traces else {"traces": {}, "layers": 6, "experts": 128, "top_k": 8,
                                                      "expert_bytes": 9 << 20}
    layers, experts, k, eb = rec["layers"], rec["experts"], rec["top_k"], rec["expert_bytes"]
    traces = {n: (t["label"], [(x[0], x[1]) for x in t["trace"]]) for n, t in rec["traces"].items()}
    n = a.synthetic_tokens
    traces["uniform"] = (f"uniform top-{k} of {experts} per token (synthetic), {n} tokens",
                         synthetic("uniform", layers, experts, k, n, 0))
    traces["zipf"] = (f"Zipf(s={a.zipf_s}) popularity, per-layer permutation, each previous-token expert kept "
                      f"with p={a.zipf_repeat} (synthetic), {n} tokens",
                      synthetic("zipf", layers, experts, k, n, 0, a.zipf_s, a.zipf_repeat))
    sizes = [float(x) for x in a.sizes.split(",")]
    result: dict[str, Any] = {"expert_bytes": eb, "layers": layers, "experts": experts, "top_k": k,
                              "warmup_tokens": a.warmup, "sizes_gib": sizes, "traces": {}}
    for name, (label, trace) in traces.items():
        skip = a.warmup * layers  # forwards of the warm-up tokens (one experts forward per layer per token)
        rates: dict[str, list[float]] = {}
        for policy in POLICIES:
            rates[policy] = []
            for gib in sizes:
                h0, m0, _ = replay(trace[:skip], int(gib * GiB), eb, policy)
                h1, m1, _ = replay(trace, int(gib * GiB), eb, policy)
                rates[policy].append((h1 - h0) / ((h1 - h0) + (m1 - m0)))
        result["traces"][name] = {"label": label, "short": SHORT.get(name, name), "forwards": len(trace),
                                  "hit_rate": rates}
    print(table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.png:
        plot(result, a.png)


def table(r: dict[str, Any]) -> str:
    pols = list(next(iter(r["traces"].values()))["hit_rate"])
    whole = r["layers"] * r["experts"] * r["expert_bytes"] / GiB
    out = []
    for name, t in r["traces"].items():
        out += [f"\n{name}: {t['label']} (hit rate after {r['warmup_tokens']} warm-up tokens; all experts "
                f"{whole:.2f} GiB)", "| cache GiB | " + " | ".join(pols) + " |", "|---" * (len(pols) + 1) + "|"]
        for i, gib in enumerate(r["sizes_gib"]):
            best = max(t["hit_rate"][p][i] for p in pols)
            out.append(f"| {gib:g} | " + " | ".join(
                (f"**{t['hit_rate'][p][i]:.3f}**" if t["hit_rate"][p][i] == best else f"{t['hit_rate'][p][i]:.3f}")
                for p in pols) + " |")
    return "\n".join(out)


def plot(r: dict[str, Any], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(r["traces"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8), sharey=True)
    for ax, name in zip(axes, names):
        t = r["traces"][name]
        for policy, rates in t["hit_rate"].items():
            ax.plot(r["sizes_gib"], rates, marker="o", label=policy)
        ax.set_title(t.get("short", name), fontsize=9)
        ax.set_xlabel("expert cache (GiB)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hit rate (after warm-up)")
    axes[0].legend()
    fig.suptitle("routed experts, Qwen3-30B-A3B shape (6 layers x 128 x 9 MiB): hit rate vs cache size per policy "
                 "(trace replay)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    main()
