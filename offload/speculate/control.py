"""Choosing K: the cost model, the statistics of a speculative ``generate``, and the controller that measures.

One concept: how many tokens to draft per pass. The controller's hooks time the draft's and the
target's forwards, it counts what the target kept, and after every pass it sets the next K to the
one with the most expected tokens per second under the measured costs (``choose_k``; the formulas
are in the package docstring, ``offload.speculate``).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

INITIAL_K = 4  # drafted tokens per pass before any cost is measured
MAX_K = 16  # the largest K the cost model may choose
MIN_FIT = 4  # target passes (3+ different lengths) before the verify cost gets a per-position slope
WINDOW = 64  # the costs are estimated from the last WINDOW measurements of each kind
PROBE_EVERY = 8  # after this many passes at K = 0, draft once more (costs and acceptance are re-measured)


# --------------------------------------------------------------------------------------------------
# the cost model


def expected_tokens(k: int, a: float) -> float:
    """Expected tokens per target pass with ``k`` drafted tokens of per-token acceptance ``a`` (i.i.d.):
    the accepted prefix plus the target's own next token, ``(1 - a^(k+1)) / (1 - a)``."""
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclasses.dataclass
class Costs:
    """Measured seconds: one draft forward for one token, the draft's fixed cost per pass, and a target
    pass as ``verify_base + verify_per_position * positions``."""
    draft_step: float = 0.0
    draft_overhead: float = 0.0
    verify_base: float = 0.0
    verify_per_position: float = 0.0

    def pass_seconds(self, k: int) -> float:
        draft = (self.draft_overhead + k * self.draft_step) if k > 0 else 0.0
        return draft + self.verify_base + self.verify_per_position * (k + 1)

    def tokens_per_second(self, k: int, a: float) -> float:
        s = self.pass_seconds(k)
        return expected_tokens(k, a) / s if s > 0 else math.inf

    def speedup(self, k: int, a: float) -> float:
        """Tokens per second with ``k`` drafted at acceptance ``a``, over plain decoding (k = 0)."""
        return self.tokens_per_second(k, a) / self.tokens_per_second(0, a)


def choose_k(a: float, costs: Costs, k_max: int = MAX_K, k_min: int = 0) -> int:
    """The K in ``[k_min, k_max]`` with the most expected tokens per second (the smallest on a tie)."""
    best, best_rate = k_min, -1.0
    for k in range(k_min, k_max + 1):
        rate = costs.tokens_per_second(k, a)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best


# --------------------------------------------------------------------------------------------------
# statistics


@dataclasses.dataclass
class SpecStats:
    """What one speculative ``generate`` did."""
    mode: str
    new_tokens: int = 0
    target_passes: int = 0  # target forwards, the prefill included (each pass yields >= 1 token)
    drafted: int = 0  # candidate tokens proposed
    accepted: int = 0  # candidate tokens the target kept
    draft_seconds: float = 0.0  # wall time producing candidates
    target_seconds: float = 0.0  # wall time in target forwards
    total_seconds: float = 0.0
    draft_bytes: int = 0  # the draft's own memory (shared tensors not counted)
    k_fixed: bool = False
    ks: list[int] = dataclasses.field(default_factory=list)  # K asked for, per pass
    costs: Costs = dataclasses.field(default_factory=Costs)
    acceptance_estimate: float = 0.0  # the smoothed per-token acceptance the cost model used last
    bytes_read: int = 0  # from the offload handle, if any

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_time_share(self) -> float:
        return self.draft_seconds / self.total_seconds if self.total_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(tokens_per_pass=self.tokens_per_pass, acceptance_rate=self.acceptance_rate,
                 draft_time_share=self.draft_time_share, tokens_per_second=self.tokens_per_second)
        return d

    def summary(self) -> str:
        """One line for a run summary."""
        k = (f"K={self.ks[-1]} fixed" if self.k_fixed else
             f"K chosen {min(self.ks)}-{max(self.ks)} (last {self.ks[-1]})") if self.ks else "K -"
        return (f"speculate {self.mode}: {self.target_passes} target passes for {self.new_tokens} tokens "
                f"({self.tokens_per_pass:.2f} tokens/pass), drafted {self.drafted}, accepted {self.accepted} "
                f"({self.acceptance_rate:.0%}), draft {self.draft_time_share:.0%} of the time, {k}, "
                f"draft memory {self.draft_bytes / 2**20:.1f} MiB")



# --------------------------------------------------------------------------------------------------
# the controller: measure costs, choose K, count


def _clock(device: torch.device | None) -> float:
    """``perf_counter`` once the device has finished what was queued: on CUDA the forwards only enqueue
    kernels, and K chosen from launch times would be chosen from nothing."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Controller:
    def __init__(self, mode: str, stats: SpecStats, fixed_k: int | None, k_max: int, stop_len: int):
        self.mode, self.stats, self.fixed_k, self.k_max, self.stop_len = mode, stats, fixed_k, k_max, stop_len
        self.k = fixed_k if fixed_k is not None else INITIAL_K
        self.rejections = 0
        self._plain_run = 0  # consecutive passes chosen with K = 0
        self.draft_fw: list[float] = []  # one-step draft forwards (1-2 new positions)
        self.draft_calls: list[tuple[float, int, float]] = []  # (call seconds, drafted, forward seconds)
        self.verify: list[tuple[int, float]] = []  # (positions, seconds), prefill excluded
        self.prefill_seconds: float | None = None
        self._fw_in_call = 0.0
        self._device: torch.device | None = None
        self._t0 = 0.0
        self._d0 = 0.0

    # -- hooks on the target and on the draft
    def target_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        self._positions = int(x.shape[1]) if x is not None else 1
        self._device = getattr(x, "device", None)
        self._t0 = _clock(self._device)

    def target_post(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        dt = _clock(self._device) - self._t0
        self.stats.target_seconds += dt
        self.stats.target_passes += 1
        if self.prefill_seconds is None:
            self.prefill_seconds = dt
        else:
            self.verify.append((self._positions, dt))

    def draft_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        self._dpos = int(x.shape[1]) if x is not None else 1
        self._device = getattr(x, "device", None)
        self._d0 = _clock(self._device)

    def draft_post(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        dt = _clock(self._device) - self._d0
        self._fw_in_call += dt
        if self._dpos <= 2:
            self.draft_fw.append(dt)

    # -- the candidate generator Transformers built
    def attach(self, gen: Any) -> Any:
        get = gen.get_candidates
        update = gen.update_candidate_strategy

        def get_candidates(input_ids: torch.Tensor, *a: Any, **kw: Any) -> Any:
            self.stats.ks.append(self.k)
            if self.k == 0:  # drafting does not pay now: a plain target step
                return input_ids, None
            self._set_k(gen, self.k)
            self._fw_in_call = 0.0
            t0 = _clock(input_ids.device)
            out = get(input_ids, *a, **kw)
            dt = _clock(input_ids.device) - t0
            self.stats.draft_seconds += dt
            n = int(out[0].shape[1] - input_ids.shape[1])
            self.draft_calls.append((dt, n, self._fw_in_call))
            return out

        def update_candidate_strategy(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: int) -> None:
            drafted = int(scores.shape[1]) - 1
            m = int(num_matches)
            self.stats.drafted += drafted
            self.stats.accepted += m
            if m < drafted and int(input_ids.shape[1]) < self.stop_len:  # a real rejection, not the length cut
                self.rejections += 1
            update(input_ids, scores, num_matches)
            self._choose()

        gen.get_candidates = get_candidates
        gen.update_candidate_strategy = update_candidate_strategy
        return gen

    def _set_k(self, gen: Any, k: int) -> None:
        if hasattr(gen, "num_assistant_tokens"):
            gen.num_assistant_tokens = k
        if hasattr(gen, "num_output_tokens"):
            gen.num_output_tokens = k

    def acceptance(self) -> float:
        return (self.stats.accepted + 1) / (self.stats.accepted + self.rejections + 2)

    def costs(self) -> Costs:
        """Medians and a median-slope line (Theil-Sen): a pass slowed by another process, or a first call
        that warms caches up, moves them little (a mean moved by seconds on a busy 2-core machine)."""
        c = Costs()
        fw = self.draft_fw[1:][-WINDOW:] or self.draft_fw  # the very first forward warms up
        if fw:
            c.draft_step = statistics.median(fw)
        calls = (self.draft_calls[1:] or self.draft_calls)[-WINDOW:]  # the first call is the draft's prefill
        if calls:
            c.draft_overhead = max(0.0, statistics.median(t - n * c.draft_step for t, n, _ in calls))
        verify = self.verify[-WINDOW:]
        if verify:
            # A line through two or three noisy points is noise (one run fitted 0 s + 0.36 s/position to a
            # streamed pass): until MIN_FIT passes at 3+ different lengths are seen, the cost is flat in K.
            slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(verify) for x2, y2 in verify[i + 1:]
                      if x2 != x1] if len(verify) >= MIN_FIT and len({x for x, _ in verify}) >= 3 else []
            slope = max(0.0, statistics.median(slopes)) if slopes else 0.0
            c.verify_per_position = slope
            c.verify_base = max(0.0, statistics.median(y - slope * x for x, y in verify))
        elif self.prefill_seconds is not None:
            c.verify_base = self.prefill_seconds  # an upper bound for a step until one is measured
        return c

    def _choose(self) -> None:
        a = self.acceptance()
        self.stats.acceptance_estimate = a
        self.stats.costs = self.costs()
        if self.fixed_k is not None:
            return
        self.k = choose_k(a, self.stats.costs, self.k_max)
        # K = 0 stops the measurements that chose it: every PROBE_EVERY plain passes, draft once more.
        self._plain_run = self._plain_run + 1 if self.k == 0 else 0
        if self._plain_run >= PROBE_EVERY:
            self.k, self._plain_run = choose_k(a, self.stats.costs, self.k_max, k_min=1), 0
