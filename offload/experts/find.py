"""Which modules are experts modules (generically, from their shape and their forward's signature), and
what a model's experts weigh per token (for plans made before any weight is read)."""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

from torch import nn

from ..ranges import page_up


def experts_modules(block: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name in the block, module, number of experts)`` of every routed experts module in ``block``:
    a module with ``num_experts``, a forward taking the router's indices right after the hidden states,
    and parameters that all lead with the expert dimension."""
    out = []
    for name, m in block.named_modules():
        e = getattr(m, "num_experts", None)
        params = list(m.named_parameters(recurse=False))
        if not isinstance(e, int) or e < 2 or not params or any(p.dim() < 2 or p.shape[0] != e for _, p in params):
            continue
        try:
            names = list(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError):
            continue
        if len(names) >= 2 and ("index" in names[1] or "indices" in names[1]):
            out.append((name, m, e))
    return out


@dataclasses.dataclass(frozen=True)
class RoutedPlan:
    """A model's experts as a plan sees them, from its meta model (no data): per unit, the bytes of all its
    experts; per token, how many experts of each layer a token routes to."""
    unit_expert_bytes: list[int]  # per unit (store order): the bytes of its experts modules' tensors
    expert_bytes: list[int]  # per unit: the bytes of one expert (0: no experts)
    top_k: int  # experts a token routes to per layer (the config's num_experts_per_tok)
    table_bytes: int = 0  # the largest experts module packed as ``layout.carve`` packs it (a GPU's device table)

    def routed_per_token(self) -> int:
        """Upper bound of the expert bytes one decode token reads with no expert cached."""
        return sum(self.top_k * b for b in self.expert_bytes)

    def cache_budget(self, room: int) -> int:
        """The expert cache's budget in ``room`` bytes: what one forward's reads leave (``reads_per_forward``)."""
        return max(0, room - reads_per_forward(self.top_k, self.expert_bytes))


def reads_per_forward(top_k: int | None, expert_bytes: Sequence[int]) -> int:
    """What one token's experts in the largest layer weigh: the memory kept out of the expert cache's budget
    for a decode step's reads, so that the cache and the reads together stay within what ``cpu_memory``
    leaves (a larger batch of reads makes room first; ``ExpertsStager.want``)."""
    return (top_k or 1) * max(expert_bytes, default=0)


def routed_plan(model: nn.Module, unit_names: Sequence[str]) -> RoutedPlan | None:
    """``RoutedPlan`` of a model built on meta, or None when it has no routed experts."""
    modules = dict(model.named_modules())
    whole, one, table = [], [], 0
    for name in unit_names:
        found = experts_modules(modules[name]) if name in modules else []
        whole.append(sum(p.numel() * p.element_size() for _, m, _ in found for p in m.parameters(recurse=False)))
        one.append(sum(p.numel() * p.element_size() // e for _, m, e in found for p in m.parameters(recurse=False)))
        for _, m, _ in found:  # each tensor on a page of its own, as carve packs the table
            at = 0
            for p in m.parameters(recurse=False):
                at = page_up(at) + p.numel() * p.element_size()
            table = max(table, at)
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if not any(whole) or not isinstance(k, int):
        return None
    return RoutedPlan(whole, one, k, table)
