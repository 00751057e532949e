"""Many sequences per streamed pass: continuous batching over one causal LM.

When every block streams from disk, a forward costs one read of the streamed bytes whether it
advances one row or sixty-four, so the engine keeps up to ``batch_size`` rows in every pass and
refills a finished row's place from the queue at the next pass (continuous batching).

Why not Transformers' own ``generate_batch`` / ``ContinuousBatchingManager``: with Transformers 5.24
it gives each prompt its own greedy tokens on Llama (offload hooks included), but its paged cache
fails on BLOOM and OPT (``'PagedAttentionCache' object has no attribute 'get_seq_length'``) and on
GPT-NeoX (``PagedAttentionCache.update() missing ... 'kwargs'``). This engine uses only what every
Transformers causal LM takes: a 2D ``attention_mask``, per-row ``position_ids`` and a ``DynamicCache``.

How one pass works (``Engine.step``):

- The batch is a ``DynamicCache`` of ``B`` rows x ``T`` columns and a ``[B, T]`` mask of which columns
  are real tokens. A row that is decoding feeds its last token; prompts admitted this pass feed their
  whole prompt, in the same forward (no extra streamed pass for a prefill): the pass is ``L`` columns
  wide (the longest new prompt), decoding rows put their token in the last column and mask the
  ``L - 1`` before it, new rows are left-padded and get zero (masked) cache columns for the past.
- Positions come from the mask (``cumsum - 1``), so RoPE (Llama, GPT-NeoX), learned positions (OPT)
  and ALiBi (BLOOM builds it from the mask's cumsum) see each row's own positions; masked columns
  get no attention weight. Each row's logits are therefore its own sequence's, up to the summation
  order of the kernels (tests check the tokens are exactly those of ``generate`` alone, fp32).
- After the pass, finished rows leave and every row's real columns are gathered right-aligned
  (``_compact``), so the holes a mixed pass leaves and the columns only a finished row used cost
  nothing in later passes.

Per request: ``max_new_tokens``, EOS (the model's generation config), stop strings, greedy
(``temperature=0``) or sampling with ``temperature``/``top_p`` (Transformers' logits warpers) and a
``seed`` (a ``torch.Generator`` per row, so a row's draws do not depend on its neighbours).
Log-probabilities on request: of each generated token with the ``logprobs`` most likely alternatives,
and of each prompt token given the ones before it (``prompt_logprobs``: what evaluation harnesses
score; the pass admitting such a prompt has the output head compute that prompt's columns beside every
row's last, ``Engine._scored_pass``). They are the model's own
distribution (``log_softmax`` of the logits in fp32), before temperature and top-p, as vLLM reports them.

Two ways in: ``generate_many(model, tokenizer, prompts)`` runs passes in the caller's thread and
yields each request as it finishes; ``Engine.start()`` runs them in one thread that owns the model,
and ``Engine.submit`` may then be called from any thread (the server), with a callback per request
for its text as it comes and ``Request.cancel()`` to free its row.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

__all__ = ["Engine", "Request", "TokenLogprob", "QueueFull", "EngineClosed", "generate_many", "check_prompt"]

_PAD_ID = 0  # any id in the vocabulary: padded columns are masked, their token never matters


class QueueFull(Exception):
    """``submit`` found ``max_queue`` requests already waiting (the server answers 429)."""


class EngineClosed(Exception):
    """``submit`` after ``close()`` (the server is shutting down)."""


class Request:
    """One prompt's generation: its parameters, and its result once ``done``.

    ``token_ids`` are the generated ids (with the EOS token when it stopped on one, as ``generate``
    returns it); ``text`` is their decoded text, cut before a stop string; ``finish_reason`` is
    ``"stop"`` (EOS or a stop string), ``"length"`` (``max_new_tokens``), ``"cancelled"`` or ``"error"``.

    ``token_logprobs`` (when ``logprobs`` was asked) has one ``TokenLogprob`` per generated token;
    ``prompt_token_logprobs`` (when ``prompt_logprobs`` was) one per prompt token, None for the first
    (nothing before it to predict it from).
    """

    def __init__(self, prompt: str | None, prompt_ids: list[int], *, index: int | None, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int | None, stop: Sequence[str], ignore_eos: bool,
                 on_text: Callable[[Request, str], None] | None, logprobs: int | None = None,
                 prompt_logprobs: bool = False):
        self.id = next(_ids)
        self.index = index
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.stop = tuple(s for s in stop if s)
        self.ignore_eos = ignore_eos
        self.on_text = on_text
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.token_logprobs: list[TokenLogprob] = []
        self.prompt_token_logprobs: list[TokenLogprob | None] = []
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._emitted = 0  # characters of text already handed to on_text
        self._generator: torch.Generator | None = None
        self._cancelled = False
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Free this request's row (or its place in the queue) at the next pass; safe from any thread."""
        self._cancelled = True

    def wait(self, timeout: float | None = None) -> Request:
        """Block until finished (the engine's thread must be running: ``Engine.start``)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, index={self.index}, tokens={len(self.token_ids)}, "
                f"finish_reason={self.finish_reason!r}, text={self.text!r})")


_ids = itertools.count(1)


class TokenLogprob(NamedTuple):
    """One position's log-probability: of the token there (``token``), and the ``top`` most likely
    tokens at that position, most likely first, as (id, log-probability)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int, rows: int = 256) -> list[TokenLogprob]:
    """Per row of ``logits`` [N, vocab]: ``tokens[n]``'s log-probability and the ``k`` most likely. In
    fp32, ``rows`` at a time: a long prompt's [N, vocab] in fp32 would double what its logits hold."""
    out: list[TokenLogprob] = []
    for a in range(0, logits.shape[0], rows):
        lp = torch.log_softmax(logits[a:a + rows].float(), dim=-1)
        part = tokens[a:a + rows]
        chosen = lp.gather(1, part.view(-1, 1)).view(-1).tolist()
        top_v, top_i = lp.topk(min(k, lp.shape[-1]), dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        out += [TokenLogprob(int(t), c, list(zip(i, v))) for t, c, i, v in
                zip(part.tolist(), chosen, top_i.tolist(), top_v.tolist())]
    return out


class Engine:
    """Continuous batching of many requests over one model (usually one ``offload.enable``-d).

    ``batch_size`` rows share each forward; ``max_queue`` bounds the requests waiting for a row
    (``None``: no bound). ``tokenizer`` needs ``encode`` and ``decode``; it may be None when every
    prompt is given as token ids (``text`` is then empty).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8, max_queue: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model: the engine batches decoder-only "
                             f"causal LMs")
        from transformers import DynamicCache
        _check_cache(DynamicCache(config=config), model)  # refused here, not at every request's first pass
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_queue = max_queue
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._pass_positions = "position_ids" in params  # BLOOM has none: its ALiBi comes from the mask
        self._keep_one = "logits_to_keep" in params  # else [B, L, vocab] logits for every column
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = getattr(config, "eos_token_id", None) if eos is None else eos
        self.eos_ids: set[int] = set([eos] if isinstance(eos, int) else (eos or []))
        emb = model.get_input_embeddings().weight
        self.device = emb.device if emb.device.type != "meta" else torch.device("cpu")
        self._lock = threading.Condition()
        self._queue: deque[Request] = deque()
        self._rows: list[Request] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, T] long, 1 = a real token
        self._last: list[int] = []  # per row: the token the next pass feeds
        self._closed = False
        self._thread: threading.Thread | None = None
        self._counts = {"passes": 0, "tokens": 0, "prompt_tokens": 0, "finished": 0, "cancelled": 0, "errors": 0}

    # ------------------------------------------------------------------ submitting

    def submit(self, prompt: str | Sequence[int], *, max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] = (), ignore_eos: bool = False,
               index: int | None = None, on_text: Callable[[Request, str], None] | None = None,
               logprobs: int | None = None, prompt_logprobs: bool = False) -> Request:
        """Queue a prompt (text, or token ids); thread-safe. Checked here, so a bad request fails its caller
        and never a pass: ``ValueError`` for bad parameters, ``QueueFull``, ``EngineClosed``.

        ``logprobs``: record each generated token's log-probability and this many most likely
        alternatives (0: the token's alone; None: nothing). ``prompt_logprobs``: record each prompt
        token's, given the tokens before it, with ``logprobs`` alternatives.

        ``on_text(request, delta)`` is called from the engine's thread after each new token with the text
        it adds (``""`` while text that could still become a stop string, or half a character, is held
        back, and always without a tokenizer), and once more when the request is done (``request.done``)."""
        ids = self.encode(prompt)
        check_prompt(ids, max_new_tokens, self.model.config)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"logprobs must be a whole number >= 0 (alternatives per token) or None, got {logprobs!r}")
        stops = [stop] if isinstance(stop, str) else list(stop)
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the text")
        req = Request(prompt if isinstance(prompt, str) else None, ids, index=index, max_new_tokens=max_new_tokens,
                      temperature=float(temperature), top_p=float(top_p), seed=seed, stop=stops,
                      ignore_eos=ignore_eos, on_text=on_text, logprobs=logprobs, prompt_logprobs=bool(prompt_logprobs))
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed: it takes no new requests")
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (max_queue {self.max_queue})")
            self._queue.append(req)
            self._lock.notify_all()
        return req

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt as ``generate`` would get them from ``tokenizer.encode`` (special tokens
        included); ids pass through."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass token ids, or give the engine a tokenizer")
            return list(self.tokenizer.encode(prompt))
        return [int(i) for i in prompt]

    # ------------------------------------------------------------------ state

    @property
    def busy(self) -> bool:
        """Rows in the batch or requests waiting."""
        with self._lock:
            return bool(self._rows or self._queue)

    def stats(self) -> dict[str, int]:
        """Rows in the batch now, requests waiting, and counts since the start: passes (forwards), tokens
        generated, prompt tokens prefilled, requests finished / cancelled / failed."""
        with self._lock:
            return {"batch_size": self.batch_size, "active": len(self._rows), "queued": len(self._queue),
                    "cache_columns": 0 if self._mask is None else int(self._mask.shape[1]), **self._counts}

    # ------------------------------------------------------------------ one pass

    @torch.no_grad()
    def step(self) -> list[Request]:
        """One forward over every row (admitting queued prompts into free rows first); returns the
        requests that finished in it. Only one thread may call it (the engine's, once ``start``-ed)."""
        finished: list[Request] = []
        with self._lock:
            for r in [r for r in self._queue if r._cancelled]:
                self._queue.remove(r)
                finished.append(r)
            dropped = [i for i, r in enumerate(self._rows) if r._cancelled]
            finished += [self._rows[i] for i in dropped]
            new: list[Request] = []
            while self._queue and len(self._rows) - len(dropped) + len(new) < self.batch_size:
                new.append(self._queue.popleft())
        for r in finished:
            self._finish(r, "cancelled")
        if dropped:
            self._keep([i for i in range(len(self._rows)) if i not in set(dropped)])
        if not self._rows and not new:
            return finished
        try:
            done = self._forward(new)
        except BaseException as e:
            with self._lock:
                failed, self._rows = self._rows + [r for r in new if r not in self._rows], []
            self._cache = self._mask = None
            self._last = []
            for r in failed:
                r.error = e
                self._finish(r, "error")
            raise
        return finished + done

    def _forward(self, new: list[Request]) -> list[Request]:
        old = len(self._rows)
        width = max((len(r.prompt_ids) for r in new), default=1)
        rows = old + len(new)
        ids = torch.full((rows, width), _PAD_ID, dtype=torch.long)
        cols = torch.zeros((rows, width), dtype=torch.long)
        ids[:old, -1] = torch.tensor(self._last, dtype=torch.long)
        cols[:old, -1] = 1
        for k, r in enumerate(new, start=old):
            ids[k, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            cols[k, width - len(r.prompt_ids):] = 1
        if self._cache is None:
            from transformers import DynamicCache
            self._cache = DynamicCache(config=self.model.config)
            _check_cache(self._cache, self.model)
            mask = cols
        else:
            past = self._mask
            assert past is not None
            if new:  # the new rows have no past: zero, masked columns
                past = torch.cat([past, past.new_zeros((len(new), past.shape[1]))])
                for layer in self._cache.layers:
                    if layer.is_initialized and layer.keys.numel():
                        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((len(new), *layer.keys.shape[1:]))])
                        layer.values = torch.cat([layer.values,
                                                  layer.values.new_zeros((len(new), *layer.values.shape[1:]))])
            mask = torch.cat([past, cols], dim=1)
        with self._lock:
            self._rows = self._rows + new
        for r in new:
            self._counts["prompt_tokens"] += len(r.prompt_ids)
        kwargs: dict[str, Any] = {self._cache_kw: self._cache, "use_cache": True}
        if self._pass_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:].to(self.device)
        scored = [(k, r) for k, r in enumerate(new, start=old) if r.prompt_logprobs]
        if self._keep_one and not scored:
            kwargs["logits_to_keep"] = 1
        if scored:
            logits = self._scored_pass(ids, mask, kwargs, scored, width)
        else:
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
            logits = out.logits[:, -1, :].float()
            del out
        self._mask = mask
        self._counts["passes"] += 1
        tokens, failed = self._choose(logits)
        wanted = [i for i, r in enumerate(self._rows) if r.logprobs is not None and i not in failed]
        if wanted:
            at = torch.tensor(wanted, device=logits.device)
            chosen = torch.tensor([tokens[i] for i in wanted], device=logits.device)
            for i, lp in zip(wanted, _logprobs(logits[at], chosen, max(self._rows[i].logprobs for i in wanted))):
                self._rows[i].token_logprobs.append(lp._replace(top=lp.top[:self._rows[i].logprobs]))
        now = time.perf_counter()
        done: list[Request] = []
        keep: list[int] = []
        for i, (r, t) in enumerate(zip(self._rows, tokens)):
            if i in failed:  # this row's sampling failed: it alone ends, with the error
                r.error = failed[i]
                done.append(r)
                self._finish(r, "error")
                continue
            r.token_ids.append(t)
            r.first_token_at = r.first_token_at or now
            self._counts["tokens"] += 1
            reason = self._progress(r)
            if reason is None:
                keep.append(i)
            else:
                done.append(r)
                self._finish(r, reason)
        self._last = tokens
        self._keep(keep)
        return done

    def _scored_pass(self, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any],
                     scored: list[tuple[int, Request]], width: int) -> torch.Tensor:
        """A pass admitting prompts that ask for their own log-probabilities: records them, returns every
        row's last-column logits. The output head computes only the positions needed (each row's last column,
        the scored prompts' columns): a pre-hook on it picks them out of its input, so a 2000-token prompt
        admitted beside 7 decoding rows costs its own [2000, vocabulary], not 8 rows' (8x the memory).
        Logit post-processing after the head (soft-capping, scaling) is elementwise and sees them alike. A
        model whose head is not that module call (the hook never sees its input) gets every column's logits."""
        rows, cols = list(range(ids.shape[0])), [width - 1] * ids.shape[0]  # each row's last column first
        spans = {}
        for k, r in scored:  # column c's logits predict column c + 1's token
            n = len(r.prompt_ids)
            spans[k] = (len(rows), len(rows) + n - 1)
            rows += [k] * (n - 1)
            cols += list(range(width - n, width - 1))
        head = self.model.get_output_embeddings() if self._keep_one else None
        picked = []

        def pick(_: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            h = args[0]
            if not (isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[:2] == ids.shape):
                return None
            picked.append(True)
            at = torch.tensor(rows, device=h.device), torch.tensor(cols, device=h.device)
            return (h[at].unsqueeze(0), *args[1:])
        hook = head.register_forward_pre_hook(pick) if isinstance(head, torch.nn.Module) else None
        if hook is not None:
            kwargs["logits_to_keep"] = 0  # every column reaches the head, which takes what it needs
        try:
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        if picked:
            flat = out.logits[0]
            last = flat[:ids.shape[0]]
            at = {k: flat[a:b] for k, (a, b) in spans.items()}
        else:
            last = out.logits[:, -1]
            at = {k: out.logits[k, width - len(r.prompt_ids):width - 1] for k, r in scored}
        for k, r in scored:
            r.prompt_token_logprobs = [None] + _logprobs(at[k], ids[k, width - len(r.prompt_ids) + 1:]
                                                         .to(last.device), r.logprobs or 0)
        return last.float()

    def _choose(self, logits: torch.Tensor) -> tuple[list[int], dict[int, Exception]]:
        """Greedy argmax per row; rows with a temperature sample from their own generator, after
        Transformers' temperature and top-p warpers (the same arithmetic ``generate`` uses). A temperature
        so small that the warped logits overflow is greedy (its limit). Returns the tokens and the rows
        whose sampling failed, by index: a row's failure ends that row, not the pass."""
        tokens = logits.argmax(-1).tolist()
        failed: dict[int, Exception] = {}
        for i, r in enumerate(self._rows):
            if r.temperature == 0:
                continue
            try:
                from transformers import TemperatureLogitsWarper, TopPLogitsWarper
                row = TemperatureLogitsWarper(r.temperature)(None, logits[i:i + 1])
                if r.top_p < 1:
                    row = TopPLogitsWarper(r.top_p)(None, row)
                probs = torch.softmax(row, dim=-1)
                if not bool(torch.isfinite(probs).all()):
                    continue
                if r._generator is None or r._generator.device != logits.device:
                    r._generator = torch.Generator(device=logits.device)
                    r._generator.manual_seed(r.seed if r.seed is not None else random.SystemRandom().getrandbits(63))
                tokens[i] = int(torch.multinomial(probs, 1, generator=r._generator))
            except Exception as e:  # noqa: BLE001 - this row's request carries the error
                failed[i] = e
        return tokens, failed

    def _progress(self, r: Request) -> str | None:
        """After a new token: the finish reason, or None; hands the text that is safe to show to on_text."""
        eos = r.token_ids[-1] in self.eos_ids and not r.ignore_eos
        reason = "stop" if eos else ("length" if len(r.token_ids) >= r.max_new_tokens else None)
        if self.tokenizer is None:
            if reason is None and r.on_text is not None:
                _call(r, "")  # token ids only: no text, but the caller learns a token came
            return reason
        text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        cut = min((p for p in (text.find(s) for s in r.stop) if p >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        r.text = text
        if reason is None:
            safe = len(text.rstrip("\ufffd"))  # half a character: wait for the rest of its bytes
            for s in r.stop:  # a tail that may become a stop string is not shown yet
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
            if r.on_text is not None:
                delta = text[r._emitted:safe] if safe > r._emitted else ""
                r._emitted += len(delta)
                _call(r, delta)
        return reason

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.finished_at = time.perf_counter()
        key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
        self._counts[key] += 1
        if r.on_text is not None:
            delta = r.text[r._emitted:] if reason in ("stop", "length") else ""
            r._emitted += len(delta)
            r._done.set()
            _call(r, delta)
        else:
            r._done.set()

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows, and gather each row's real columns right-aligned: the holes a mixed
        pass leaves, and columns only departed rows used, are dropped."""
        with self._lock:
            self._rows = [self._rows[i] for i in rows]
        self._last = [self._last[i] for i in rows]
        if not rows:
            self._cache = self._mask = None
            return
        assert self._mask is not None
        valid = self._mask[rows].bool()
        counts = valid.sum(1, keepdim=True)
        width = int(counts.max())
        columns = valid.shape[1]
        dense = valid.eq(torch.arange(columns) >= columns - counts).all()
        if len(rows) == self._mask.shape[0] and width == columns and bool(dense):
            return  # every row's tokens are already its last columns, with no holes: nothing to move
        index = torch.tensor(rows, dtype=torch.long)
        # invalid columns first, then valid ones, each in their order: the last `width` are the row's tokens
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, -width:]
        self._mask = valid.gather(1, order).long()
        for layer in self._cache.layers:
            if layer.is_initialized and layer.keys.numel():
                for name in ("keys", "values"):
                    t = getattr(layer, name)[index.to(layer.keys.device)]
                    at = order.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                    setattr(layer, name, t.gather(2, at))

    # ------------------------------------------------------------------ the engine's thread

    def start(self) -> Engine:
        """Run passes in a thread of their own while there is work (``submit`` from any thread)."""
        with self._lock:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._loop, name="offload-engine", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._rows and not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed and not self._rows and not self._queue:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the failed rows carry the error; the next requests get a fresh batch
                log.exception("offload engine: a pass failed; its requests were failed with the error")

    def cancel_all(self) -> None:
        """Cancel every waiting and running request (their rows are freed at the next pass)."""
        with self._lock:
            for r in [*self._queue, *self._rows]:
                r.cancel()
            self._lock.notify_all()

    def close(self, cancel: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; cancel (default) or finish the ones there are; stop the thread."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if cancel:
            self.cancel_all()
        if self._thread is not None:
            self._thread.join(timeout)
        elif not cancel:
            while self.busy:
                self.step()
        else:
            self.step()  # the cancelled requests are finished (their callbacks called)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_prompt(ids: Sequence[int], max_new_tokens: int, config: Any) -> None:
    """Refuse (``ValueError``) what no pass could run: an empty prompt, ids outside the vocabulary, more
    positions than a model with a position limit has (``max_position_embeddings``: OPT's learned
    positions end there; ALiBi models such as BLOOM have none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if bad := [i for i in ids if not 0 <= i < text.vocab_size]:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{text.vocab_size - 1})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise ValueError(f"a prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} is more than the "
                         f"model's {limit} positions: shorten the prompt or ask for fewer tokens")


def _call(r: Request, delta: str) -> None:
    """A callback's failure is its request's problem, never the batch's."""
    try:
        r.on_text(r, delta)  # type: ignore[misc]
    except Exception:  # noqa: BLE001
        log.exception("offload engine: on_text callback of request %s failed; cancelling it", r.id)
        r.cancel()


def _check_cache(cache: Any, model: Any) -> None:
    from transformers.cache_utils import DynamicLayer
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise ValueError(f"{type(model).__name__} uses {', '.join(sorted(odd))} cache layers (sliding window or "
                         f"linear attention): the engine batches full-attention models only")


def generate_many(model: Any, tokenizer: Any, prompts: Iterable[str | Sequence[int] | Mapping[str, Any]], *,
                  batch_size: int = 8, **defaults: Any) -> Iterator[Request]:
    """Generate for every prompt, ``batch_size`` rows per streamed pass, yielding each ``Request`` as it
    finishes (``request.index`` is its place in ``prompts``; sort by it for input order).

    A prompt is text, token ids, or a mapping with ``"prompt"`` and any of ``Engine.submit``'s keywords
    for that prompt alone (``{"prompt": "...", "max_new_tokens": 8}``); ``defaults`` are those keywords
    for every prompt. Every prompt is checked before the first pass. Passes run in the caller's thread.
    """
    engine = Engine(model, tokenizer, batch_size=batch_size)
    for i, p in enumerate(prompts):
        own = dict(p) if isinstance(p, Mapping) else {"prompt": p}
        text = own.pop("prompt")
        try:
            engine.submit(text, index=i, **{**defaults, **own})
        except (ValueError, TypeError) as e:
            raise ValueError(f"prompt {i}: {e}") from None
    while engine.busy:
        yield from engine.step()
