"""How often speculative decoding's tokens differ from plain greedy decoding, per dtype (issue 17, item 11).

A verify pass scores K+1 positions in one forward: other matrix shapes than a one-position step, so in
bf16/fp16 its logits differ in the last bits and a near-tie can pick the other token. The guarantee is
then the tokens of the verify pass (as with Transformers' assisted generation), not plain greedy's.
This measures how often that happens: for each model, dtype and draft, ``--prompts`` random prompts,
plain greedy vs ``offload.speculate`` (the same model, in memory: offload streams exact bytes, so the
numerics are the model's), and reports the share of prompts whose output differs, the first divergence
index (in generated tokens) and the plain run's top-2 logit margin at that position.

    python benchmarks/bench_spec_divergence.py                                   # tiny Llama, bf16 + fp32
    python benchmarks/bench_spec_divergence.py --models tiny-llama,bloom-560m --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def build(name: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A random-weight model: ``tiny-llama`` (init 0.5: varied tokens, drafts get rejected) or one of the
    CLI's ``--random`` shapes (``bloom-560m``...)."""
    import transformers as tf
    torch.manual_seed(seed)
    if name == "tiny-llama":
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.5)
    else:
        from offload.cli.models import config_for
        cfg = config_for(name)
        cfg.initializer_range = 0.1  # 0.02 repeats one token whatever the prompt: nothing to diverge
    return tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def plain(model: Any, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ids and, per generated position, the top-2 logit margin (how near a tie it was)."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack([s[0].float().topk(2).values for s in out.scores])
    return out.sequences[0, ids.shape[1]:], top2[:, 0] - top2[:, 1]


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    import transformers as tf

    from offload.speculate import Speculator
    tf.logging.set_verbosity_error()
    rows = []
    for name in a.models.split(","):
        for dt in a.dtypes.split(","):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
            model = build(name, dtype)
            vocab = model.config.vocab_size
            for mode in a.modes.split(","):
                spec = Speculator(model, mode, draft_tokens=a.draft_tokens)
                diverged: list[dict[str, Any]] = []
                margins: list[float] = []
                t0 = time.perf_counter()
                for p in range(a.prompts):
                    g = torch.Generator().manual_seed(1000 + p)
                    ids = torch.randint(2, vocab, (1, a.prompt_length), generator=g)
                    ref, margin = plain(model, ids, a.new_tokens)
                    margins.append(float(margin.min()))
                    out, _ = spec.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
                    got = out[0, ids.shape[1]:]
                    diff = (got[:ref.numel()] != ref[:got.numel()]).nonzero()
                    if diff.numel():
                        i = int(diff[0])
                        diverged.append({"prompt": p, "first": i, "margin": float(margin[i])})
                row = {"model": name, "dtype": dt, "draft": mode, "prompts": a.prompts, "new_tokens": a.new_tokens,
                       "draft_tokens": a.draft_tokens, "differ": len(diverged), "share": len(diverged) / a.prompts,
                       "first_divergence": [d["first"] for d in diverged],
                       "margin_at_divergence": [d["margin"] for d in diverged],
                       "median_min_margin": statistics.median(margins), "seconds": time.perf_counter() - t0}
                rows.append(row)
                _log(f"{name} {dt} {mode}: {row['differ']}/{a.prompts} prompts differ; first divergence at "
                     f"{row['first_divergence'] or '-'} ({row['seconds']:.0f} s)")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | dtype | draft | prompts differing | first divergence (token index) | top-2 margin there |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        firsts = r["first_divergence"]
        where = (f"median {statistics.median(firsts):g}, min {min(firsts)}" if firsts else "-")
        margin = f"{max(r['margin_at_divergence']):.3g} at most" if firsts else "-"
        out.append(f"| {r['model']} | {r['dtype']} | {r['draft']} | {r['differ']}/{r['prompts']} "
                   f"({r['share']:.0%}) | {where} | {margin} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-llama", help="tiny-llama and/or --random names (bloom-560m...)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--modes", default="ngram,int8", help="drafts: ngram, int8, int4")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--draft-tokens", type=int, default=4, help="K, fixed so that every pass verifies K+1 positions")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(a)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
