"""Routed experts: read only the experts a mixture-of-experts layer's router picks.

A Transformers 5 experts module holds every expert's weights as 3-D tensors (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I], GPT-OSS's biases [E, ...]) and receives the router's choice
before it computes: ``experts(hidden_states, top_k_index, top_k_weights)``. Its forward only indexes
the experts in ``top_k_index``. So, generically (no per-architecture code):

* the block's unit streams without the experts' tensors (``carve``: the unit's extents recomputed for
  what is left, ``ranges.plan_extents``);
* each experts module gets a *table*: one zero-filled anonymous mapping holding its tensors at full
  shape, of which only the experts read so far are backed by memory. Expert ``e`` of a tensor is the
  slice ``[e]``, one range of the store's unit file or the checkpoint's fused tensor, or the pieces of
  the checkpoint's per-expert tensors (read in place), read straight into the table. A slice of whole
  pages gets a region of its own (``Slab``: the module sees a strided ``[E, ...]`` view), so no page
  is shared with a neighbour and big slices sit on huge pages;
* a forward pre-hook reads the routed experts that are not in the table (all at once, on the
  prefetcher's reader threads, ahead of queued prefetches), then binds the tables; the experts the
  forward does not route to are never read, and it never reads them (their pages stay unbacked);
* ``ExpertCache`` keeps read experts within a byte budget (pages given back with ``MADV_DONTNEED``);
  a policy (``POLICIES``: LRU, LFU, aged LFU with history, LRU-2) says which go first; with a budget
  of 0 a forward's experts are dropped after it.

Each expert is read through the prefetcher as a small unit of its own (``UnitRecord`` with extents),
so its checksum is recorded on the first read and checked on later ones, and its bytes count in
``stats().bytes_read``. Prefill reads each routed expert once per forward whatever the prompt length.
On a GPU the routed experts are then copied from the host tables to one device table (``DeviceTable``)
that the experts modules use in turn. A module this cannot serve (quantized units) streams with its
block, with one log line saying why.

The package: ``find`` (which modules are experts modules; a model's experts per token), ``layout``
(where each expert's bytes are and go), ``cache`` (which stay, by policy), ``tables`` (the tables, the
stager, the hook, the device table on a GPU).
"""
from __future__ import annotations

from .cache import POLICIES, ExpertCache, replay
from .find import RoutedPlan, experts_modules, reads_per_forward, routed_plan
from .layout import ExpertsGroup, Slab, carve
from .tables import DeviceTable, DeviceTier, ExpertBinding, ExpertsHook, ExpertsStager, ExpertsTable

__all__ = ["POLICIES", "ExpertCache", "replay", "RoutedPlan", "experts_modules", "reads_per_forward", "routed_plan", "ExpertsGroup",
           "Slab", "carve", "DeviceTable", "DeviceTier", "ExpertBinding", "ExpertsHook", "ExpertsStager", "ExpertsTable"]
