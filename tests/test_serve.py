"""``offload serve`` through the real ``openai`` client: a tiny Llama with a trained BPE tokenizer and a
chat template, served from a subprocess with every block streamed.

Each answer must be exactly that prompt's greedy text alone (fp32), streamed or not, however many
clients ask at once; bad requests are 4xx with OpenAI's error body and the server keeps serving; a
client that drops mid-stream frees its row; SIGINT cancels what runs and exits 0. Timeouts here are
hang guards only.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from test_engine import alone, streaming_budget, tiny_llama, tokenizer, wait_for  # noqa: F401 (tokenizer: a fixture)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NAME = "tiny-llama"


class Server:
    """``offload serve`` in a subprocess on a free port (``--port 0``: it prints the one it bound)."""

    def __init__(self, folder, cache, *args: str):
        env = dict(os.environ, OFFLOAD_CACHE=str(cache), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "offload", "serve", str(folder), "--port", "0",
                                      "--cpu-memory", streaming_budget(folder), "-q", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.port: int | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def ready(self) -> Server:
        """Wait until it listens (started servers load in parallel: each takes seconds to import torch)."""
        wait_for(lambda: self.port or self.proc.poll() is not None, "server start", timeout=120)
        assert self.port, "\n".join(self.lines)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if m := re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line):
                self.port = int(m.group(1))

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=30).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.reader.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("serve")
    tok = tokenizer
    tok.chat_template = TEMPLATE
    model = tiny_llama(len(tok))
    model.save_pretrained(root / NAME)
    tok.save_pretrained(root / NAME)
    # the second one is for the SIGINT test (one row, one place in the queue); both load at once
    server = Server(root / NAME, root / "cache", "--batch-size", "4")
    small = Server(root / NAME, root / "cache-small", "--batch-size", "1", "--max-queue", "1")
    server.ready()
    server.tokenizer = tok

    class Greedy:
        """The greedy text of a prompt alone, and the model's log-probabilities after each of its tokens."""

        def __call__(self, prompt: str | list[int], n: int) -> str:
            ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
            return tok.decode(alone(model, ids, n), skip_special_tokens=True)

        def logprobs(self, ids: list[int]):
            with torch.no_grad():
                return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    greedy = Greedy()

    def chat_ids(messages) -> list[int]:
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)
    yield server, greedy, chat_ids, small
    small.stop()
    assert server.stop() == 0, "\n".join(server.lines)


def test_completions_streamed_or_not_are_the_greedy_text(served):
    server, greedy, _, _ = served
    assert [m.id for m in server.client.models.list().data] == [NAME]
    want = greedy("the naïve café", 10)
    r = server.client.completions.create(model=NAME, prompt="the naïve café", max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens <= 10
    chunks = list(server.client.completions.create(model=NAME, prompt="the naïve café", max_tokens=10,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_uses_the_tokenizer_template(served):
    server, greedy, chat_ids, _ = served
    messages = [{"role": "user", "content": "what does the café serve?"}]
    want = greedy(chat_ids(messages), 12)
    r = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_concurrent_clients_each_get_their_own_greedy_text(served):
    server, greedy, _, _ = served
    jobs = [("the naïve café", 9, False), ("a model", 14, True), ("streaming blocks from disk while", 5, False),
            ("many prompts share each pass", 12, True), ("crème", 7, True), ("the disk, block by block", 11, False)]
    want = [greedy(p, n) for p, n, _ in jobs]

    def ask(job) -> str:
        prompt, n, stream = job
        r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=stream)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(ask, jobs)) == want
    assert server.stats()["streamed_units"] == 4  # every block streamed for them


def test_bad_requests_are_4xx_and_the_server_keeps_serving(served):
    server, greedy, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=NAME, prompt="the café", max_tokens=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="gpt-4", prompt="the café", max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and NAME in e.value.body["message"]
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny-llama", "prompt": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in r.json()["error"]["message"] and r.json()["error"]["param"] is None  # not an offset
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="positions"):  # 128 positions: too long
        server.client.completions.create(model=NAME, prompt="naïve " * 100, max_tokens=60)
    assert server.client.completions.create(model=NAME, prompt="the café", max_tokens=6,
                                            temperature=0).choices[0].text == greedy("the café", 6)


def test_a_list_no_queue_could_hold_and_a_seed_torch_cannot_take_are_400(served):
    """Retrying could never help the first (429 "busy, retry later" was the answer); the second failed every
    request sharing its pass."""
    server, greedy, _, _ = served
    queue = int(next(m.group(1) for x in server.lines if (m := re.search(r"queue (\d+)\)", x))))
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": ["a"] * (queue + 1),
                                                         "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and f"--max-queue {queue}" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2,
                                                         "seed": 2**64}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    assert server.client.completions.create(model=NAME, prompt="the café", max_tokens=6,
                                            temperature=0).choices[0].text == greedy("the café", 6)


def test_token_id_prompts_and_the_usage_chunk_of_a_stream(served):
    """OpenAI's API takes a prompt as token ids (one list, or a list of lists), and a stream with
    ``stream_options={"include_usage": True}`` ends with a chunk holding the usage (benchmark clients read both)."""
    server, greedy, _, _ = served
    ids = [5, 17, 42, 9]
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": 6,
                                                         "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(ids, 6), r.text
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [True, False], "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 400, r.text  # not ids 1 and 0
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [ids, ids[:2]], "max_tokens": 4,
                                                         "temperature": 0}, timeout=60)
    assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == [greedy(ids, 4),
                                                                                          greedy(ids[:2], 4)]
    chunks = list(server.client.completions.create(model=NAME, prompt="the café", max_tokens=5, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == greedy("the café", 5)


def test_logprobs_and_echo_as_evaluation_harnesses_ask(served):
    """lm-evaluation-harness scores a continuation with ``echo``, ``logprobs=1``, ``max_tokens=1`` on token ids
    and reads ``token_logprobs`` of the prompt's tokens (the first is null); streamed answers carry each
    token's log-probability with its text; chat answers carry ``logprobs.content`` with ``top_logprobs``."""
    server, greedy, chat_ids, _ = served
    tok = server.tokenizer
    ids = tok.encode("the naïve café serves")
    lp = greedy.logprobs(ids)
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [ids, ids[:3]], "max_tokens": 1,
                                                         "temperature": 0, "logprobs": 1, "echo": True}, timeout=60)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        n = len(ids) if c["index"] == 0 else 3
        got = c["logprobs"]
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert len(got["tokens"]) == n + 1 and got["tokens"][:n] == [tok.decode([t]) for t in ids[:n]]
        assert got["token_logprobs"][1:n] == pytest.approx([float(lp[j, ids[j + 1]]) for j in range(n - 1)], abs=1e-4)
        nxt = int(lp[n - 1].argmax())  # the generated token: greedy, the most likely
        assert got["token_logprobs"][n] == pytest.approx(float(lp[n - 1, nxt]), abs=1e-4)
        assert got["top_logprobs"][n] == {tok.decode([nxt]): pytest.approx(float(lp[n - 1, nxt]), abs=1e-4)}
        assert c["text"] == tok.decode(ids[:n]) + tok.decode([nxt], skip_special_tokens=True)
        assert got["text_offset"][1] == len(tok.decode([ids[0]]))
    chunks = list(server.client.completions.create(model=NAME, prompt="the naïve café", max_tokens=8, temperature=0,
                                                   logprobs=2, stream=True))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 8 and "".join(tokens) == "".join(c.choices[0].text for c in chunks)
    for echo in (False, True):  # where each token's text starts: the same streamed (summed chunk by chunk) or not
        ask = dict(model=NAME, prompt="the naïve café", max_tokens=8, temperature=0, logprobs=1, echo=echo)
        whole = server.client.completions.create(**ask).choices[0].logprobs.text_offset
        streamed = [o for c in server.client.completions.create(**ask, stream=True) if c.choices[0].logprobs
                    for o in c.choices[0].logprobs.text_offset]
        assert streamed == whole and len(whole) == 8 + (len(tok.encode("the naïve café")) if echo else 0)
    # two most likely by text (two byte-level halves of a character are both U+FFFD: one key)
    assert all(1 <= len(d) <= 2 for c in chunks if c.choices[0].logprobs for d in c.choices[0].logprobs.top_logprobs)
    messages = [{"role": "user", "content": "what does the café serve?"}]
    c = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3).choices[0]
    prompt = chat_ids(messages)
    first = c.logprobs.content[0]
    lp = greedy.logprobs(prompt)[-1]
    assert first.logprob == pytest.approx(float(lp.max()), abs=1e-4) and len(first.top_logprobs) == 3
    assert [t.token for t in first.top_logprobs] == [tok.decode([int(i)]) for i in lp.topk(3).indices]
    assert "".join(t.token for t in c.logprobs.content) == c.message.content
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": messages, "top_logprobs": 2},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "a", "logprobs": 21}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_a_chat_without_max_tokens_fits_what_the_prompt_leaves(served):
    """The default chat limit (256) on a 128-position model was a 400 about a max_tokens the client never sent."""
    server, greedy, chat_ids, _ = served
    messages = [{"role": "user", "content": "the café " * 20}]
    left = 128 - len(chat_ids(messages))
    assert 0 < left < 256
    r = server.client.chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert r.choices[0].message.content == greedy(chat_ids(messages), left)
    assert r.usage.completion_tokens <= left
    with pytest.raises(openai.BadRequestError) as e:  # no room left at all: about the conversation, not max_tokens
        server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "the café " * 60}])
    assert e.value.body["param"] == "messages" and "positions" in e.value.body["message"]


def test_a_client_dropping_mid_stream_frees_its_row(served):
    server, _, _, _ = served
    before = server.stats()["cancelled"]
    body = {"model": NAME, "prompt": "the café", "max_tokens": 100, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: {"))  # its first token came: it holds a row
    wait_for(lambda: server.stats()["cancelled"] == before + 1, "cancel after the client left")
    stats = server.stats()
    assert stats["active"] == 0 and stats["queued"] == 0


def test_sigint_cancels_running_requests_and_exits_0(served):
    server = served[3].ready()
    try:
        body = {"model": NAME, "prompt": "the café", "max_tokens": 100, "temperature": 0, "stream": True,
                "ignore_eos": True}
        events: list[dict] = []

        def stream() -> None:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                    elif line == "data: [DONE]":
                        events.append({"done": True})
        running = threading.Thread(target=stream)
        running.start()
        wait_for(lambda: events, "the first token of the running request")
        waiting = threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=60))
        waiting.start()
        wait_for(lambda: server.stats()["queued"] == 1, "the second request in the queue")
        with pytest.raises(openai.RateLimitError):  # the row and the one place in the queue are taken
            server.client.completions.create(model=NAME, prompt="the café", max_tokens=4)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(60) == 0, "\n".join(server.lines)
        running.join(60)
        waiting.join(60)
        assert events[-1] == {"done": True} and events[-2]["choices"][0]["finish_reason"] == "cancelled"
        assert any("offload serve: stopped;" in x for x in server.lines)
    finally:
        server.stop()


def test_serve_without_fastapi_is_one_line_before_loading(monkeypatch, capsys):
    from offload.cli import main
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", "--random", "bloom-560m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "offload[serve]"' in err[0]
    assert os.listdir(os.environ["OFFLOAD_CACHE"]) == []


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_serve_refuses_a_port_out_of_range_in_one_line(port, capsys):
    """--port 99999 was a traceback from bind() after loading (OverflowError), not a usage error."""
    from offload.cli import main
    assert main(["serve", "--random", "bloom-560m", "--port", port]) == 2
    assert "--port" in capsys.readouterr().err
    assert os.listdir(os.environ["OFFLOAD_CACHE"]) == []


def test_a_stream_of_several_prompts_ends_after_every_ones_last_text(tokenizer, monkeypatch):
    """The stream counted a request finished when it read an event and saw the request done by then: an
    event queued before the request's last, read after it, counted it twice, so the stream ended with a
    choice's last text (and its log-probabilities, its finish chunk) unsent. A loaded event loop makes that
    the usual order; made certain here: the stream reads its queue only once the engine is idle."""
    import asyncio

    from fastapi.testclient import TestClient

    from offload.cli.serve import create_app
    from offload.engine import Engine
    wait_for = asyncio.wait_for

    async def late(aw, timeout=None):  # the stream reads its events only once every request is done
        while engine.busy:
            await asyncio.sleep(0.001)
        return await wait_for(aw, timeout)
    model = tiny_llama(len(tokenizer))
    engine = Engine(model, tokenizer, batch_size=4).start()
    try:
        client = TestClient(create_app(engine, NAME))
        body = {"model": NAME, "prompt": ["the naïve café", "a model reads its weights", "disk"], "max_tokens": 8,
                "temperature": 0, "ignore_eos": True, "logprobs": 1}
        full = client.post("/v1/completions", json=body).json()["choices"]
        monkeypatch.setattr(asyncio, "wait_for", late)
        chunks = []
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        for c in full:
            got = [x["choices"][0] for x in chunks if x["choices"][0]["index"] == c["index"]]
            assert "".join(x["text"] for x in got) == c["text"]
            assert [t for x in got if x["logprobs"] for t in x["logprobs"]["tokens"]] == c["logprobs"]["tokens"]
            assert [x["finish_reason"] for x in got if x["finish_reason"]] == ["length"]
    finally:
        engine.close()
