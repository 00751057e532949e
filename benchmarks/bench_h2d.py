"""Host→device bandwidth of offload's staging path vs a plain pinned `tensor.to("cuda", non_blocking=True)`.

The staging path copies from a page-aligned anonymous mapping registered with cudaHostRegister into a
preallocated device slot on a dedicated copy stream. Both sides copy the same bytes, alternately,
`--repeats` times; the ratio is the median of the per-pair ratios. Needs CUDA. Copies are timed with
CUDA events (``offload.cli.bench.copy_seconds``, which ``offload bench`` also uses for its PCIe floor).

    python benchmarks/bench_h2d.py --size 1GiB --json bench-out/h2d.json
"""
import argparse
import json
import statistics
import sys

import torch

from offload._memory import parse_bytes
from offload.cli.bench import copy_seconds
from offload.transfer import register_host_buffer
from offload.staging import HostBuffer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N")
    ap.add_argument("--json")
    ap.add_argument("--jsonl", help="append each measured pair to this file as one JSON line, as it is measured")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_h2d: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)  # plain()'s events and copies run on the current device
    n = parse_bytes(a.size)
    host = HostBuffer(n)
    host.tensor.fill_(7)
    register_host_buffer(host)
    slot = torch.empty(n, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(7)

    def staged() -> float:
        return n / copy_seconds(slot, host.tensor[:n], stream=stream) / 1e9

    def plain() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = pinned.to(device, non_blocking=True)
        end.record()
        end.synchronize()
        del out
        return n / (start.elapsed_time(end) / 1000) / 1e9

    staged(), plain()  # warm-up
    pairs = []
    for k in range(a.repeats):
        pairs.append((staged(), plain()))
        if a.jsonl:  # a run stopped by a time limit keeps the pairs it measured
            with open(a.jsonl, "a") as f:
                f.write(json.dumps({"pair": k, "bytes": n, "staged_gbps": pairs[-1][0],
                                    "pinned_to_gbps": pairs[-1][1]}) + "\n")
    ratio = statistics.median(s / p for s, p in pairs)
    report = {"device": torch.cuda.get_device_name(device), "bytes": n, "staged_gbps": [s for s, _ in pairs],
              "pinned_to_gbps": [p for _, p in pairs], "ratio_median": ratio}
    print(f"| path | GB/s (median) |\n|---|---|\n| offload staging (registered mmap → slot, copy stream) | "
          f"{statistics.median(s for s, _ in pairs):.1f} |\n| pinned tensor.to('cuda', non_blocking=True) | "
          f"{statistics.median(p for _, p in pairs):.1f} |\nratio (median of pairs): {ratio:.3f}  [{report['device']}]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
