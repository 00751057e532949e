"""Fewer bytes per token: fp32, bf16, int8 and int4 stores of one model, every block streamed, in one run.

Per variant and batch size: decode time per token streamed cold (``ram_tier=0``, the store's files
evicted before every forward, eviction untimed), the same quantized model with every unit in RAM
(its compute floor, warm), and bytes read per token from ``stats()``; the I/O floor is bytes per token
over this disk's O_DIRECT bandwidth measured in the same run (the runtime's reader on the store's own
unit files at 1..8 in flight, the best: ``offload.measure.measure_disk``). Then quality, teacher-forced on random sequences: max and RMS logits error
vs the fp32 model, next to torchao's own int8 / int4 weight-only quantization of the same weights
(same group size), and top-1 agreement with fp32.

    python benchmarks/bench_quant.py --random bloom-1b7 --batch-sizes 1,8,32 --new-tokens 4 --json bench-out/quant.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
from typing import Any

import torch

import offload
from offload.cli.bench import decode_times
from offload.cli.models import random_checkpoint
from offload.config import cache_dir
from offload.convert import cached_store

# The quantized variants compute in bf16: PyTorch's CPU weight-only kernels are vectorized for bf16
# activations only (fp32 ones take a scalar loop, 3-35x slower than fp32 F.linear: offload/quant.py).
VARIANTS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
            "int4": (torch.bfloat16, "int4")}


def disk_bps(st: offload.store.Store) -> float:
    """The disk's best O_DIRECT rate on this store's own unit files, with the reader the runtime uses at
    1..8 units in flight (``offload.measure.measure_disk``, what prefetch="auto" plans from): the floor is
    then what this reader can do, never less than the runtime itself reached (the python reader with 4
    threads, measured before, read 0.44-1.65 GB/s where the runtime read 2.3)."""
    from offload.io import get_reader
    from offload.measure import measure_disk
    units = [[(st.path_of(u, e.file), e.offset, e.length) for e in u.reads] for u in st.units]
    return max(measure_disk(units, get_reader()).bps.values())


def streamed_rows(name: str, store: str, batch_sizes: list[int], new_tokens: int, prompt: torch.Tensor,
                  log: Any) -> list[dict[str, Any]]:
    rows = []
    st = offload.store.Store.open(store)
    unit_bytes = sum(u.data_bytes for u in st.units)
    for cache in ("cold", "warm"):
        model, h = offload.load(store, ram_tier=0 if cache == "cold" else unit_bytes, progress=False)  # prefetch auto
        try:
            for bs in batch_sizes:
                ids = prompt.repeat(bs, 1)
                h.reset_stats()
                times, tokens = decode_times(model, ids, new_tokens, [store] if cache == "cold" else None)
                s = h.stats()
                bps = disk_bps(st) if cache == "cold" else None
                per_token = s.bytes_read / new_tokens  # generate runs new_tokens forwards, each streams every unit
                row = {"variant": name, "cache": cache, "batch_size": bs, "s_per_token_median": statistics.median(times),
                       "s_per_token_min": min(times), "samples": times, "bytes_per_token": per_token,
                       "unit_bytes": unit_bytes, "disk_bps": bps,
                       "io_floor_s": unit_bytes / bps if bps else None, "tokens": tokens}
                rows.append(row)
                log(f"  {name:5s} {cache} bs={bs}: {row['s_per_token_median'] * 1e3:.0f} ms/token, "
                    f"{per_token / 2**20:.0f} MiB/token" + (f", disk {bps / 1e9:.2f} GB/s" if bps else ""))
        finally:
            h.disable()
            del model
            gc.collect()
    return rows


def quality(folder: str, stores: dict[str, str], group: int, positions: int, log: Any) -> dict[str, Any]:
    """Teacher-forced logits error vs the fp32 model on random sequences: our int8/int4 stores (bf16 compute)
    and torchao's weight-only quantization of the same bf16 weights, blocks' linear layers only."""
    import transformers as tf
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = ref.config.vocab_size
    seq = 64
    ids = torch.randint(0, vocab, (max(1, positions // seq), seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits.float()
    out: dict[str, Any] = {"positions": int(ids.numel())}

    def err(logits: torch.Tensor) -> dict[str, float]:
        d = (logits.float() - want)
        return {"max": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item(),
                "top1_agreement": (logits.argmax(-1) == want.argmax(-1)).float().mean().item()}
    blocks = None
    base = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()  # what the variants quantize
    with torch.no_grad():
        out["bf16 (unquantized)"] = err(base(ids).logits)
    for scheme in ("int8", "int4"):
        model, h = offload.load(stores[scheme], prefetch=2, ram_tier=0, progress=False)
        blocks = [u.name for u in h._store.units]
        with h, torch.no_grad():
            out[f"offload {scheme}"] = err(model(ids).logits)
        del model
        gc.collect()
    # torchao on the same weights, blocks' linear layers only (what the store quantizes)
    assert blocks is not None
    in_blocks = lambda m, fqn: isinstance(m, torch.nn.Linear) and any(fqn.startswith(b + ".") for b in blocks)  # noqa: E731
    q8 = copy.deepcopy(base)
    quantize_(q8, Int8WeightOnlyConfig(), filter_fn=in_blocks)
    with torch.no_grad():
        out["torchao int8"] = err(q8(ids).logits)
    del q8
    try:
        from offload.quant import QuantizedWeight, is_quantizable
        q4 = copy.deepcopy(base)
        try:  # torchao's CPU int4 weight-only (Int4OpaqueTensor; the bf16 tinygemm CPU kernel)
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
            quantize_(q4, PrototypeInt4WeightOnlyConfig(group_size=group), filter_fn=in_blocks)
            label = "torchao int4"
        except Exception as e:  # noqa: BLE001 - torchao's CPU int4 config names move between releases
            log(f"  torchao int4 config unavailable here ({type(e).__name__}: {e}); using offload.quant's torchao primitives")
            for name, mod in q4.named_modules():
                if in_blocks(mod, name) and is_quantizable(name, "weight", mod.weight, mod, scheme="int4", group_size=group):
                    mod._parameters["weight"] = QuantizedWeight.from_float(mod.weight.detach(), "int4", group)
            label = "torchao int4 (primitives)"
        with torch.no_grad():
            out[label] = err(q4(ids).logits)
    finally:
        gc.collect()
    for k, v in out.items():
        if isinstance(v, dict):
            log(f"  {k:26s} max {v['max']:.4f}  rms {v['rms']:.5f}  top-1 agreement {v['top1_agreement']:.4f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", default="bloom-560m")
    p.add_argument("--variants", default="fp32,bf16,int8,int4")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--positions", type=int, default=512, help="teacher-forced positions for the quality check (0: skip)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        p.error(f"folder of {a.json} does not exist")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    variants = a.variants.split(",")
    folder = random_checkpoint(a.random, torch.float32, os.path.join(cache_dir(), "random", f"{a.random}-fp32"))
    stores = {v: cached_store(folder, VARIANTS[v][0], quantize=VARIANTS[v][1], group_size=a.group_size)
              for v in set(variants) | ({"int8", "int4"} if a.positions else set())}
    prompt = torch.tensor([[(17 * i + 3) % 1000 for i in range(16)]])
    rows: list[dict[str, Any]] = []
    for v in variants:
        log(f"[{v}]")
        rows += streamed_rows(v, stores[v], batch_sizes, a.new_tokens, prompt, log)
    report: dict[str, Any] = {"model": a.random, "group_size": a.group_size, "rows": rows}
    if a.positions:
        log("[quality]")
        report["quality"] = quality(folder, stores, a.group_size, a.positions, log)
    base = {(r["cache"], r["batch_size"]): r for r in rows if r["variant"] == "fp32"}
    bf16 = {(r["cache"], r["batch_size"]): r for r in rows if r["variant"] == "bf16"}
    floor = {(r["variant"], r["batch_size"]): r for r in rows if r["cache"] == "warm"}
    print("| variant | bs | cold ms/token | in-RAM ms/token (compute floor) | I/O floor ms | cold / max(floors) "
          "| fp32 cold / this | bf16 cold / this | MiB read/token | bytes vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["cache"] != "cold":
            continue
        key = (r["cache"], r["batch_size"])
        warm = floor.get((r["variant"], r["batch_size"]))
        ideal = max(warm["s_per_token_median"] if warm else 0, r["io_floor_s"] or 0)
        b, f = base.get(key), bf16.get(key)
        print(f"| {r['variant']} | {r['batch_size']} | {r['s_per_token_median'] * 1e3:.0f} | "
              f"{warm['s_per_token_median'] * 1e3 if warm else float('nan'):.0f} | {(r['io_floor_s'] or 0) * 1e3:.0f} | "
              f"{r['s_per_token_median'] / ideal if ideal else float('nan'):.2f} | "
              f"{b['s_per_token_median'] / r['s_per_token_median'] if b else float('nan'):.2f} | "
              f"{f['s_per_token_median'] / r['s_per_token_median'] if f else float('nan'):.2f} | "
              f"{r['bytes_per_token'] / 2**20:.0f} | {r['unit_bytes'] / b['unit_bytes'] if b else float('nan'):.3f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
