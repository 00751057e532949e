"""Issue 20: a mixture-of-experts block reads only the experts its router picks.

Exactness is against the model in memory (``from_pretrained`` of the same folder, or the module
itself); the routing is counted by a hook of the test's own on the experts modules.
"""
from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

import offload
from conftest import moe_config
from offload.experts import experts_modules
from offload.staging import HUGE_PAGE

IDS = torch.tensor([[3, 17, 42, 9, 120, 77, 5, 61]])


ARCHS = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"] + (["gpt_oss"] if hasattr(tf, "GptOssConfig") else [])


def make(arch: str, folder=None, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(moe_config(arch, layers=6, hidden=128)).eval()
    if folder is None:
        return model
    model.save_pretrained(folder)
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def count_routing(model) -> tuple[list, list]:
    """Per experts forward: (its module, the distinct experts routed); the hook is the test's own."""
    seen: list = []
    handles = []
    for m in model.modules():
        if any(name == "" for name, _, _ in experts_modules(m)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: seen.append((mod, sorted({int(x) for x in args[1].flatten().tolist()
                                                            if 0 <= int(x) < mod.num_experts})))))
    return seen, handles


def decode_step(model, h=None) -> tuple[list, torch.Tensor]:
    """The prompt, then one decode step with the routing counted (and the handle's stats reset between)."""
    cache = tf.DynamicCache(config=model.config)
    nxt = model(IDS, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    if h is not None:
        h._prefetcher.wait_idle()
        h.reset_stats()
    seen, hooks = count_routing(model)
    logits = model(nxt, past_key_values=cache, use_cache=True).logits
    if h is not None:
        h._prefetcher.wait_idle()
    for x in hooks:
        x.remove()
    return seen, logits


def expert_bytes(module) -> int:
    return sum(p.numel() * p.element_size() // module.num_experts for p in module.parameters(recurse=False))


def dense_bytes(model) -> int:
    """Bytes of the blocks without their routed experts' tensors."""
    blocks = model.model.layers
    experts = {id(p) for b in blocks for _, m, _ in experts_modules(b) for p in m.parameters(recurse=False)}
    return sum(p.numel() * p.element_size() for b in blocks for p in b.parameters() if id(p) not in experts)


@pytest.mark.parametrize("arch", ARCHS)
def test_routed_experts_from_a_folder_are_exact_and_read_only_what_is_routed(arch, tmp_path, no_thread_leak):
    ref = make(arch, tmp_path / arch)
    model, h = offload.load(tmp_path / arch, prefetch=1, ram_tier=0, progress=False, predict_experts=False)
    try:
        assert h._experts is not None, "the experts modules were not found"
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            assert torch.equal(model.generate(IDS, max_new_tokens=6, do_sample=False),
                               ref.generate(IDS, max_new_tokens=6, do_sample=False))
            seen, _ = decode_step(model, h)  # every block streamed, no expert cached
        routed = sum(len(experts) * expert_bytes(m) for m, experts in seen)
        stats = h.stats()
        assert seen and stats.expert_bytes_read == routed  # exactly the routed experts, each once
        assert stats.bytes_read <= 1.2 * (dense_bytes(model) + routed), (stats.bytes_read, dense_bytes(model), routed)
    finally:
        h.disable()


def test_in_memory_enable_is_exact_and_the_cache_serves_repeats(tmp_path, no_thread_leak):
    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, cpu_memory="64MiB", store=tmp_path / "s", progress=False) as h:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            first = h.stats()
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
        again = h.stats()
        assert first.expert_misses > 0 and again.expert_misses == first.expert_misses  # all from the cache
        # a store's expert tensors are one range each: every expert is read as whole pages (O_DIRECT)
        tables = next(st for st in h._stagers if hasattr(st, "tables")).tables.values()
        reads = [x for t in tables for rec in t.group.experts for x in rec.extents]
        assert reads and all(x.offset % 4096 == 0 and x.into % 4096 == 0 for x in reads)
        assert again.expert_hits > first.expert_hits and again.expert_cache_bytes > 0
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), f"{name} changed after disable()"


def test_prefill_reads_each_routed_expert_once(tmp_path, no_thread_leak):
    model = make("olmoe")
    ids = torch.randint(0, 256, (2, 40))
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        seen, hooks = count_routing(model)
        with torch.no_grad():
            model(ids)
        h._prefetcher.wait_idle()
        assert h.stats().expert_misses == sum(len(e) for _, e in seen)


def test_whole_blocks_when_asked_or_when_routed_reads_cannot_serve(tmp_path, caplog, no_thread_leak):
    model = make("mixtral")
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False,
                        routed_experts=False) as h:
        assert h._experts is None
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    pytest.importorskip("torchao")
    with caplog.at_level(logging.INFO, logger="offload"):
        with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "q", progress=False, quantize="int8") as h:
            assert h._experts is None
    assert any("reading whole blocks" in r.message for r in caplog.records)


def test_predicted_experts_are_either_used_or_counted_as_wasted(tmp_path, no_thread_leak):
    """With prediction on, every expert read is one the step routed to or a prediction
    that missed, and the predictions that hit are served without a demand read; outputs stay exact."""
    ref = make("qwen3_moe", tmp_path / "q")
    model, h = offload.load(tmp_path / "q", prefetch=1, ram_tier=0, progress=False, predict_experts=True)
    try:
        with torch.no_grad():
            seen, got = decode_step(model, h)
            assert torch.equal(got, decode_step(ref)[1])
        s = h.stats()
        routed = sum(len(experts) * expert_bytes(m) for m, experts in seen)
        wasted = s.expert_predicted_bytes - s.expert_predicted_used_bytes
        assert s.expert_predicted_bytes > 0 and s.expert_predicted_used_bytes > 0
        assert s.expert_bytes_read == routed + wasted
    finally:
        h.disable()


def test_a_dispatched_moe_model_reads_routed_experts_where_accelerate_put_them(tmp_path, no_thread_leak):
    """from_pretrained(device_map=blocks on "disk", offload_folder=...) then enable(): exact, experts read on
    routing, from the files Accelerate's index names (no copy)."""
    from conftest import block_device_map
    ref = make("qwen3_moe", tmp_path / "q")
    disk = [f"model.layers.{i}" for i in range(len(ref.model.layers))]
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=block_device_map(ref, disk),
                                                    offload_folder=str(tmp_path / "off")).eval()
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        assert h._experts is not None and all(u.extents for u in h._store.units)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False),
                               ref.generate(IDS, max_new_tokens=4, do_sample=False))
        assert h.stats().expert_misses > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_offload_run_folder_prints_the_greedy_tokens_of_the_model_in_memory(arch, tmp_path, capsys):
    """``offload run FOLDER`` on a mixture of experts: routed experts, read in place, the same greedy ids."""
    from offload.cli import main
    ref = make(arch, tmp_path / arch)
    assert main(["run", str(tmp_path / arch), "--prompt", "hello", "--max-new-tokens", "6", "-q"]) == 0
    out = capsys.readouterr().out
    ids = torch.tensor([list(b"hello")])
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    printed = next(line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()
                   and len(line.split()) == 6)
    assert [int(x) for x in printed.split()] == want


# Eviction order of each cache policy on tiny hand-written traces (one group, experts of 1 byte, a budget
# of 2, evicting after each forward as done() does): each expected list was worked out by hand from the
# policy's rule, and B alone tells the four apart, so a policy that ranks by the wrong rule (or keeps or
# forgets history it should not) fails.
A = [[1], [1], [2], [3], [2], [3]]  # 1 used twice early; then 2 and 3 alternate
B = [[1], [1], [1], [2], [2], [3], [3]]  # 1 used often long ago, 2 twice, then 3 twice
EVICTED = {
    "lru": ([1], [1]),  # A: at [3] the least recent is 1; then 2 and 3 hit. B: at [3] 1 (last use t3)
    "lfu": ([2, 3, 2], [3, 3]),  # in-cache counts, reset on eviction: 1 (count 2-3) outlives every newcomer
    "lfu-aged": ([2, 3, 1], [3, 2]),  # history kept: B's 3 comes back with score 2 = 2's, and 2 is older
    "lru2": ([2, 3, 1], [3, 1]),  # B: at the second [3] 1's second-to-last use (t2) is the oldest
}


@pytest.mark.parametrize("policy", sorted(EVICTED))
def test_cache_policy_evicts_in_its_order(policy):
    from offload.experts import POLICIES, ExpertCache, replay
    assert set(POLICIES) == set(EVICTED)
    for trace, want in zip((A, B), EVICTED[policy]):
        hits, misses, evicted = replay([(0, t) for t in trace], 2, 1, policy)
        assert [e for _, e in evicted] == want, (policy, trace)
        assert hits + misses == len(trace) and misses == 2 + len(want)  # each miss stays (2 at the end) or went
    # experts used alike go least recent first, for every policy
    _, _, evicted = replay([(0, [1, 2, 3]), (0, [4])], 2, 1, policy)
    assert [e for _, e in evicted] == [1, 2]
    # groups are distinct keys: expert 1 of group 0 is not expert 1 of group 1
    assert replay([(0, [1]), (1, [1])], 8, 1, policy)[:2] == (0, 2)
    # pinned experts (a forward still using them) are skipped, the next in order goes
    cache, dropped = ExpertCache(1, policy), []
    for e in (1, 2, 3):
        cache.admit((0, e), 1)

    class Table:
        def drop(self, e):
            dropped.append(e)
    assert cache.evict({0: Table()}, {(0, 1)}) == [(0, 2), (0, 3)] and dropped == [2, 3] and cache.used == 1


def test_lfu_aged_halves_scores_every_period():
    from offload.experts.cache import _LFUAged
    for period, first in ((2, ("a", 0)), (0, ("b", 0))):
        p = _LFUAged(period)
        p.insert(("a", 0))
        for _ in range(3):
            p.hit(("a", 0))  # a: 4 uses (t1-t4)
        p.insert(("b", 0))
        p.hit(("b", 0))
        p.hit(("b", 0))  # b: 3 uses (t5-t7)
        assert p.order()[0] == first  # aged every 2 uses: a's old uses fade (0.75 vs 2); not aged: 3 < 4


@pytest.mark.parametrize("policy", ["lfu", "lru2"])
def test_the_stager_follows_its_policy_as_replay_does(policy, tmp_path, monkeypatch, no_thread_leak):
    """A real run with a cache smaller than the experts routed: outputs exact, and its hits, misses and
    evictions are what ``replay`` of the routing it saw (counted by the test's own hook) gives."""
    from offload.experts import cache as X
    monkeypatch.setattr(X, "_POLICY", policy)
    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with offload.enable(model, prefetch=1, cpu_memory="16MiB", store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager = next(st for st in h._stagers if hasattr(st, "tables"))
        assert h._experts.policy.name == policy
        h._experts.budget = 24 * stager.tables[0].group.expert_bytes  # a quarter of the 96 experts
        group = {id(t.group.module): k for k, t in stager.tables.items()}
        seen, hooks = count_routing(model)
        with torch.no_grad():
            for n in range(1, ids.shape[1] + 1):  # one token at a time, each a new routing
                assert torch.equal(model(ids[:, :n]).logits, ref(ids[:, :n]).logits)
        for x in hooks:
            x.remove()
        s = h.stats()
        eb = {k: t.group.expert_bytes for k, t in stager.tables.items()}
        hits, misses, evicted = X.replay([(group[id(m)], e) for m, e in seen], h._experts.budget, eb, policy,
                                         read_room=stager.read_room)
        assert evicted and (s.expert_hits, s.expert_misses) == (hits, misses)
        assert h._experts.evictions == len(evicted)


def test_each_expert_owns_its_pages_and_big_ones_are_on_huge_pages(tmp_path, no_thread_leak):
    """An expert's slices of 2 MiB or more get regions of their own on 2 MiB boundaries, whatever the
    tensor's offset in the checkpoint (read in place: not page aligned), so their O_DIRECT reads land on
    huge pages and no page is shared with a neighbour (an eviction gives back exactly one expert)."""
    from offload.staging import HUGE_PAGE
    cfg = moe_config("qwen3_moe", layers=2, hidden=1024)  # gate_up 4 MiB, down 2 MiB per expert (fp32)
    cfg.num_experts = 4
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    # the fused [E, ...] tensors as they are in memory (offload's random checkpoints; save_pretrained writes
    # one tensor per expert, which are read as pieces)
    (tmp_path / "m").mkdir()
    m.config.save_pretrained(tmp_path / "m")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "m" / "model.safetensors"),
              metadata={"format": "pt"})
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    model, h = offload.load(tmp_path / "m", prefetch=1, ram_tier=0, progress=False, predict_experts=False)
    with h:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
        tables = [t for st in h._stagers if hasattr(st, "tables") for t in st.tables.values()]
        assert tables
        for t in tables:
            g = t.group
            regions = sorted(s.region(e) for s in g.slabs for e in range(g.count))
            assert all(a % 4096 == 0 and b > a for a, b in regions)
            assert all(b <= c for (_, b), (c, _) in zip(regions, regions[1:])), "two experts share a page"
            for e, rec in enumerate(g.experts):  # every read of expert e lands in its own regions
                own = [s.region(e) for s in g.slabs]
                assert all(any(a <= x.into and x.into + x.length <= b for a, b in own) for x in rec.extents)
            big = [s for s in g.slabs if s.n >= HUGE_PAGE]
            assert big and all((s.base - s.lead) % HUGE_PAGE == 0 and s.stride % HUGE_PAGE == 0 for s in big)
            if t.buffer.huge:  # transparent huge pages available: each big slice's whole 2 MiB pages advised
                assert t.huge_bytes >= g.count * sum(s.n // HUGE_PAGE * HUGE_PAGE for s in big)


def _table_vm_flags(buffer) -> set[str]:
    """The VmFlags of the mappings that hold ``buffer`` (from /proc/self/smaps)."""
    lo, hi = buffer.address, buffer.address + buffer.nbytes
    flags, inside = set(), False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a < hi and lo < b
        elif inside and line.startswith("VmFlags:"):
            flags |= set(line.split()[1:])
    return flags


def test_the_huge_pages_knob_off_means_no_huge_pages_and_the_mapping_budget_holds(tmp_path, monkeypatch, caplog,
                                                                                no_thread_leak):
    """HostBuffer advises a whole 2 MiB-aligned buffer huge; with the knob off nothing in an expert table may
    stay advised. And advice per expert stops short of half the kernel's mapping limit."""
    from offload.experts import tables as E
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(moe_config("qwen3_moe", layers=2, hidden=256)).eval()  # 2 MiB+ tables
    monkeypatch.setattr(E, "_HUGE_PAGES", False)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        tables = [t for st in h._stagers if hasattr(st, "tables") for t in st.tables.values()]
        assert tables and all(t.huge_bytes == 0 for t in tables)
        if tables[0].buffer.huge:  # (THP compiled out: there is nothing to advise)
            assert all("hg" not in _table_vm_flags(t.buffer) for t in tables)
    assert E._mappings_allow(1)
    with caplog.at_level(logging.INFO, logger="offload"):
        assert not E._mappings_allow(1 << 40)


def _big_experts_model(experts: int = 8):
    cfg = moe_config("qwen3_moe", layers=2, hidden=1024)  # gate_up 4 MiB, down 2 MiB per expert (fp32)
    cfg.num_experts = experts
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _huge_page_stager(h):
    """The handle's experts stager; the test is skipped where its tables have no transparent huge pages."""
    stager = next(st for st in h._stagers if hasattr(st, "tables"))
    if not all(t.huge for t in stager.tables.values()):
        pytest.skip("no transparent huge pages here: no pages to move")
    return stager


def test_evicted_experts_huge_pages_are_moved_under_the_next_reads(tmp_path, no_thread_leak):
    """With no expert cache each forward's experts are evicted after it; their huge pages wait in the pool (never
    more than one forward read) and are moved under the next forward's reads instead of fresh pages being
    faulted in and zeroed; prompts routed differently in turn keep the model's logits."""
    model = _big_experts_model()
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager = _huge_page_stager(h)
        pool = stager.pool
        maps = []
        with torch.no_grad():
            for seed in range(6):
                ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(seed))
                assert torch.equal(model(ids).logits, ref(ids).logits)
                assert 0 < pool.bytes <= pool.limit
                maps.append(sum(1 for _ in open("/proc/self/maps")))
        assert pool.moved_bytes > 0
        ranges = sum(len(r) for t in stager.tables.values() for r in t.huge)
        assert max(maps) - min(maps) <= 2 * ranges, maps  # within what the tables' advice was allowed


@pytest.mark.parametrize("predict", [False, True])
def test_an_evicted_expert_routed_again_keeps_its_own_pages(predict, tmp_path, no_thread_leak):
    """With an expert cache that evicts every forward, an expert evicted and routed again before its pages were
    given to another read takes its own pages back out of the pool: no later move takes them from under it
    (its bytes would read as zeros), and the pool never has to move a range onto itself (which the kernel
    refuses, switching the pool off)."""
    model = _big_experts_model()
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, cpu_memory="60MiB", store=tmp_path / "s", progress=False,
                        predict_experts=predict) as h:
        stager = _huge_page_stager(h)
        with torch.no_grad():
            for seed in range(20):
                ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(seed))
                assert torch.equal(model(ids).logits, ref(ids).logits), seed
        assert stager.pool.enabled and stager.pool.moved_bytes > 0 and stager.cache.evictions > 0


def _spare_settled(pool) -> bool:
    """The pool's thread is done filling: up to its limit, or it stopped."""
    with pool.lock:
        return pool.lock.wait_for(lambda: pool._spare is None or not pool._spare.filling and (
            not pool.enabled or pool.bytes + HUGE_PAGE > pool.limit or pool._spare.next_empty() is None), timeout=60)


def test_reads_no_evicted_expert_can_back_land_on_spare_pages_faulted_in_ahead(tmp_path, no_thread_leak):
    """An expert cache that is not full evicts nothing, so no evicted expert's pages can back the next read: the
    pool's thread faults spare huge pages in after each batch (on this VM memory the guest has not touched
    lately faults at ~0.45 GB/s, in a read a forward waits for) and they are moved under the reads. The logits
    stay the model's; the pool holds at most the read room, its thread stops at disable, and the moves split
    no more mappings than the tables' advice was allowed."""
    model = _big_experts_model(experts=16)
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, cpu_memory="1GiB", store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager = _huge_page_stager(h)
        pool, maps = stager.pool, []
        assert pool._spare is not None and pool.limit == stager.read_room
        with torch.no_grad():
            for seed in range(8):
                ids = torch.randint(0, 256, (1, 2), generator=torch.Generator().manual_seed(seed))
                assert torch.equal(model(ids).logits, ref(ids).logits), seed
                assert _spare_settled(pool)
                assert 0 < pool.bytes <= pool.limit == stager.read_room
                maps.append(sum(1 for _ in open("/proc/self/maps")))
        assert stager.cache.evictions == 0 and pool.held_bytes == 0  # nothing evicted: only spare pages served
        assert pool.spare_moved_bytes > 0
        ranges = sum(len(r) for t in stager.tables.values() for r in t.huge)
        assert max(maps) - min(maps) <= 2 * ranges + 2 * pool._spare.pages, maps
    assert not any(t.name == "offload-spare-pages" for t in threading.enumerate())


def test_spare_pages_are_kept_over_evicted_ones_and_go_first_on_a_shrink(no_thread_leak):
    """Spare pages already cost their fault: a full pool refuses an evicted expert's range (its table gives it
    back) rather than drop one. A shrink gives spare pages back first, then held ranges; a page being faulted
    in does not push a held range out."""
    from offload.experts.pages import PagePool
    pool = PagePool(spare_pages=8)
    if pool._spare is None or not pool.enabled:
        pytest.skip("pages cannot be moved here")

    class Donor:
        def __init__(self): self.back = []
        def address(self, at): return 0
        def give_back(self, a, b): self.back.append((a, b))
    donor = Donor()
    try:
        pool.resize(4 * HUGE_PAGE)
        pool.refill()
        assert _spare_settled(pool) and pool.bytes == 4 * HUGE_PAGE and pool._spare.count == 4
        assert not pool.give(donor, 0, 2 * HUGE_PAGE) and pool._spare.count == 4
        pool.resize(6 * HUGE_PAGE)
        assert pool.give(donor, 0, 2 * HUGE_PAGE) and pool.held_bytes == 2 * HUGE_PAGE
        pool.resize(3 * HUGE_PAGE)  # spare pages go first
        assert pool._spare.count == 1 and pool.held_bytes == 2 * HUGE_PAGE and donor.back == []
        with pool.lock:
            pool._spare.filling.add(5)  # as the thread marks a page it is faulting in
        pool.resize(2 * HUGE_PAGE)
        assert pool.held_bytes == 2 * HUGE_PAGE and donor.back == [] and pool._spare.count == 0
        with pool.lock:
            pool._spare.filling.discard(5)
        pool.resize(0)
        assert pool.bytes == 0 and donor.back == [(0, 2 * HUGE_PAGE)]
    finally:
        pool.close()
    assert pool._spare is None


def test_spare_pages_stay_within_the_read_room_while_experts_compute(tmp_path, monkeypatch, no_thread_leak):
    """Under cpu_memory, the experts held, the page pool (spare pages included) and the reads in flight stay
    within the cache's budget and the read room while a forward's experts compute: the pool refilled the read
    room right after the reads, while the experts just read still filled it (one read room over)."""
    from offload.experts import tables as E
    cfg = moe_config("qwen3_moe", layers=3, hidden=1024)
    cfg.num_experts = 16
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    over, want = [], E.ExpertsStager.want

    def checked_want(self, k, experts):
        want(self, k, experts)
        assert _spare_settled(self.pool)
        held = sum(len(t.present) for t in self.tables.values()) * self.tables[k].group.expert_bytes
        over.append(held + self._inflight_bytes() + self.pool.bytes - self.cache.budget - self.read_room)
    monkeypatch.setattr(E.ExpertsStager, "want", checked_want)
    with offload.enable(model, prefetch=1, cpu_memory="80MiB", store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager = _huge_page_stager(h)
        with torch.no_grad():
            for seed in range(6):
                model(torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(seed)))
        assert stager.pool.spare_moved_bytes > 0 and stager.cache.evictions > 0
    assert over and max(over) <= 0, max(over)


def test_experts_pages_are_given_back_where_they_cannot_be_moved(tmp_path, monkeypatch, caplog, no_thread_leak):
    """A kernel that cannot move pages (mremap fails): one log line, whatever the pool held given back, and
    from then on evictions give pages back as before; the logits stay the model's."""
    from offload.experts import pages
    model = _big_experts_model()
    ref = copy.deepcopy(model)

    def refuse(src: int, dst: int, n: int) -> None:
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(pages, "move_pages", refuse)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager = _huge_page_stager(h)
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="offload"):
            for seed in range(3):
                ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(seed))
                assert torch.equal(model(ids).logits, ref(ids).logits)
        assert not stager.pool.enabled and stager.pool.bytes == 0 and stager.pool.moved_bytes == 0
        assert sum("not reused" in r.getMessage() for r in caplog.records) == 1


def test_a_layers_routed_experts_are_read_at_once_not_one_per_ring_slot(tmp_path, no_thread_leak):
    """A reader that keeps its own queue full within a read (the native one) gets one thread per ring
    slot for whole units; a batch of routed experts (3-6 MiB reads on a real model) needs them all in
    flight at once: with four threads they read at half the disk's rate."""
    import threading

    from offload.io import PythonReader

    class Counting(PythonReader):
        """Counts reads in flight; each waits (once, briefly) for ``want`` to be in flight together."""
        want = 6

        def __init__(self):
            super().__init__(direct=False, task_bytes=None)  # whole extents per call, like the native reader
            self.cv = threading.Condition()
            self.now = self.most = 0
            self.settled = False

        def read(self, h, offset, dest):
            with self.cv:
                self.now += 1
                self.most = max(self.most, self.now)
                self.cv.notify_all()
                if not self.settled:  # the first batch shows how many run at once; later reads do not wait
                    self.settled = self.cv.wait_for(lambda: self.now >= self.want, timeout=2) or True
            try:
                super().read(h, offset, dest)
            finally:
                with self.cv:
                    self.now -= 1

    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    reader = Counting()
    ids = torch.randint(0, 256, (1, 16))  # 16 tokens x top-2 of 16 experts: most experts of each layer
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False, reader=reader,
                        predict_experts=False):
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
    assert reader.most >= reader.want, f"at most {reader.most} expert reads in flight"


def test_a_blocks_prefetch_waits_for_its_expert_batch(tmp_path, no_thread_leak):
    """The prefetch a block schedules when it starts (unit i+2 at prefetch 2) begins only after that block's
    routed experts are read: the batch has the disk to itself, and the prefetch reads during the experts'
    compute (a trace showed it taking ~27% of the disk during every other batch)."""
    from offload.io import PythonReader

    log: list[tuple] = []

    class Logging(PythonReader):
        def read(self, handle, offset, dest):
            log.append(("start", handle.path, offset))
            super().read(handle, offset, dest)
            log.append(("end", handle.path, offset))
    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=2, ram_tier=0, store=tmp_path / "s", reader=Logging(), progress=False,
                        predict_experts=False) as h:
        blocks = [hk for hk in h._hooks if not hasattr(hk, "group")]
        stager = next(st for st in h._stagers if hasattr(st, "tables"))
        n = len(blocks)
        assert h._prefetcher.hold_for == set(range(n))
        owner: list[tuple[str, int, int, str, int]] = []  # (path, start, end, kind, layer)
        for i, hk in enumerate(blocks):
            owner += [(h._store.path_of(hk.record, e.file), e.offset, e.offset + e.length, "dense", i)
                      for e in hk.record.reads]
        for k, t in stager.tables.items():
            owner += [(h._store.path_of(r, e.file), e.offset, e.offset + e.length, "expert", k)
                      for r in t.group.experts for e in r.reads]

        def whose(path: str, offset: int) -> tuple[str, int]:
            return next((kind, i) for p, a, b, kind, i in owner if p == path and a <= offset < b)
        for i, layer in enumerate(model.model.layers):  # before offload's own pre-hook: before the acquire
            layer.register_forward_pre_hook(lambda m, a, i=i: log.append(("block", i)), prepend=True)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    checked = 0
    for k, entry in enumerate(log):
        if entry[0] != "block" or entry[1] + 2 >= n:
            continue
        i, later = entry[1], [(w, *whose(p, o)) for w, p, o in (x for x in log[k + 1:] if x[0] != "block")]
        prefetch = next(j for j, x in enumerate(later) if x == ("start", "dense", i + 2))
        batch_end = max(j for j, x in enumerate(later) if x == ("end", "expert", i))
        assert batch_end < prefetch, (i, later[:batch_end + 1])
        checked += 1
    assert checked == n - 2


def test_with_routed_experts_whole_unit_reads_are_sliced_so_an_expert_batch_waits_for_one_slice(
        tmp_path, monkeypatch, no_thread_leak):
    """Routed expert reads are queued ahead of the dense prefetch, but a whole-unit read already running
    cannot be overtaken: with routed experts the prefetcher cuts a whole-unit reader's reads into slices.
    Here slices of 16 KiB on a tiny model; exact all the same."""
    from offload import prefetch
    from offload.io import PythonReader

    class Sizes(PythonReader):
        def __init__(self):
            super().__init__(direct=False, task_bytes=None)
            self.sizes = []

        def read(self, h, offset, dest):
            self.sizes.append(len(dest))
            super().read(h, offset, dest)

    monkeypatch.setattr(prefetch, "_SLICE_BYTES", 16 << 10)
    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    reader = Sizes()
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False, reader=reader,
                        predict_experts=False) as h:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
        largest_unit = max(r.data_bytes for r in h._prefetcher.units)
    assert largest_unit > 16 << 10 and reader.sizes and max(reader.sizes) <= 16 << 10


def test_sliced_reads_in_place_are_exact_through_o_direct_bounces_and_checksums(tmp_path, monkeypatch,
                                                                                   no_thread_leak):
    """The slices of a unit read in place start wherever the checkpoint's tensors do (not page aligned):
    each goes O_DIRECT through the bounce page, and the unit's checksum (first read) covers them all."""
    import os

    from offload import prefetch
    from offload.io import PythonReader
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    monkeypatch.setattr(prefetch, "_SLICE_BYTES", 128 << 10)
    ref = make("qwen3_moe", tmp_path / "m")
    reader = PythonReader(direct=True, task_bytes=None)
    model, h = offload.load(tmp_path / "m", prefetch=1, ram_tier=0, progress=False, reader=reader,
                            predict_experts=False)
    try:
        assert max(r.data_bytes for r in h._prefetcher.units) > 128 << 10
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
        assert h.stats().verified_units > 0
    finally:
        h.disable()


def test_the_cli_plan_sizes_the_device_table_as_enable_packs_it(tmp_path, no_thread_leak):
    """The plan (from a meta model, before anything is read) and ``enable`` agree on the experts' packed
    table, page pads included: the bytes a GPU's device table takes from ``gpu_memory``."""
    from offload.experts import routed_plan
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(moe_config("qwen3_moe", layers=2, hidden=72)).eval()
    model = model.to(torch.bfloat16)  # gate_up [16, 72, 72] in bf16: 40.5 pages, so the next tensor is padded
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(model.config).to(torch.bfloat16)
    names = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        tables = next(st for st in h._stagers if hasattr(st, "tables")).tables.values()
        packed = max(t.group.table.data_bytes for t in tables)
    plan = routed_plan(meta, names)
    assert plan is not None and plan.table_bytes == packed > max(plan.unit_expert_bytes)


def _bounded(h, budget_experts: int, read_experts: int) -> tuple:
    """The experts' memory set to ``budget_experts`` cached plus ``read_experts`` read per forward; a spy on
    ``want`` records the cache's bytes after every batch of reads (the cached and the in-use experts)."""
    stager = next(st for st in h._stagers if hasattr(st, "tables"))
    eb = stager.tables[0].group.expert_bytes
    h._experts.budget, stager.read_room = budget_experts * eb, read_experts * eb
    after: list[int] = []
    want = stager.want

    def spy(k, experts, **kw):
        want(k, experts, **kw)
        after.append(h._experts.used + stager._inflight_bytes())
    stager.want = spy
    return stager, eb, after


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_a_forward_routing_more_experts_than_memory_holds_is_split_and_stays_within_it(implementation, tmp_path,
                                                                                       no_thread_leak):
    """A prefill routing every expert of a layer under a budget of 4 experts: computed in groups, each expert read
    once, the cache never past the budget. With Transformers' eager experts code the logits are the model in
    memory's bit for bit; with grouped_mm (the CPU's default) the split forwards run the eager code, equal up to
    rounding."""
    model = make("qwen3_moe")
    model.config._experts_implementation = implementation
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with offload.enable(model, prefetch=1, cpu_memory="64MiB", store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager, eb, after = _bounded(h, 0, 4)
        seen, hooks = count_routing(model)
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits
        for x in hooks:
            x.remove()
        s = h.stats()
        assert seen and all(len(e) > 4 for _, e in seen) and s.expert_split_forwards == len(seen)
        assert s.expert_misses == sum(len(e) for _, e in seen)  # no cache: each routed expert read once
        assert after and max(after) <= stager.room == 4 * eb
        if implementation == "eager":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # decode steps fit: not split, and exact whatever the implementation
            nxt = got[:, -1:].argmax(-1)
            assert torch.equal(model(torch.cat([ids, nxt], 1)[:, -2:]).logits, ref(torch.cat([ids, nxt], 1)[:, -2:]).logits)
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__  # the wrapper is gone with the hooks


def test_a_batch_of_reads_larger_than_the_read_room_makes_room_in_the_cache_first(tmp_path, no_thread_leak):
    """Forwards that fit (6 experts routed, 6 allowed) but read more than the read room (2): the cache evicts before
    the reads, so it and the reads never pass 6 experts; and the stager still follows ``replay`` given the room."""
    from offload.experts import cache as X
    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, cpu_memory="64MiB", store=tmp_path / "s", progress=False,
                        predict_experts=False) as h:
        stager, eb, after = _bounded(h, 4, 2)
        group = {id(t.group.module): k for k, t in stager.tables.items()}
        seen, hooks = count_routing(model)
        ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            for n in range(1, 8):  # 3 tokens routing at most 6 experts a layer, then one more each time
                assert torch.equal(model(ids).logits, ref(ids).logits)
                ids = torch.cat([ids[:, 1:], model(ids).logits[:, -1:].argmax(-1)], 1)
        for x in hooks:
            x.remove()
        s = h.stats()
        assert s.expert_split_forwards == 0 and max(len(e) for _, e in seen) > 2
        assert after and max(after) <= 6 * eb
        hits, misses, _ = X.replay([(group[id(m)], e) for m, e in seen], 4 * eb, eb, read_room=2 * eb)
        assert (s.expert_hits, s.expert_misses) == (hits, misses)


def test_predicted_reads_stay_within_the_bound(tmp_path, no_thread_leak):
    """With prediction on, the experts held or being read (counted from ``back`` before a read to ``drop``) never
    pass the room of 10 experts, in a split prefill (32 tokens, up to 16 experts a layer), decode steps reading
    ahead, or forwards of 6 tokens where some layers split and some read ahead; no expert is read twice within
    one forward there."""
    import collections
    model = make("qwen3_moe")
    model.config._experts_implementation = "eager"
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, cpu_memory="64MiB", store=tmp_path / "s", progress=False,
                        predict_experts=True) as h:
        stager, eb, _ = _bounded(h, 8, 2)
        backed: set = set()
        peak, reads = [0], collections.Counter()
        for k, t in stager.tables.items():
            def back(e, k=k, orig=t.back):
                backed.add((k, e))
                reads[(k, e)] += 1
                peak[0] = max(peak[0], len(backed))
                return orig(e)

            def drop(e, k=k, orig=t.drop):
                backed.discard((k, e))
                return orig(e)
            t.back, t.drop = back, drop
        twice = 0
        ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(5))
        mine, theirs = tf.DynamicCache(config=model.config), tf.DynamicCache(config=model.config)
        with torch.no_grad():
            for _ in range(8):  # the prefill (split), then decode steps (read ahead)
                reads.clear()
                got = model(ids, past_key_values=mine, use_cache=True).logits
                assert torch.equal(got, ref(ids, past_key_values=theirs, use_cache=True).logits)
                twice += sum(n > 1 for n in reads.values())
                ids = got[:, -1:].argmax(-1)
            for seed in range(8):  # 6 tokens: some layers route more than 10 experts (split), some fewer (read ahead)
                reads.clear()
                ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(seed))
                assert torch.equal(model(ids).logits, ref(ids).logits)
                twice += sum(n > 1 for n in reads.values())
        s = h.stats()
        assert s.expert_split_forwards > 0 and s.expert_predicted_bytes > 0, s
        assert peak[0] <= 10 and twice == 0, (peak[0], twice)


def test_split_forwards_and_accelerate_hooks_put_on_or_taken_off_the_experts_while_enabled(tmp_path, no_thread_leak):
    """Our ``forward`` wrapper under Accelerate's: taken off while enabled (``remove_hook_from_module`` puts the
    class's forward back), the forward is not split (it would compute from experts never read: silently wrong
    logits); put on while enabled, it still splits, and after ``disable`` the wrapper left in Accelerate's chain
    holds neither the hook nor the stager."""
    import gc
    import weakref
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    model = make("qwen3_moe")
    model.config._experts_implementation = "eager"
    ref = copy.deepcopy(model)
    for layer in model.model.layers:
        add_hook_to_module(layer.mlp.experts, ModelHook())
    with offload.enable(model, prefetch=1, cpu_memory="64MiB", store=tmp_path / "a", progress=False,
                        predict_experts=False) as h:
        _bounded(h, 0, 4)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
            split = h.stats().expert_split_forwards
            assert split > 0
            for layer in model.model.layers:
                remove_hook_from_module(layer.mlp.experts)
            assert torch.equal(model(ids).logits, ref(ids).logits)
        assert h.stats().expert_split_forwards == split  # no longer split: every routed expert read at once
    model = make("qwen3_moe")
    model.config._experts_implementation = "eager"
    h = offload.enable(model, prefetch=1, cpu_memory="64MiB", store=tmp_path / "b", progress=False,
                       predict_experts=False)
    _bounded(h, 0, 4)
    for layer in model.model.layers:
        add_hook_to_module(layer.mlp.experts, ModelHook())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert h.stats().expert_split_forwards > 0
    stager = weakref.ref(next(st for st in h._stagers if hasattr(st, "tables")))
    h.disable()
    del h
    gc.collect()
    assert stager() is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_units_compute_excludes_its_experts_reads(tmp_path, monkeypatch, no_thread_leak):
    """A block's compute was timed bind to unbind, which holds its experts module's wait for its routed reads
    (counted as waiting too), and the experts modules' own compute was added on top of their blocks': the
    pass's compute and waits summed to more than the pass, and the compute saved for tuning (per unit) was
    inflated by the disk. Simulated time: the clock and the prefetcher's waits are the test's own."""
    import offload.hooks as hooks_mod
    from offload.hooks import UnitHook
    now, waited = [0.0], [0.0]
    monkeypatch.setattr(hooks_mod.time, "perf_counter", lambda: now[0])

    class Stager:  # what a unit hook asks of its stager: the buffer, and the prefetcher's waits so far
        class prefetcher:
            waited = staticmethod(lambda: waited[0])

        def stage(self, i):
            return torch.zeros(0, dtype=torch.uint8)

        def done(self, i):
            pass
    module = torch.nn.Identity()
    hook = UnitHook(0, module, None, [], Stager())
    hook.pre(module, ())
    now[0], waited[0] = 5.0, 3.0  # 5 s inside the unit, 3 of them waiting for its experts' reads
    hook.post(module, (), None)
    assert hook.compute_s == 2.0
    # the pass meter times the blocks' units only: their experts modules run inside them
    model = make("qwen3_moe")
    monkeypatch.undo()
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        with torch.no_grad():
            for _ in range(3):
                model(IDS[:, :1])
        assert len(h._meter.compute(1).unit_s) == h.stats().streamed_units


def test_predictions_left_by_a_failed_forward_are_not_counted_after_a_reset(tmp_path, no_thread_leak):
    """A forward that fails after layer 0 predicted layer 1's experts leaves those reads in flight. After
    reset_stats the same input predicts the same experts (already in flight: nothing new is predicted), and
    their use counted as used prediction that was never counted as predicted: used > predicted."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(moe_config("qwen3_moe", layers=2, hidden=128)).eval()
    ref = copy.deepcopy(model)
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False,
                        predict_experts=True) as h:
        boom = model.model.layers[1].self_attn.register_forward_pre_hook(lambda *_: 1 / 0)
        with pytest.raises(ZeroDivisionError), torch.no_grad():
            model(IDS[:, :3])
        boom.remove()
        assert any(getattr(st, "inflight", None) for st in h._stagers)
        h.reset_stats()
        with torch.no_grad():
            assert torch.equal(model(IDS[:, :3]).logits, ref(IDS[:, :3]).logits)
        s = h.stats()
        assert s.expert_predicted_used_bytes <= s.expert_predicted_bytes


def test_experts_routed_reads_cannot_serve_say_so(tmp_path, caplog, no_thread_leak):
    """Experts in a layout routed reads cannot serve one by one (a list of expert modules, as DBRX's, JetMoE's
    and Llama 4's are not stacked with forward(hidden, top_k_index, top_k_weights)) stream as whole blocks,
    exact, and one log line says so (it was silent)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(16, 4)
            self.experts = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])

        def forward(self, x):
            pick = self.router(x).argmax(-1, keepdim=True)
            out = torch.stack([e(x) for e in self.experts], -2)
            return x + out.gather(-2, pick[..., None].expand(*pick.shape, 16)).squeeze(-2)
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(3)]).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
    with caplog.at_level(logging.INFO, logger="offload"):
        with offload.enable(model, units=["0", "1", "2"], prefetch=1, ram_tier=0, store=tmp_path / "s",
                            progress=False) as h:
            assert h._experts is None
            with torch.no_grad():
                assert torch.equal(model(x), want)
    assert any("reading whole blocks" in r.message and "experts" in r.message for r in caplog.records)


def test_a_budget_just_above_the_minimum_leaves_one_tokens_expert_reads_before_the_ram_tier(tmp_path,
                                                                                             no_thread_leak):
    """The RAM tier took units first and left the experts less than one token's reads: at a budget of the
    minimum + 1 MB every one-token decode step was split expert by expert. The tier now leaves those reads."""
    import re
    ref = make("qwen3_moe", tmp_path / "q")
    with pytest.raises(offload.OffloadError) as e:
        offload.load(tmp_path / "q", cpu_memory=1000, prefetch=1, progress=False, tune=False)
    least = int(re.search(r"the minimum is (\d+) bytes", str(e.value)).group(1))
    model, h = offload.load(tmp_path / "q", cpu_memory=least + 1_000_000, prefetch=1, progress=False, tune=False)
    try:
        assert h.stats().ram_tier_units > 0  # the tier still takes what is left
        with torch.no_grad():
            seen, got = decode_step(model, h)
            assert torch.equal(got, decode_step(ref)[1])
        assert h.stats().expert_split_forwards == 0 and seen
    finally:
        h.disable()


def test_blocks_that_fit_in_memory_say_only_the_routed_experts_are_read(tmp_path, monkeypatch):
    from offload import tune
    monkeypatch.setattr(tune, "MIN_STREAMED_BYTES", 0)  # the tiny blocks count as enough to plan
    model = make("qwen3_moe")
    with offload.enable(model, store=tmp_path / "s", progress=False) as h:  # the default budget holds the blocks
        assert h.stats().streamed_units == 0 and h.prediction is None
        assert "only the routed experts are read" in h.why_no_prediction
