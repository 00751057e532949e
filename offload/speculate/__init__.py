"""Several tokens per disk pass: speculative decoding with a resident draft, the verify passes' greedy tokens.

When every block streams, one target forward costs one pass over the streamed bytes whether it scores
one position or nine. A resident *draft* proposes ``K`` tokens; the streamed target scores them all in
one forward over ``K + 1`` positions and keeps the longest prefix that equals its own greedy choice,
plus its own next token. Every kept token is the target's argmax *in that verify pass*. What is
guaranteed: in fp32, the target's plain greedy tokens (identical in every case tried); in bf16/fp16,
the tokens of the verify passes, exactly what Transformers' assisted generation gives, which can
differ from plain greedy decoding after a near-tie (see "Exactness" below).

    ids, stats = offload.speculate.generate(model, input_ids, speculate="int4", max_new_tokens=64)
    spec = Speculator(model, "int4")                   # build the draft once, generate many times
    ids, stats = spec.generate(input_ids, max_new_tokens=64)

Drafts (``speculate=``)
-----------------------
``"ngram"``   prompt lookup: the continuation of the last n-gram's earlier occurrence (no model, 0 bytes).
FOLDER        a separate small model with the same vocabulary (``from_pretrained``), held in RAM.
``"int8"``    a self-draft: the target's own blocks, each read once from the handle's store, their
``"int4"``    linear weights quantized with ``offload.quant`` (``QuantizedWeight``, which ``F.linear``
              dispatches on), held in RAM; embeddings, norms and head are the target's own tensors,
              shared, not copied. ``draft_bytes()`` says what it costs before it is built.

What runs the loop: Transformers' assisted generation, unchanged
----------------------------------------------------------------
``model.generate(assistant_model=draft)`` (and ``prompt_lookup_num_tokens=`` for ``"ngram"``) composes
with offload's hooks: the target's units are bound and unbound per forward whatever the number of
positions, the KV cache is cropped after a rejection, and the tokens equal plain greedy decoding of the
same offloaded target on every case tested (tiny BLOOM / Llama / OPT, fp32, 32 tokens, several
prompts, every mode; ``tests/test_speculate.py``) and in ``benchmarks/bench_speculate.py``. No own
draft/verify loop was written: no case failed, and what Transformers' loop costs beside the forwards
themselves (the draft's ``generate`` call per pass, cache cropping, acceptance) measured 3-15 ms per pass
with the bloom-1b7 int4 draft, under 1% of a 1.4 s streamed pass, so a loop of our own could win at most
that. What is added around it:

* K from measured costs. Transformers' own schedules are a fixed K or a +2/-1 heuristic that ignores
  what a draft step and a target pass cost. Here the candidate generator Transformers builds is given a
  controller (``_get_candidate_generator`` is wrapped on the instance for the call): after every pass
  it records the draft's forward times, the target's forward time and how many candidates were kept,
  and sets the next pass's K to the one maximising expected tokens per second (``choose_k``)::

      E[tokens/pass](K) = (1 - a^(K+1)) / (1 - a)
      seconds/pass(K)   = draft_overhead + K * draft_step + verify_base + verify_per_position * (K + 1)

  ``a`` is the per-token acceptance, estimated as (accepted + 1) / (accepted + rejections + 2);
  the times are medians, the verify cost a median-slope line over the passes seen (a streamed pass is
  nearly flat in K, an in-memory one is not; medians, because on a shared 2-core machine another
  process stretched single draft calls by seconds and a mean followed them). K = 0 (no drafting:
  plain decoding) is allowed when drafting does not pay; after ``PROBE_EVERY`` such passes one pass
  drafts again, so a K chosen on early noise is revisited. ``draft_tokens=K`` fixes K instead. For
  ``"ngram"`` the K is Transformers' ``PromptLookupCandidateGenerator.num_output_tokens``, for a model
  draft ``AssistedCandidateGenerator.num_assistant_tokens``, set before each pass.
* The draft's confidence threshold is off (``assistant_confidence_threshold=0``), so a pass drafts
  exactly K tokens and the cost model holds; Transformers' default (0.4) stops drafting early.
* Statistics (``SpecStats``): target passes, drafted, accepted, tokens per pass, acceptance rate,
  draft time share, the Ks used, the draft's bytes, the measured costs.

Exactness, numerically: a verify forward over K+1 positions computes each position with other
matrix shapes than a one-position step, so its logits differ in the last bits. In fp32 a flipped
argmax needs two logits within ~1e-6 of each other; in bf16 (8 bits of mantissa) it happens: 7 of 50
random prompts on a tiny bf16 Llama with the int8 self-draft diverged from plain greedy decoding
(``benchmarks/bench_spec_divergence.py``, figures in the README), always at a near-tie, and from there
on the text is another, equally greedy, continuation. int8 units above 16 rows also take another
kernel than one-row steps (``offload.quant``), so their verify passes differ the same way. A mode
that keeps plain greedy's tokens at near-ties is not offered: the verify pass also wrote the KV
cache of every position it scored, so recomputing one position alone would still not give
one-position-step numerics, and each recomputation costs a whole streamed pass.

Greedy, decoder-only, batch 1 (Transformers' assisted generation is batch-1 only).
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import OffloadError
from .control import (INITIAL_K, MAX_K, MIN_FIT, PROBE_EVERY, WINDOW, Costs, SpecStats, _Controller,  # noqa: F401
                      choose_k, expected_tokens)
from .drafts import (INT4_GROUP_SIZE, MODES, _device_of, _handle_of, _mode, _own_bytes, build_self_draft,  # noqa: F401
                     draft_bytes, folder_bytes, load_folder_draft)

# --------------------------------------------------------------------------------------------------
# generation


class Speculator:
    """A target (offloaded or not) and its draft, built once; ``generate`` as many times as wanted.

    ``speculate``: ``"ngram"``, ``"int8"``, ``"int4"`` or a draft model folder. ``draft_tokens``: a fixed K
    (default: chosen from measured costs each pass, at most ``max_draft_tokens``). ``draft``: a ready draft
    model instead of building one (a FOLDER or int8/int4 mode). ``group_size``: int4 groups.
    ``draft_dtype``: a FOLDER draft's dtype (default: its checkpoint's). ``quantize_head``: see
    ``build_self_draft``."""

    def __init__(self, model: nn.Module, speculate: str, *, handle: Any = None, draft_tokens: int | None = None,
                 max_draft_tokens: int = MAX_K, draft: nn.Module | None = None, group_size: int = INT4_GROUP_SIZE,
                 draft_dtype: torch.dtype | str | None = None, ngram_size: int = 2, quantize_head: bool = False):
        if getattr(model.config, "is_encoder_decoder", False):
            raise OffloadError("speculative decoding is implemented for decoder-only models")
        if draft_tokens is not None and (not isinstance(draft_tokens, int) or draft_tokens < 0):
            raise ValueError(f"draft_tokens must be an integer >= 0, got {draft_tokens!r}")
        if not isinstance(max_draft_tokens, int) or max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be an integer >= 1, got {max_draft_tokens!r}")
        self.model, self.mode, self.speculate = model, _mode(speculate), os.fspath(speculate)
        self.handle = handle if handle is not None else _handle_of(model)
        self.draft_tokens, self.max_draft_tokens, self.ngram_size = draft_tokens, max_draft_tokens, ngram_size
        self.build_seconds = 0.0
        t0 = time.perf_counter()
        if self.mode == "ngram":
            self.draft = None
        elif draft is not None:
            self.draft = draft
        elif self.mode == "folder":
            self.draft = load_folder_draft(self.speculate, model, draft_dtype)
        else:
            self.draft = build_self_draft(model, self.mode, handle=self.handle, group_size=group_size,
                                          quantize_head=quantize_head)
        self.build_seconds = time.perf_counter() - t0
        self.draft_bytes = _own_bytes(self.draft, model) if self.draft is not None else 0

    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int, **kw: Any) -> tuple[torch.Tensor, SpecStats]:
        """Greedy generation with speculation: ``(output ids, SpecStats)``; in fp32 the ids are what
        ``model.generate(input_ids, max_new_tokens=..., do_sample=False, **kw)`` returns, in bf16/fp16
        the verify passes' greedy tokens (see the module docstring)."""
        if kw.get("do_sample") or kw.get("num_beams", 1) != 1:
            raise ValueError("speculative decoding here is greedy: do_sample=True and num_beams > 1 are not supported")
        if any(k in kw for k in ("assistant_model", "prompt_lookup_num_tokens", "num_assistant_tokens")):
            raise ValueError("speculate= chooses the draft and K: do not pass assistant_model / prompt_lookup_num_tokens")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"speculative decoding takes one sequence (batch 1), got input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        model, draft = self.model, self.draft
        stats = SpecStats(mode=self.speculate if self.mode != "folder" else f"folder:{self.speculate}",
                          draft_bytes=self.draft_bytes, k_fixed=self.draft_tokens is not None)
        k_max = self.draft_tokens if self.draft_tokens is not None else self.max_draft_tokens
        ctl = _Controller(self.mode, stats, self.draft_tokens, k_max, input_ids.shape[1] + max_new_tokens)
        gen_kw: dict[str, Any] = dict(do_sample=False, max_new_tokens=max_new_tokens)
        gen_kw.update(kw)
        gen_kw.setdefault("attention_mask", torch.ones_like(input_ids))
        saved_draft_cfg = None
        if self.mode == "ngram":
            gen_kw["prompt_lookup_num_tokens"] = max(1, ctl.k)
            gen_kw["max_matching_ngram_size"] = self.ngram_size
        else:
            assert draft is not None
            gen_kw["assistant_model"] = draft
            saved_draft_cfg = copy.deepcopy(draft.generation_config)
            draft.generation_config.num_assistant_tokens = max(1, ctl.k)
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.assistant_confidence_threshold = 0.0  # draft exactly K (the cost model's K)
        orig = model._get_candidate_generator

        def get_candidate_generator(*a: Any, **k: Any) -> Any:
            return ctl.attach(orig(*a, **k))

        hooks = [model.register_forward_pre_hook(ctl.target_pre, with_kwargs=True),
                 model.register_forward_hook(ctl.target_post, with_kwargs=True)]
        if draft is not None:
            hooks += [draft.register_forward_pre_hook(ctl.draft_pre, with_kwargs=True),
                      draft.register_forward_hook(ctl.draft_post, with_kwargs=True)]
        read0 = self.handle.stats().bytes_read if self.handle is not None else 0
        model._get_candidate_generator = get_candidate_generator  # this call only; removed below
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = model.generate(input_ids, **gen_kw)
        finally:
            stats.total_seconds = time.perf_counter() - t0
            with contextlib.suppress(AttributeError):
                del model._get_candidate_generator
            for h in hooks:
                h.remove()
            if saved_draft_cfg is not None and draft is not None:
                draft.generation_config = saved_draft_cfg
        if self.handle is not None:
            stats.bytes_read = self.handle.stats().bytes_read - read0
        stats.new_tokens = int(out.shape[1] - input_ids.shape[1])
        stats.costs = ctl.costs()
        stats.acceptance_estimate = ctl.acceptance()
        return out, stats

    def agreement(self, sequences: Iterable[torch.Tensor], skip: int = 1) -> dict[str, float]:
        """Teacher-forced top-1 agreement of draft and target (see ``agreement``)."""
        if self.draft is None:
            raise OffloadError("agreement needs a draft model (not 'ngram')")
        return agreement(self.model, self.draft, sequences, skip)


def agreement(target: nn.Module, draft: nn.Module, sequences: Iterable[torch.Tensor], skip: int = 1
              ) -> dict[str, float]:
    """Teacher-forced top-1 agreement of ``draft`` and ``target`` over token sequences (``[1, L]`` ids, one
    target pass each), the first ``skip`` positions left out. On text the target would generate, ``top1``
    is the acceptance a drafted token sees. Also: ``target_copies_input``, the share of positions where the
    target's top-1 is the input token itself (random-weight models mostly predict that, which makes any
    draft agree), and ``top1_input_masked``, the agreement with that token's logit masked in both (how
    well the draft ranks everything else)."""
    same = copies = same_masked = total = 0
    with torch.no_grad():
        for seq in sequences:
            seq = seq.reshape(1, -1)
            t = target(seq, use_cache=False).logits[0, skip:].float()
            d = draft(seq.to(_device_of(draft)), use_cache=False).logits[0, skip:].float().to(t.device)
            cur = seq[0, skip:].to(t.device)
            tt, dd = t.argmax(-1), d.argmax(-1)
            same += int((tt == dd).sum())
            copies += int((tt == cur).sum())
            rows = torch.arange(cur.numel(), device=t.device)
            t[rows, cur] = d[rows, cur] = float("-inf")
            same_masked += int((t.argmax(-1) == d.argmax(-1)).sum())
            total += cur.numel()
    n = max(total, 1)
    return {"top1": same / n, "target_copies_input": copies / n, "top1_input_masked": same_masked / n,
            "positions": float(total)}


def generate(model: nn.Module, input_ids: torch.Tensor, *, speculate: str, max_new_tokens: int,
             draft_tokens: int | None = None, handle: Any = None, **kw: Any) -> tuple[torch.Tensor, SpecStats]:
    """Greedy generation with a draft (``Speculator`` built for one call): ``(output ids, SpecStats)``.

    In fp32 the ids equal ``model.generate(input_ids, max_new_tokens=..., do_sample=False)``'s; in
    bf16/fp16 they are the verify passes' greedy tokens (module docstring). ``speculate``:
    ``"ngram"``, ``"int8"``, ``"int4"`` or a draft model folder; ``draft_tokens``: fixed K (default: chosen
    from measured costs). Speculator keywords (``draft=``, ``group_size=``, ``draft_dtype=``,
    ``max_draft_tokens=``, ``ngram_size=``, ``quantize_head=``) are taken from ``kw``; the rest go to
    ``model.generate``.
    """
    names = ("draft", "group_size", "draft_dtype", "max_draft_tokens", "ngram_size", "quantize_head")
    skw = {k: kw.pop(k) for k in names if k in kw}
    spec = Speculator(model, speculate, handle=handle, draft_tokens=draft_tokens, **skw)
    out, stats = spec.generate(input_ids, max_new_tokens=max_new_tokens, **kw)
    return out, stats
