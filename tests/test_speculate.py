"""offload.speculate: speculative decoding with a resident draft gives the offloaded target's greedy tokens."""
from __future__ import annotations

import pytest
import torch

import offload
from offload import speculate as S

try:
    import torchao  # noqa: F401  (the int8/int4 self-draft quantizes with it, through offload.quant)

    from offload import quant  # noqa: F401
    HAVE_TORCHAO = True
except ImportError:
    HAVE_TORCHAO = False

ARCHS = ["bloom", "llama", "opt"]
MODES = ["ngram", "folder", "int8", "int4"]
NEW = 32
PROMPTS = 3


def _config(arch: str, small: bool = False, init: float = 0.5):
    """Tiny configs. ``init`` 0.5 gives varied tokens (drafts get rejected, not only accepted); with the
    usual 0.02 random models repeat one token and every draft looks perfect."""
    import transformers as tf
    h, n = (32, 2) if small else (64, 4)
    if arch == "bloom":
        return tf.BloomConfig(vocab_size=256, hidden_size=h, n_layer=n, n_head=4, initializer_range=init)
    if arch == "llama":
        return tf.LlamaConfig(vocab_size=256, hidden_size=h, num_hidden_layers=n, intermediate_size=2 * h,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              initializer_range=init)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=256, hidden_size=h, num_hidden_layers=n, ffn_dim=2 * h, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=h, init_std=init)
    raise ValueError(arch)


def _save(arch: str, folder, small: bool = False, seed: int = 0, init: float = 0.5) -> str:
    import transformers as tf
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(_config(arch, small, init)).eval().save_pretrained(folder)
    return str(folder)


def _prompt(seed: int, length: int = 8) -> torch.Tensor:
    return torch.randint(2, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False)


@pytest.fixture(scope="module")
def silence_transformers():
    import transformers as tf
    level = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    yield
    tf.logging.set_verbosity(level)


@pytest.fixture(scope="module", params=ARCHS)
def target(request, tmp_path_factory, silence_transformers):
    """An offloaded tiny target (every block streamed), its plain greedy outputs, and a smaller draft folder."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"spec-{arch}")
    folder = _save(arch, root / "target")
    draft_folder = _save(arch, root / "draft", small=True, seed=1)
    with pytest.MonkeyPatch.context() as mp:  # conftest's cache fixture is per test; this one lives longer
        mp.setenv("OFFLOAD_CACHE", str(root / "cache"))
        model, handle = offload.load(folder, prefetch=2, ram_tier=0, progress=False)
    refs = [(_prompt(s), _greedy(model, _prompt(s))) for s in range(PROMPTS)]
    yield {"arch": arch, "model": model, "handle": handle, "folder": folder, "draft_folder": draft_folder,
           "refs": refs}
    handle.disable()


def _speculate_arg(mode: str, t) -> str:
    return t["draft_folder"] if mode == "folder" else mode


def _check_stats(st: S.SpecStats) -> None:
    assert st.new_tokens == NEW
    assert 0 <= st.accepted <= st.drafted
    # every pass yields its accepted candidates plus the target's own token
    assert st.target_passes == st.new_tokens - st.accepted
    assert st.target_passes == len(st.ks)
    if st.accepted:
        assert st.target_passes < st.new_tokens
    assert st.tokens_per_pass == pytest.approx(st.new_tokens / st.target_passes)
    assert 0.0 <= st.draft_time_share <= 1.0
    assert st.draft_seconds + st.target_seconds <= st.total_seconds * 1.01


@pytest.mark.parametrize("mode", MODES)
def test_speculative_greedy_equals_plain_greedy(target, mode):
    if mode in ("int8", "int4") and not HAVE_TORCHAO:
        pytest.skip("the int8/int4 self-draft quantizes with torchao")
    model = target["model"]
    hooks = (len(model._forward_hooks), len(model._forward_pre_hooks))
    spec = S.Speculator(model, _speculate_arg(mode, target))
    for k in (None, 3):  # K from the measured costs; K fixed (drafts every pass, rejections included)
        spec.draft_tokens = k
        accepted = drafted = 0
        for ids, ref in target["refs"]:
            out, st = spec.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW)
            assert torch.equal(out, ref), (mode, k, out[0, ids.shape[1]:].tolist(), ref[0, ids.shape[1]:].tolist())
            _check_stats(st)
            accepted, drafted = accepted + st.accepted, drafted + st.drafted
            if k is not None:
                assert st.k_fixed and set(st.ks) <= {k}
        if k is not None and mode != "ngram":  # a model draft proposes exactly K tokens each pass
            assert drafted >= 1
    # the target is left as it was: no hook, no instance attribute
    assert "_get_candidate_generator" not in vars(model)
    assert (len(model._forward_hooks), len(model._forward_pre_hooks)) == hooks


def test_repeating_model_accepts_drafts(tmp_path, silence_transformers):
    """With the usual small init a random model repeats a token: drafts are accepted, passes < tokens."""
    folder = _save("bloom", tmp_path / "t", init=0.02)
    model, handle = offload.load(folder, prefetch=2, ram_tier=0, progress=False)
    try:
        for mode in ("ngram", "int8") if HAVE_TORCHAO else ("ngram",):
            ids = _prompt(5)
            ref = _greedy(model, ids)
            out, st = S.generate(model, ids, speculate=mode, draft_tokens=4, max_new_tokens=NEW,
                                 min_new_tokens=NEW)
            assert torch.equal(out, ref)
            _check_stats(st)
            assert st.accepted > 0 and st.target_passes < NEW and st.tokens_per_pass > 1.5
            assert st.bytes_read > 0  # streamed: the handle's reads during the call
    finally:
        handle.disable()


@pytest.mark.skipif(not HAVE_TORCHAO, reason="the int8/int4 self-draft quantizes with torchao")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_self_draft_is_counted_before_it_is_built_and_shares_the_resident_weights(target, scheme, monkeypatch):
    from offload import quant
    model, handle = target["model"], target["handle"]
    predicted = S.draft_bytes(handle, scheme)
    assert predicted == S.draft_bytes(model, scheme) == S.draft_bytes(handle.stats().store, scheme)
    assert predicted == S.draft_bytes(model.config, scheme, dtype=torch.float32)  # what `run --random` has
    reads = []
    real = S.drafts._read_unit  # build_self_draft looks it up in offload.speculate.drafts
    monkeypatch.setattr(S.drafts, "_read_unit", lambda store, rec: reads.append(rec.name) or real(store, rec))
    draft = S.build_self_draft(model, scheme, handle=handle)
    assert sorted(reads) == sorted(u.name for u in handle._store.units)  # each unit read once
    assert S._own_bytes(draft, model) == predicted
    streamed = sum(u.tensor_bytes for u in handle._store.units)
    assert 0 < predicted < streamed * (0.5 if scheme == "int8" else 0.3)
    # embeddings, head, final norm: the target's tensors, not copies
    assert draft.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert draft.get_output_embeddings().weight is model.get_output_embeddings().weight
    qws = [m for m in draft.modules() if isinstance(getattr(m, "weight", None), quant.QuantizedWeight)]
    assert qws and all(m.weight.scheme == scheme for m in qws)


@pytest.mark.skipif(not HAVE_TORCHAO, reason="the int8/int4 self-draft quantizes with torchao")
def test_self_draft_with_its_own_quantized_head(target):
    model, handle = target["model"], target["handle"]
    spec = S.Speculator(model, "int8", quantize_head=True, draft_tokens=3)
    head = model.get_output_embeddings().weight
    assert spec.draft.get_output_embeddings().weight is not head
    assert spec.draft.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert spec.draft_bytes == S.draft_bytes(handle, "int8", quantize_head=True) > S.draft_bytes(handle, "int8")
    assert S.draft_bytes(handle.stats().store, "int8", quantize_head=True) == spec.draft_bytes
    for ids, ref in target["refs"][:2]:
        out, st = spec.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW)
        assert torch.equal(out, ref)
        _check_stats(st)


def test_folder_and_ngram_draft_bytes(target):
    model = target["model"]
    assert S.draft_bytes(model, "ngram") == 0
    spec = S.Speculator(model, target["draft_folder"])
    weights = sum(p.numel() * p.element_size() for p in spec.draft.parameters())
    assert S.draft_bytes(model, target["draft_folder"]) == weights
    assert spec.draft_bytes >= weights  # + non-persistent buffers (rotary tables)
    assert S.draft_bytes(model, target["draft_folder"], dtype=torch.bfloat16) == weights // 2


@pytest.mark.skipif(not HAVE_TORCHAO, reason="the int8/int4 self-draft quantizes with torchao")
def test_quantized_target(tmp_path, silence_transformers):
    """A target streamed from an int8 store (QuantBinding units): its self-drafts (the same int8 weights
    copied, or int4 from the dequantized ones) and ngram give its own greedy tokens."""
    folder = _save("opt", tmp_path / "t")
    model, handle = offload.load(folder, prefetch=2, ram_tier=0, quantize="int8", progress=False)
    try:
        refs = [(_prompt(s), _greedy(model, _prompt(s))) for s in range(2)]
        for mode in ("int8", "int4", "ngram"):
            spec = S.Speculator(model, mode, draft_tokens=3)
            assert spec.draft_bytes == S.draft_bytes(handle, mode) == S.draft_bytes(handle.stats().store, mode)
            for ids, ref in refs:
                out, st = spec.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW)
                assert torch.equal(out, ref), mode
                _check_stats(st)
            if mode == "int8":  # the draft is the target's own int8 weights, held in RAM: (nearly) all accepted
                assert st.drafted > 0 and st.accepted >= 0.9 * st.drafted
    finally:
        handle.disable()


@pytest.mark.skipif(not HAVE_TORCHAO, reason="the int8/int4 self-draft quantizes with torchao")
def test_self_draft_of_a_model_in_memory(tmp_path, silence_transformers):
    """Without offload the self-draft quantizes the model's own blocks; tokens still equal plain greedy."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config("llama")).eval()
    ids = _prompt(3)
    ref = _greedy(model, ids)
    out, st = S.generate(model, ids, speculate="int8", draft_tokens=2, max_new_tokens=NEW, min_new_tokens=NEW)
    assert torch.equal(out, ref)
    _check_stats(st)
    assert st.draft_bytes == S.draft_bytes(model, "int8") > 0


@pytest.mark.skipif(not HAVE_TORCHAO, reason="the int8/int4 self-draft quantizes with torchao")
def test_teacher_forced_agreement(target):
    model = target["model"]
    seqs = [_prompt(s, 24) for s in range(2)]
    same = S.agreement(model, model, seqs)
    assert same["top1"] == same["top1_input_masked"] == 1.0 and same["positions"] == 2 * 23
    spec = S.Speculator(model, "int4")
    got = spec.agreement(seqs)
    assert 0.0 <= got["top1"] <= 1.0 and 0.0 <= got["top1_input_masked"] <= 1.0
    assert 0.0 <= got["target_copies_input"] <= 1.0


def test_expected_tokens_and_choice_of_k():
    assert S.expected_tokens(0, 0.7) == 1.0
    assert S.expected_tokens(3, 1.0) == 4.0
    assert S.expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert S.expected_tokens(4, 0.0) == 1.0
    # a streamed pass (1 s) and a cheap draft (10 ms/token): drafting pays, more the higher the acceptance
    streamed = S.Costs(draft_step=0.01, draft_overhead=0.005, verify_base=1.0)
    ks = [S.choose_k(a, streamed) for a in (0.3, 0.6, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] >= 1 and ks[-1] == S.MAX_K
    assert S.choose_k(0.0, streamed) == 0  # nothing is ever accepted: plain decoding
    # the best K maximises tokens per second over every K
    for a in (0.3, 0.6, 0.9):
        k = S.choose_k(a, streamed)
        assert all(streamed.tokens_per_second(k, a) >= streamed.tokens_per_second(j, a) for j in range(S.MAX_K + 1))
    # a draft as slow as the target never pays; a verify cost growing per position caps K
    assert S.choose_k(0.9, S.Costs(draft_step=1.0, verify_base=1.0)) == 0
    assert S.choose_k(0.99, S.Costs(draft_step=0.001, verify_base=0.01, verify_per_position=0.01)) < S.MAX_K
    assert S.choose_k(0.99, streamed, k_max=5) == 5
    assert streamed.speedup(0, 0.5) == 1.0
    assert streamed.speedup(4, 1.0) == pytest.approx(5 / (1.0 + 0.005 + 0.04))


def test_costs_are_robust_to_a_stalled_pass():
    ctl = S._Controller("int4", S.SpecStats(mode="int4"), None, S.MAX_K, stop_len=10_000)
    ctl.verify = [(p, 1.0 + 0.05 * p) for p in (1, 3, 5, 7, 2, 4, 6)] + [(4, 9.0)]  # one pass stalled 8 s
    ctl.draft_fw = [2.0, 0.1, 0.1, 0.1, 5.0, 0.1]  # warm-up first, one stall
    ctl.draft_calls = [(3.0, 4, 0.0), (0.42, 4, 0.0), (0.42, 4, 0.0), (6.0, 4, 0.0), (0.42, 4, 0.0)]
    c = ctl.costs()
    assert c.verify_per_position == pytest.approx(0.05) and c.verify_base == pytest.approx(1.0)
    assert c.draft_step == pytest.approx(0.1) and c.draft_overhead == pytest.approx(0.02)
    ctl.verify = [(10, 1.2), (10, 3.0), (17, 6.0)]  # too few lengths for a line: flat, the median pass
    c = ctl.costs()
    assert c.verify_per_position == 0.0 and c.verify_base == pytest.approx(3.0)


def test_k_zero_is_probed_again():
    st = S.SpecStats(mode="int4")
    ctl = S._Controller("int4", st, None, S.MAX_K, stop_len=10_000)
    ctl.draft_fw = [1.0, 1.0]  # a draft step as slow as a target pass: K = 0
    ctl.verify = [(1, 1.0)]
    ks = []
    for _ in range(2 * S.PROBE_EVERY + 2):
        ctl._choose()
        ks.append(ctl.k)
    assert ks.count(0) >= 2 * (S.PROBE_EVERY - 1) and any(k > 0 for k in ks)


def test_refusals(target):
    model = target["model"]
    ids = _prompt(0)
    spec = S.Speculator(model, "ngram")
    with pytest.raises(ValueError, match="batch 1"):
        spec.generate(ids.repeat(2, 1), max_new_tokens=4)
    with pytest.raises(ValueError, match="greedy"):
        spec.generate(ids, max_new_tokens=4, do_sample=True)
    with pytest.raises(ValueError, match="assistant_model"):
        spec.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=3)
    with pytest.raises(offload.OffloadError, match="expected 'ngram'"):
        S.Speculator(model, "int3")
    with pytest.raises(ValueError, match="draft_tokens"):
        S.Speculator(model, "ngram", draft_tokens=-1)


def test_folder_draft_with_another_vocabulary_is_refused(target, tmp_path):
    import transformers as tf
    cfg = _config(target["arch"], small=True)
    cfg.vocab_size = 300
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "other")
    with pytest.raises(offload.OffloadError, match="vocabulary"):
        S.Speculator(target["model"], str(tmp_path / "other"))
