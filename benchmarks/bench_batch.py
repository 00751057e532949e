"""Many sequences per streamed pass: aggregate tokens/s and disk bytes per generated token vs batch size,
and the server with 16 concurrent clients vs 1.

Every block streams (``ram_tier=0``), cold: the store's files are evicted from the page cache before
every pass (untimed; the readers use O_DIRECT anyway). Engine rows: N distinct prompts through
``offload.engine`` with ``batch_size=N``, each exactly ``--new-tokens`` tokens (``ignore_eos``), so every
pass advances N rows; tokens/s counts every generated token over the passes' time (prefill pass
included, and decode passes alone), bytes per token is ``stats().bytes_read`` over the tokens, and the
share of time the forward waited on I/O says where compute starts to dominate (the wait falls towards
0). Server rows: ``offload serve``'s app (uvicorn in a thread, the same engine) and the real ``openai``
client, C concurrent streaming clients: aggregate tokens/s over the wall time, and time to first
token per client (median, max).

    python benchmarks/bench_batch.py --random bloom-1b7 --dtype bf16 --batch-sizes 1,4,16,64 --new-tokens 8 \\
        --json bench-out/batch.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

import offload
from offload.cli.bench import evict
from offload.cli.models import DTYPES, random_checkpoint
from offload.config import cache_dir
from offload.convert import cached_store
from offload.engine import Engine


class ColdEngine(Engine):
    """The engine, with the store's files evicted before every pass (untimed) and each pass timed."""

    def __init__(self, *args: Any, store: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.store, self.pass_seconds = store, []

    def step(self) -> list[Any]:
        evict([self.store])
        t0 = time.perf_counter()
        done = super().step()
        if self.stats()["passes"] > len(self.pass_seconds):
            self.pass_seconds.append(time.perf_counter() - t0)
        return done


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    """n distinct prompts of ``length`` token ids (no tokenizer: a random model has none)."""
    return [[(7919 * i + 104729 * k + 3) % (vocab - 10) + 5 for k in range(length)] for i in range(n)]


def engine_row(model: Any, handle: Any, store: str, n: int, length: int, new_tokens: int, log: Any) -> dict[str, Any]:
    handle._prefetcher.wait_idle()
    handle.reset_stats()
    eng = ColdEngine(model, None, batch_size=n, store=store)
    for ids in prompts(n, length, model.config.vocab_size):
        eng.submit(ids, max_new_tokens=new_tokens, ignore_eos=True)
    out = []
    while eng.busy:
        out += eng.step()
    s = handle.stats()
    tokens = sum(len(r.token_ids) for r in out)
    total = sum(eng.pass_seconds)
    decode = eng.pass_seconds[1:]
    row = {"batch_size": n, "prompt_tokens": length, "new_tokens": new_tokens, "tokens": tokens,
           "passes": len(eng.pass_seconds), "pass_seconds": eng.pass_seconds,
           "tokens_per_s": tokens / total, "decode_tokens_per_s": (tokens - n) / sum(decode) if decode else None,
           "bytes_read": s.bytes_read, "bytes_per_token": s.bytes_read / tokens,
           "io_wait_share": s.wait_seconds / total}
    log(f"  engine batch {n}: {row['tokens_per_s']:.2f} tokens/s ({row['decode_tokens_per_s'] or 0:.2f} decode), "
        f"{row['bytes_per_token'] / 2**20:.1f} MiB/token, waited on I/O {row['io_wait_share']:.0%}")
    return row


def server_rows(model: Any, handle: Any, store: str, clients: list[int], batch_size: int, length: int,
                new_tokens: int, log: Any) -> list[dict[str, Any]]:
    import openai
    import uvicorn

    from offload.cli.run import ByteIds
    from offload.cli.serve import create_app
    vocab = model.config.vocab_size
    engine = ColdEngine(model, ByteIds(vocab), batch_size=batch_size, max_queue=max(clients), store=store).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench", handle=handle), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    rows = []
    try:
        for c in clients:
            # ByteIds (no tokenizer): one token per byte, so each prompt is `length` tokens
            texts = ["".join(chr(97 + (7 * i + 3 * k) % 26) for k in range(length)) for i in range(c)]

            def ask(prompt: str) -> tuple[float, float, int]:
                t0 = time.perf_counter()
                first, n = None, 0
                for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter() - t0
                        n += 1
                return first or float("nan"), time.perf_counter() - t0, n
            before = engine.stats()
            handle.reset_stats()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                got = list(pool.map(ask, texts))
            wall = time.perf_counter() - t0
            after = engine.stats()
            tokens = after["tokens"] - before["tokens"]
            ttft = [g[0] for g in got]
            row = {"clients": c, "batch_size": batch_size, "new_tokens": new_tokens, "tokens": tokens,
                   "passes": after["passes"] - before["passes"], "wall_s": wall, "tokens_per_s": tokens / wall,
                   "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft),
                   "bytes_per_token": handle.stats().bytes_read / max(tokens, 1)}
            rows.append(row)
            log(f"  server {c} clients: {row['tokens_per_s']:.2f} tokens/s, {row['passes']} passes, time to first "
                f"token median {row['ttft_median_s']:.2f} s, max {row['ttft_max_s']:.2f} s")
    finally:
        server.should_exit = True
        thread.join(60)
        engine.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", default="bloom-1b7")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--clients", default="1,16", help="concurrent server clients per row (empty: skip the server)")
    p.add_argument("--server-batch-size", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--json")
    a = p.parse_args()
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        p.error(f"folder of {a.json} does not exist")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dtype = DTYPES[a.dtype]
    folder = random_checkpoint(a.random, dtype, os.path.join(cache_dir(), "random", f"{a.random}-{a.dtype}"))
    store = cached_store(folder, dtype)
    model, handle = offload.load(store, prefetch=2, ram_tier=0, progress=False)
    report: dict[str, Any] = {"model": a.random, "dtype": a.dtype,
                              "eviction": "posix_fadvise(DONTNEED) on the store before every pass; reads are O_DIRECT",
                              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        report["streamed_units"] = handle.stats().streamed_units
        # untimed: the first read of each unit also checks its checksum; the first passes warm the kernels
        warm = ColdEngine(model, None, batch_size=2, store=store)
        warm.submit([5, 6, 7], max_new_tokens=2, ignore_eos=True)
        while warm.busy:
            warm.step()
        log(f"[engine] {a.random} {a.dtype}, every block streamed, cold")
        report["engine"] = [engine_row(model, handle, store, int(n), a.prompt_tokens, a.new_tokens, log)
                            for n in a.batch_sizes.split(",")]
        clients = [int(c) for c in a.clients.split(",") if c]
        if clients:
            log(f"[server] batch {a.server_batch_size}")
            report["server"] = server_rows(model, handle, store, clients, a.server_batch_size, a.prompt_tokens,
                                           a.new_tokens, log)
    finally:
        handle.disable()
        del model
        gc.collect()
    one = report["engine"][0]
    print(f"{a.random} {a.dtype}, every block streamed (cold), prompts of {a.prompt_tokens} tokens, "
          f"{a.new_tokens} new tokens each")
    print("| batch | tokens/s (all passes) | decode tokens/s | vs batch x batch-1 | MiB read / token | passes "
          "| waited on I/O |")
    print("|---|---|---|---|---|---|---|")
    for r in report["engine"]:
        ideal = r["batch_size"] * one["tokens_per_s"]
        print(f"| {r['batch_size']} | {r['tokens_per_s']:.2f} | {r['decode_tokens_per_s'] or float('nan'):.2f} | "
              f"{r['tokens_per_s'] / ideal:.2f} | {r['bytes_per_token'] / 2**20:.1f} | {r['passes']} | "
              f"{r['io_wait_share']:.0%} |")
    if report.get("server"):
        print()
        print(f"| server clients | tokens/s | passes | time to first token median / max (s) |")
        print("|---|---|---|---|")
        for r in report["server"]:
            print(f"| {r['clients']} | {r['tokens_per_s']:.2f} | {r['passes']} | {r['ttft_median_s']:.2f} / "
                  f"{r['ttft_max_s']:.2f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
