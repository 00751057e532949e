"""Many prompts per streamed pass (offload.engine, offload run --prompts).

Every completion must be token for token what ``generate`` gives that prompt alone (fp32), whatever
else shares its passes: prompts of different lengths, rows finishing and refilled at different
passes, BLOOM's ALiBi, Llama's and GPT-NeoX's RoPE, OPT's learned positions. Models are enabled with
``ram_tier=0`` (every block streams each pass).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time

import pytest
import torch

import offload
from offload.cli import main
from offload.engine import Engine, QueueFull, generate_many

from conftest import make_model

CORPUS = ["the naïve café serves crème brûlée", "a model reads its weights from the disk, block by block",
          "streaming blocks from disk while computing", "many prompts share each pass over the weights"] * 4

# (prompt length, max_new_tokens): lengths 1..23 and limits that finish rows at different passes
SHAPES = [(5, 9), (23, 4), (1, 12), (9, 6), (14, 10), (3, 3), (7, 11)]


def tiny_llama(vocab: int = 256, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).eval()


def model_for(arch: str):
    return tiny_llama() if arch == "llama" else make_model(arch)


def alone(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens for one prompt alone (generate; stops at EOS like the engine)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on a few lines (no hub)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("arch", ["bloom", "llama", "opt", "gptneox"])
def test_each_completion_is_its_prompt_greedy_alone(arch, no_thread_leak):
    model = model_for(arch)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n, _ in SHAPES]
    want = [alone(model, p, n) for p, (_, n) in zip(prompts, SHAPES)]
    with offload.enable(model, ram_tier=0) as handle:
        got = list(generate_many(model, None, [{"prompt": p, "max_new_tokens": n} for p, (_, n) in zip(prompts, SHAPES)],
                                 batch_size=3))
        assert handle.stats().streamed_units == 4 and handle.stats().bytes_read > 0
    assert sorted(r.index for r in got) == list(range(len(SHAPES)))
    by_index = {r.index: r for r in got}
    for i, w in enumerate(want):
        assert by_index[i].token_ids == w, f"prompt {i} (length {SHAPES[i][0]})"
        assert by_index[i].finish_reason == ("length" if len(w) == SHAPES[i][1] else "stop")
    # 7 prompts over 3 rows: rows were refilled, and passes were shared (fewer passes than tokens)
    assert len({r.finished_at for r in got}) > 1


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_logprobs_are_each_prompts_own_distribution(arch, no_thread_leak):
    """Generated tokens' log-probabilities (with the k most likely) and prompt tokens' (each given the ones
    before it) are those of the prompt alone, whatever shares the pass: here a prompt that asks for them
    is admitted while other rows decode, so that pass keeps every column's logits for it."""
    model = model_for(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (6, 11, 1, 9)]
    asks = [{"max_new_tokens": 7}, {"max_new_tokens": 5, "logprobs": 3, "prompt_logprobs": True},
            {"max_new_tokens": 4, "logprobs": 0}, {"max_new_tokens": 6, "logprobs": 2, "prompt_logprobs": True}]
    want = []
    for p, ask in zip(prompts, asks):
        x = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=ask["max_new_tokens"],
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            prompt_lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        want.append((out.sequences[0, len(p):].tolist(), [torch.log_softmax(s[0].float(), -1) for s in out.logits],
                     prompt_lp))
    shapes = []  # what the output head computed, per pass
    seen = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    with offload.enable(model, ram_tier=0):
        engine = Engine(model, None, batch_size=4)
        first = engine.submit(prompts[0], **asks[0])
        engine.step()  # the first row decodes while the others' prompts come in
        rest = [engine.submit(p, **ask) for p, ask in zip(prompts[1:], asks[1:])]
        while engine.busy:
            engine.step()
    seen.remove()
    # the pass admitting the scored prompts computed each row's last column and their prompt columns only,
    # not 4 rows x the widest prompt (11 columns)
    assert shapes[1] == (1, 4 + (11 - 1) + (9 - 1), 256), shapes
    for i, (r, ask, (tokens, steps, prompt_lp)) in enumerate(zip([first, *rest], asks, want)):
        assert r.token_ids == tokens, i
        k = ask.get("logprobs")
        if k is None:
            assert r.token_logprobs == [] and r.prompt_token_logprobs == []
            continue
        assert [x.token for x in r.token_logprobs] == tokens
        for x, lp in zip(r.token_logprobs, steps):
            assert x.logprob == pytest.approx(float(lp[x.token]), abs=1e-4)
            assert [t for t, _ in x.top] == lp.topk(k).indices.tolist()
            assert [v for _, v in x.top] == pytest.approx(lp.topk(k).values.tolist(), abs=1e-4)
        if not ask.get("prompt_logprobs"):
            assert r.prompt_token_logprobs == []
            continue
        assert r.prompt_token_logprobs[0] is None and len(r.prompt_token_logprobs) == len(prompts[i])
        for j, x in enumerate(r.prompt_token_logprobs[1:]):
            assert x.token == prompts[i][j + 1]
            assert x.logprob == pytest.approx(float(prompt_lp[j, x.token]), abs=1e-4)
            assert [t for t, _ in x.top] == prompt_lp[j].topk(k).indices.tolist()
    with pytest.raises(ValueError, match="logprobs"):
        engine.submit(prompts[0], logprobs=-1)


def test_stop_strings_and_streamed_text(tokenizer, no_thread_leak):
    model = tiny_llama(len(tokenizer))
    prompt = "the naïve café"
    full = tokenizer.decode(alone(model, tokenizer.encode(prompt), 16), skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and full.find(stop) > 0, full
    pieces: list[str] = []
    with offload.enable(model, ram_tier=0), Engine(model, tokenizer, batch_size=4).start() as engine:
        other = engine.submit("streaming blocks", max_new_tokens=16)
        r = engine.submit(prompt, max_new_tokens=16, stop=[stop, "never in it"],
                          on_text=lambda req, delta: pieces.append(delta)).wait(60)
        plain = engine.submit(prompt, max_new_tokens=16).wait(60)
        other.wait(60)
    assert plain.text == full and plain.finish_reason == "length"
    assert r.text == full[:full.find(stop)] and r.finish_reason == "stop"
    assert "".join(pieces) == r.text and stop not in "".join(pieces)


def test_a_stop_string_held_back_before_half_a_character_is_not_streamed():
    """The text ends in half a character ("\ufffd") after the first letter of a stop string: that letter is
    held back too (it was streamed, so the stream said more than the final text)."""
    import types
    from offload.engine import Request
    texts = iter(["ab", "ab n\ufffd", "ab n\u041c"])  # the stop "n\u041c" arrives over two more tokens
    engine = types.SimpleNamespace(eos_ids=set(), tokenizer=types.SimpleNamespace(decode=lambda ids, **k: next(texts)))
    pieces: list[str] = []
    r = Request("x", [1], index=None, max_new_tokens=9, temperature=0.0, top_p=1.0, seed=None, stop=["n\u041c"],
                ignore_eos=False, on_text=lambda req, d: pieces.append(d))
    reasons = []
    for t in range(3):
        r.token_ids.append(t)
        reasons.append(Engine._progress(engine, r))
    assert reasons == [None, None, "stop"] and r.text == "ab "
    assert "".join(pieces) == "ab " and "n" not in "".join(pieces), pieces  # held back with the half character


def test_one_rows_bad_sampling_ends_that_row_not_the_pass(tokenizer, no_thread_leak):
    """A request whose sampling fails (here: a top_p set after submit's check) ends with its error; the row
    beside it gets its greedy text. A temperature so small that the warped logits overflow is greedy, and a
    seed torch cannot take is refused at submit."""
    model = tiny_llama(len(tokenizer))
    greedy = alone(model, tokenizer.encode("the café"), 8)
    with offload.enable(model, ram_tier=0), Engine(model, tokenizer, batch_size=4) as engine:
        with pytest.raises(ValueError, match="seed"):
            engine.submit("the café", seed=2**64)
        good = engine.submit("the café", max_new_tokens=8, ignore_eos=True)
        tiny = engine.submit("the café", max_new_tokens=8, temperature=1e-45, seed=1, ignore_eos=True)
        bad = engine.submit("the café", max_new_tokens=8, temperature=1.0, seed=1)
        bad.top_p = -1.0
        while engine.busy:
            engine.step()
    assert bad.finish_reason == "error" and isinstance(bad.error, ValueError)
    assert good.token_ids == greedy[:8] and tiny.token_ids == greedy[:8]
    assert engine.stats()["errors"] == 1


def test_sampling_is_reproducible_with_a_seed(tokenizer):
    model = tiny_llama(len(tokenizer))
    greedy = alone(model, tokenizer.encode("a model reads"), 12)
    with offload.enable(model, ram_tier=0):
        runs = []
        for company in (0, 2):  # the same seed alone, then beside two other rows
            prompts = [{"prompt": "a model reads", "temperature": 1.5, "top_p": 0.9, "seed": 1234}]
            prompts += [{"prompt": "the café", "temperature": 1.0, "seed": k} for k in range(company)]
            out = {r.index: r for r in generate_many(model, tokenizer, prompts, max_new_tokens=12, ignore_eos=True)}
            runs.append(out[0].token_ids)
        other_seed = next(generate_many(model, tokenizer, [{"prompt": "a model reads", "temperature": 1.5,
                                                            "top_p": 0.9, "seed": 99}], max_new_tokens=12,
                                        ignore_eos=True)).token_ids
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert runs[0] != greedy[:12] and other_seed != runs[0]


def test_cancel_frees_the_row_and_the_queue_is_bounded(no_thread_leak):
    model = tiny_llama()
    started = []
    with offload.enable(model, ram_tier=0):
        engine = Engine(model, None, batch_size=1, max_queue=1).start()
        try:
            long = engine.submit([5, 6, 7], max_new_tokens=100, ignore_eos=True,
                                 on_text=lambda r, d: started.append(1))
            wait_for(lambda: started, "the first request's first token")  # it holds the row: the next one waits
            queued = engine.submit([8, 9], max_new_tokens=3, ignore_eos=True)
            with pytest.raises(QueueFull):
                engine.submit([10], max_new_tokens=3)
            long.cancel()
            assert long.wait(60).finish_reason == "cancelled" and len(long.token_ids) < 100
            assert queued.wait(60).finish_reason == "length" and len(queued.token_ids) == 3
            assert engine.stats()["active"] == 0 and engine.stats()["cancelled"] == 1
            with pytest.raises(ValueError, match="128 positions"):
                engine.submit([5] * 120, max_new_tokens=20)
        finally:
            engine.close()


def wait_for(condition, what: str, timeout: float = 60) -> None:
    """Poll until ``condition()`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


# ------------------------------------------------------------------------------ offload run --prompts


def save_llama(folder, tokenizer):
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def streaming_budget(folder) -> str:
    """The smallest --cpu-memory offload run accepts (it names it): the RAM tier then holds nothing."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["run", str(folder), "--dry-run", "--cpu-memory", "1"]) == 2
    return re.search(r"pass --cpu-memory (\S+) or more", err.getvalue()).group(1)


PROMPTS = [("the naïve café", None), ("a model reads its weights from the disk, block by block", 3),
           ("many", None), ("streaming blocks from disk", 9), ("crème brûlée", None), ("the disk", 2)]


def test_prompts_file_in_input_order_resumed_after_an_interrupt(tmp_path, tokenizer, capsys, monkeypatch):
    folder = tmp_path / "tiny-llama"
    model = save_llama(folder, tokenizer)
    want = [tokenizer.decode(alone(model, tokenizer.encode(p), n or 6), skip_special_tokens=True) for p, n in PROMPTS]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p} | ({"max_new_tokens": n} if n else {})) + "\n"
                               for p, n in PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["run", str(folder), "--prompts", str(prompts), "--output", str(out), "--batch-size", "3",
            "--max-new-tokens", "6", "--cpu-memory", streaming_budget(folder), "-q"]

    # 1. interrupted (Ctrl-C) once 2 rows have finished
    step, finished = Engine.step, []

    def interrupted(self):
        if len(finished) >= 2:
            raise KeyboardInterrupt
        done = step(self)
        finished.extend(done)
        return done
    monkeypatch.setattr(Engine, "step", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(kept) == len(finished) >= 2 and "run the same command again" in err
    monkeypatch.setattr(Engine, "step", step)

    # 2. the rerun submits only the others, and writes every row in input order
    submitted = []
    submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, p, **kw: submitted.append(kw["index"]) or submit(self, p, **kw))
    assert main(args) == 0
    cap = capsys.readouterr()
    assert re.search(r"streamed from disk, per token\s+disk\s+\S+ \S+\s+4", cap.out), cap.out  # every block streams
    assert f"{len(kept)} of {len(PROMPTS)} prompts already done" in cap.err
    assert sorted(submitted) == sorted(set(range(len(PROMPTS))) - {r["index"] for r in kept})
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in rows] == [p for p, _ in PROMPTS] and [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["completion"] for r in rows] == want
    assert all(r["tokens"] == (n or 6) or r["finish_reason"] == "stop" for r, (_, n) in zip(rows, PROMPTS))

    # 3. a third run has nothing left to do; stdout mode prints the same rows in order
    submitted.clear()
    assert main(args) == 0 and submitted == [] and [json.loads(x) for x in out.read_text().splitlines()] == rows
    # another token limit, or another model, would have reused these rows as its own: refused
    for other in (["--max-new-tokens", "7"], ["--dtype", "bf16"]):
        assert main(args + other) == 2 and submitted == []
        assert "pass another --output" in capsys.readouterr().err
    capsys.readouterr()
    assert main(args[:4] + args[6:]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in printed] == want


@pytest.mark.parametrize("content, line, what", [
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n', 3, "not JSON"),
    ('{"prompt": "a"}\n\n{"text": "b"}\n', 3, "unknown key 'text'"),
    ('{"prompt": "a"}\n{"prompt": "b", "max_new_tokens": -1}\n', 2, "whole number >= 1"),
    ('{"prompt": "a"}\n["b"]\n', 2, "not an object"),
    ('{"prompt": ""}\n', 1, "non-empty string"),
])
def test_a_bad_prompts_line_is_named_before_any_work(tmp_path, capsys, content, line, what):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    assert main(["run", "--random", "bloom-560m", "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{prompts}:{line}: " in err[0] and what in err[0], err
    assert os.listdir(os.environ["OFFLOAD_CACHE"]) == []  # nothing written: no random checkpoint, no store


def test_a_model_whose_cache_the_engine_cannot_batch_is_refused_when_the_engine_is_made():
    """Mamba (linear attention) and sliding-window layers: refused at construction (``offload serve`` then stops in
    one line), not by a 500 for every request at its first pass."""
    import transformers as tf
    torch.manual_seed(0)
    mamba = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4))
    with pytest.raises(ValueError, match="full-attention models only"):
        Engine(mamba, None)
    cfg = tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0,
                         layer_types=["sliding_attention"] * 2)
    with pytest.raises(ValueError, match="full-attention models only"):
        Engine(tf.Qwen2ForCausalLM(cfg), None)


def test_prompts_files_are_split_at_newlines_only(tmp_path):
    """U+2028 inside a JSON string, a form feed or NEL inside a text prompt: one prompt each, numbered as the file's
    lines (``str.splitlines`` split there too, refusing valid JSON lines); CRLF line ends are line ends."""
    from offload.cli.run import read_prompts
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\u2028b"}\r\n\n{"prompt": "c\x85d"}\n', encoding="utf-8")
    assert [(j.line, j.prompt) for j in read_prompts(str(jsonl))] == [(1, "a\u2028b"), (3, "c\x85d")]
    text = tmp_path / "p.txt"
    text.write_text("a naive\x0ccafe\r\nsecond\n", encoding="utf-8")
    assert [(j.line, j.prompt) for j in read_prompts(str(text))] == [(1, "a naive\x0ccafe"), (2, "second")]
    # a byte-order mark (Windows editors write one) hid the first line's "{": the JSON was read as a prompt
    jsonl.write_text('\ufeff{"prompt": "a", "max_new_tokens": 3}\n{"prompt": "b"}\n', encoding="utf-8")
    assert [(j.prompt, j.max_new_tokens) for j in read_prompts(str(jsonl))] == [("a", 3), ("b", None)]
    text.write_text("\ufeffa naive cafe\n", encoding="utf-8")
    assert [j.prompt for j in read_prompts(str(text))] == ["a naive cafe"]


def test_a_prompt_too_long_for_the_model_is_named(tmp_path, tokenizer, capsys):
    folder = tmp_path / "tiny-llama"
    save_llama(folder, tokenizer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the café\n" + "naïve " * 150 + "\n")
    assert main(["run", str(folder), "--prompts", str(prompts), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: a prompt of " in err and "128 positions" in err and "building store" not in err
