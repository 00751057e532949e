"""What offload's hooks cost per unit and forward, with no I/O: every unit in the RAM tier, tiny blocks.

A stack of N 64-wide blocks (4 parameters each) runs plain and with ``offload.enable`` (every unit in
the RAM tier, so each forward is bind + compute + unbind and nothing is read); the difference divided by
N is the per-unit cost of the pre/post hooks, the lease and the bindings. A third stack with an empty
pre-hook and an empty ``always_call`` forward hook per block measures PyTorch's hooked-call path alone
(what any module-hook design pays).

The three stacks run in many short rounds, the order rotated each round, and the figure is the median
over rounds of each round's own difference (offload − plain). On a shared 2-core VM another process
slows all three stacks of a round together: the former estimate (the difference of the medians of 7
runs of 200 forwards) gave 1.1, 25.0 and 8.8 µs/unit for one commit in one session, more than the 10 µs
being measured; paired rounds gave 13.1 to 15.6 for that commit in the same session.

    python benchmarks/bench_hook_overhead.py --units 24 --repeats 40 --json overhead.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch import nn

import offload


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin, self.out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + torch.tanh(self.lin(x))
        return y + 0.5 * self.out(y)


def per_forward(model: nn.Module, x: torch.Tensor, n: int) -> float:
    with torch.no_grad():
        for _ in range(5):
            model(x)
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
        return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=24)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--forwards", type=int, default=50, help="forwards per stack per round")
    ap.add_argument("--repeats", type=int, default=40, help="rounds (each runs the three stacks, order rotated)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain = nn.Sequential(*[Block(a.width) for _ in range(a.units)])
    streamed = nn.Sequential(*[Block(a.width) for _ in range(a.units)])
    streamed.load_state_dict(plain.state_dict())
    hooked = nn.Sequential(*[Block(a.width) for _ in range(a.units)])  # PyTorch's hook path alone, for scale
    hooked.load_state_dict(plain.state_dict())
    for b in hooked:
        b.register_forward_pre_hook(lambda m, args: None)
        b.register_forward_hook(lambda m, args, out: None, always_call=True)
    x = torch.randn(2, a.width)
    models = {"plain": plain, "empty hooks": hooked, "offload": streamed}
    rows: dict[str, list[float]] = {k: [] for k in models}
    with offload.enable(streamed, prefetch=2, store=tempfile.mkdtemp(prefix="overhead-") + "/s", progress=False) as h:
        assert h.stats().ram_tier_units == a.units, "every unit should be in the RAM tier (no I/O)"
        names = list(models)
        for r in range(a.repeats):
            for k in names[r % 3:] + names[:r % 3]:  # rotated: no stack always runs first or after another
                rows[k].append(per_forward(models[k], x, a.forwards))

    def per_unit(k: str) -> float:  # median over rounds of that round's (k - plain), per unit
        return statistics.median(t - p for t, p in zip(rows[k], rows["plain"])) / a.units * 1e6
    plain_s, off_s = statistics.median(rows["plain"]), statistics.median(rows["offload"])
    out = {"units": a.units, "width": a.width, "rounds": a.repeats, "forwards_per_round": a.forwards,
           "plain_us_per_forward": plain_s * 1e6, "offload_us_per_forward": off_s * 1e6,
           "overhead_us_per_unit": per_unit("offload"), "ratio": off_s / plain_s,
           "empty_hooks_us_per_unit": per_unit("empty hooks"),
           "runs": {k: [v * 1e6 for v in vs] for k, vs in rows.items()}}
    print(f"| units | plain µs/forward | offload µs/forward | ratio | overhead µs/unit | of which PyTorch's hook path "
          f"(empty hooks) µs/unit |\n|---|---|---|---|---|---|\n"
          f"| {a.units} | {out['plain_us_per_forward']:.0f} | {out['offload_us_per_forward']:.0f} | "
          f"{out['ratio']:.2f} | {out['overhead_us_per_unit']:.1f} | {out['empty_hooks_us_per_unit']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
