"""Speculative decoding with a resident self-draft vs plain streamed decoding, every block streamed, cold.

One run: build (once, cached) a random-weight checkpoint of a real architecture and its store, load it
with every block streamed (``ram_tier=0``), then

1. plain greedy decoding of ``--max-new-tokens`` tokens (store files evicted first);
2. the draft (``--draft int4`` by default: the target quantized, in RAM, sharing embeddings/norms/head),
   built from the store, its bytes checked against ``draft_bytes()`` computed before building it;
3. the same generation with speculation (files evicted again): tokens must be identical;
4. teacher-forced top-1 agreement of draft and target on random token sequences: random-weight models
   repeat one token, which makes any drafting look perfect, so this is the acceptance a real text would
   see; and the speed-up that agreement predicts under the measured costs (``speculate.Costs``).

The store's files are read with O_DIRECT (no page cache); they are also evicted with
posix_fadvise(DONTNEED) before each run. Tokens per second are end to end (prefill included) for both
runs, so they are comparable: a speculative pass's prefill also drafts.

    python benchmarks/bench_speculate.py                           # quick: bloom-560m fp32, 32 tokens
    python benchmarks/bench_speculate.py --model bloom-1b7 --dtype fp32 --max-new-tokens 48 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import torch


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _pass_timer(model: torch.nn.Module) -> tuple[list[float], Any]:
    """Wall seconds of each top-level forward of ``model`` (one streamed pass each)."""
    times: list[float] = []
    t0 = [0.0]

    def pre(module: Any, args: Any) -> None:
        t0[0] = time.perf_counter()

    def post(module: Any, args: Any, out: Any) -> None:
        times.append(time.perf_counter() - t0[0])

    hs = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    return times, hs


def run(a: argparse.Namespace) -> dict[str, Any]:
    import transformers as tf

    import offload
    from offload import speculate as S
    from offload.cli.bench import evict
    from offload.cli.models import DTYPES, random_checkpoint
    from offload.convert import cached_store
    from offload.config import cache_dir

    tf.logging.set_verbosity_error()
    dtype = DTYPES[a.dtype]
    folder = os.path.join(cache_dir(), "random", f"{a.model}-{a.dtype}")
    t = time.perf_counter()
    random_checkpoint(a.model, dtype, folder, progress=not a.quiet)
    store = cached_store(folder, dtype, progress=not a.quiet, note=_log)
    _log(f"checkpoint and store ready in {time.perf_counter() - t:.1f} s: {store}")
    # before anything is built: what the plan and the budget count
    predicted = S.draft_bytes(store, a.draft, quantize_head=a.quantize_head)
    load_before = os.getloadavg()

    model, handle = offload.load(store, a.prefetch, ram_tier=0, reader=a.reader, progress=not a.quiet)
    try:
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(a.seed)
        ids = torch.randint(0, vocab, (1, a.prompt_len), generator=g)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                  min_new_tokens=a.max_new_tokens, do_sample=False)
        with torch.no_grad():  # first reads of each unit check its CRC32; kernels warm up: not timed
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        stats0 = handle.stats()

        # 1. plain streamed decoding, cold
        evict([store])
        handle.reset_stats()
        passes, hooks = _pass_timer(model)
        t = time.perf_counter()
        with torch.no_grad():
            ref = model.generate(ids, **kw)
        plain_s = time.perf_counter() - t
        for h in hooks:
            h.remove()
        plain_read = handle.stats().bytes_read
        n = int(ref.shape[1] - ids.shape[1])
        _log(f"plain: {n} tokens in {plain_s:.1f} s ({n / plain_s:.3f} tokens/s), "
             f"median pass {statistics.median(passes[1:] or passes):.3f} s")

        # 2. the draft
        spec = S.Speculator(model, a.draft, handle=handle, draft_tokens=a.draft_tokens,
                            max_draft_tokens=a.max_draft_tokens, quantize_head=a.quantize_head)
        _log(f"draft {a.draft}: built in {spec.build_seconds:.1f} s, {spec.draft_bytes / 2**20:.1f} MiB "
             f"(predicted {predicted / 2**20:.1f} MiB)")
        if spec.draft is not None:  # warmed up like the target was (first kernel calls, first pages): not timed
            with torch.no_grad():
                spec.draft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)

        # 3. speculative decoding, cold
        evict([store])
        handle.reset_stats()
        out, st = spec.generate(ids, **{k: v for k, v in kw.items() if k != "do_sample"})
        same = torch.equal(out, ref)
        _log(f"speculative: {st.summary()}; {st.tokens_per_second:.3f} tokens/s; tokens identical: {same}")

        # 4. teacher-forced agreement on random sequences
        seqs = [torch.randint(0, vocab, (1, a.agreement_len), generator=g) for _ in range(a.agreement_seqs)]
        t = time.perf_counter()
        agree = spec.agreement(seqs) if spec.draft is not None else None
        agree_s = time.perf_counter() - t
        costs = st.costs
        forecast: dict[str, Any] = {}
        for key in ("top1", "top1_input_masked") if agree is not None else ():
            k = S.choose_k(agree[key], costs, a.max_draft_tokens)
            forecast[key] = {"acceptance": agree[key], "k": k, "speedup": costs.speedup(k, agree[key])}
        model_speedup = costs.speedup(st.ks[-1] if st.ks else 0, st.acceptance_estimate)
    finally:
        handle.disable()

    plain_tps = n / plain_s
    spec_tps = st.tokens_per_second
    return {
        "model": a.model, "dtype": a.dtype, "draft": a.draft, "quantize_head": a.quantize_head,
        "prefetch": a.prefetch, "ram_tier": 0,
        "prompt_len": a.prompt_len, "max_new_tokens": a.max_new_tokens, "seed": a.seed,
        "tokens_identical": same,
        "plain": {"seconds": plain_s, "tokens": n, "tokens_per_second": plain_tps, "passes": len(passes),
                  "pass_seconds": passes, "bytes_read": plain_read},
        "speculative": {**st.as_dict(), "build_seconds": spec.build_seconds},
        "speedup": spec_tps / plain_tps,
        "draft_bytes": spec.draft_bytes, "draft_bytes_predicted": predicted,
        "store_unit_bytes": sum(r.data_bytes for r in handle._store.units),
        "agreement": {"sequences": a.agreement_seqs, "length": a.agreement_len, **(agree or {}),
                      "seconds": agree_s, "predicted": forecast},
        "model_speedup_at_measured_acceptance": model_speedup,
        "warmup_bytes_read": stats0.bytes_read,
        "load_average_before_after": [load_before, os.getloadavg()],  # other processes on the same CPUs
        "eviction": "store files read with O_DIRECT; posix_fadvise(DONTNEED) on every store file before each run",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": {"torch": torch.__version__, "transformers": tf.__version__},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def table(r: dict[str, Any]) -> str:
    p, s, ag = r["plain"], r["speculative"], r["agreement"]
    gb = 1e9
    rows = [
        ("run", "tokens/s", "passes", "tokens/pass", "GB read/token", "accept", "draft share"),
        ("plain streamed", f"{p['tokens_per_second']:.3f}", str(p["passes"]), "1.00",
         f"{p['bytes_read'] / gb / p['tokens']:.2f}", "-", "-"),
        (f"speculative {r['draft']}", f"{s['tokens_per_second']:.3f}", str(s["target_passes"]),
         f"{s['tokens_per_pass']:.2f}", f"{s['bytes_read'] / gb / max(s['new_tokens'], 1):.2f}",
         f"{s['acceptance_rate']:.0%}", f"{s['draft_time_share']:.0%}"),
    ]
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    c = s["costs"]
    lines += [
        f"{r['model']} {r['dtype']}, every block streamed (ram_tier=0), prefetch {r['prefetch']}, cold; "
        f"{r['max_new_tokens']} tokens after a {r['prompt_len']}-token random prompt",
        f"speed-up {r['speedup']:.2f}x, tokens identical: {r['tokens_identical']}; K per pass {s['ks']}",
        f"draft {r['draft']}{' (own quantized head)' if r['quantize_head'] else ''}: "
        f"{r['draft_bytes'] / 2**20:.1f} MiB in RAM (predicted before building: "
        f"{r['draft_bytes_predicted'] / 2**20:.1f} MiB; streamed units {r['store_unit_bytes'] / 2**20:.0f} MiB), "
        f"built in {s['build_seconds']:.1f} s",
        f"measured costs: draft step {c['draft_step'] * 1e3:.1f} ms + {c['draft_overhead'] * 1e3:.1f} ms/pass, "
        f"target pass {c['verify_base']:.3f} s + {c['verify_per_position'] * 1e3:.1f} ms/position",
    ]
    la = r["load_average_before_after"]
    lines.append(f"load average (1 min) before/after: {la[0][0]:.1f}/{la[1][0]:.1f} on {r['machine']['cpus']} CPUs")
    if ag["predicted"]:
        p1, pm = ag["predicted"]["top1"], ag["predicted"]["top1_input_masked"]
        lines += [
            f"teacher-forced agreement of draft and target on {ag['sequences']} random sequences of {ag['length']} "
            f"tokens: top-1 {ag['top1']:.1%} (the target's top-1 is the input token itself at "
            f"{ag['target_copies_input']:.0%} of positions), top-1 with the input token masked "
            f"{ag['top1_input_masked']:.1%}",
            f"predicted speed-up under the measured costs: {p1['speedup']:.2f}x at top-1 agreement (K {p1['k']}), "
            f"{pm['speedup']:.2f}x at the masked agreement (K {pm['k']}); the cost model at the acceptance measured "
            f"while generating: {r['model_speedup_at_measured_acceptance']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from offload.cli.models import DTYPES, RANDOM_MODELS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bloom-560m", choices=[m for m in RANDOM_MODELS if m != "t0pp"],
                    help="random-weight model of the zoo (offload/cli/models.py); default bloom-560m")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--draft", default="int4", help="int4, int8, ngram or a draft model folder")
    ap.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="fixed K (default: from measured costs)")
    ap.add_argument("--max-draft-tokens", type=int, default=16, metavar="K")
    ap.add_argument("--quantize-head", action="store_true",
                    help="int8/int4: the draft gets its own quantized head instead of sharing the target's")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--reader", default=None)
    ap.add_argument("--agreement-seqs", type=int, default=4)
    ap.add_argument("--agreement-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    report = run(a)
    print(table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["tokens_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
