"""``offload serve``: an OpenAI-compatible HTTP server whose concurrent requests share each streamed pass.

One engine thread owns the model (``offload.engine.Engine``); HTTP is FastAPI on uvicorn (the
``serve`` extra). Requests join the running batch at the next pass and leave it when done, cancelled,
or when their client disconnects. Endpoints: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending in ``data: [DONE]``), and
``GET /stats`` (the engine's rows, queue and counts, and the bytes streamed).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(FastAPI's 422 validation answer included, malformed JSON too), 429 when ``--max-queue`` requests
already wait, 503 while shutting down. SIGINT/SIGTERM: stop accepting, cancel what runs (its streams
end with ``finish_reason: "cancelled"``), exit 0.

The model is loaded exactly as ``offload run`` loads it (``run.cmd_run`` with this server as its work,
and ``run.add_model_options``): the one place where a command module uses another.
"""
# No `from __future__ import annotations`: FastAPI reads the request models' annotations of the handlers
# defined inside create_app, which only resolve where they are defined.
import argparse
import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from . import run
from .options import UsageError, add_command, at_least, positive_int, require

DEFAULT_CHAT_TOKENS = 256  # OpenAI's chat endpoint has no default limit; a local server needs one
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's chat limit, vLLM's default)


def add_parser(sub: Any) -> None:
    s = add_command(sub, "serve", "serve a model over an OpenAI-compatible HTTP API (requests share each pass)",
                    "Serve a Hugging Face folder, an offload store or a random model at /v1/completions and "
                    "/v1/chat/completions (OpenAI-compatible, streaming or not). Concurrent requests join the "
                    "running batch: every streamed pass advances up to --batch-size of them. Needs the serve "
                    "extra: pip install \"offload[serve]\".")
    run.add_model_options(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=at_least(0, 65535), default=8000, help="port to bind (0: any free port, printed)")
    s.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="requests sharing each pass")
    s.add_argument("--max-queue", type=at_least(0), default=64, metavar="N",
                   help="requests that may wait for a row; one more is answered 429")
    s.add_argument("--model-name", metavar="NAME",
                   help="the model id /v1/models lists and requests must name (default: MODEL's folder name, or the "
                        "--random name)")
    # what cmd_run reads that only `run` sets
    s.set_defaults(fn=cmd_serve, prompt=None, prompts=None, output=None, plot=None, speculate=None,
                   draft_tokens=None, max_new_tokens=16)


def cmd_serve(a: argparse.Namespace) -> int:
    require("fastapi", "serve", "offload serve")  # before the model is loaded
    require("uvicorn", "serve", "offload serve")
    if not a.dry_run:
        sock = _bind(a.host, a.port)  # a port in use is refused before the model is loaded
        a.serve_socket = sock
    return run.cmd_run(a, work=_serve)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}: pass another --port (0: any free one)") \
            from None
    sock.listen(128)
    return sock


def _serve(a: argparse.Namespace, model: Any, handle: Any, tokenizer: Any, device: Any) -> int:
    import uvicorn

    from ..engine import Engine
    tok = tokenizer or run.ByteIds(model.config.get_text_config().vocab_size)
    name = a.model_name or a.random or _folder_name(a.model)
    engine = Engine(model, tok, batch_size=a.batch_size, max_queue=a.max_queue).start()
    sock: socket.socket = a.serve_socket
    host, port = sock.getsockname()[:2]
    app = create_app(engine, name, handle=handle)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)

    class Server(uvicorn.Server):
        """uvicorn's, but a signal also cancels the running requests (their streams end at the next pass,
        so shutdown does not wait for them), and is not re-raised after a clean shutdown (exit 0)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.close(cancel=True, timeout=0)
            self.force_exit = self.should_exit
            self.should_exit = True

    sock.listen(2048)  # before the line that says where: a client started by it must not be refused
    print(f"offload serve: {name} at http://{host}:{port}/v1 (batch {a.batch_size}, queue {a.max_queue}); "
          f"Ctrl-C stops", flush=True)
    try:
        Server(config).run(sockets=[sock])
    finally:
        engine.close(cancel=True)
        sock.close()
    st = engine.stats()
    print(f"offload serve: stopped; {st['finished']} requests answered, {st['cancelled']} cancelled, "
          f"{st['tokens']} tokens in {st['passes']} passes", flush=True)
    return 0


def _folder_name(path: str) -> str:
    import os
    return os.path.basename(os.path.normpath(path))


# ------------------------------------------------------------------------------ the app


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_exceeded",
            503: "service_unavailable"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str | list[int]:
    """The conversation for the model: the tokenizer's chat template when it has one (the assistant's
    turn opened; its ids as the template wrote them, no special tokens added twice), else the text
    ``role: content`` lines and ``assistant:``, encoded like a completion's prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class TokenText:
    """Tokens as text for log-probabilities: each token decoded alone (a byte-level token that is half a
    character reads as U+FFFD, as in vLLM's answers), and the two answer shapes built from them."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if (t := self._text.get(token)) is None:
            t = self._text[token] = self.tokenizer.decode([token]) if self.tokenizer is not None else ""
        return t

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def length(self, ids: list[int]) -> int:
        return sum(len(self(t)) for t in ids)

    def completion(self, pairs: list[tuple[int, Any]], start: int) -> dict[str, Any]:
        """The completions API's ``logprobs``: per token its text, log-probability, the most likely
        tokens with it (a dict by text; the token itself always among them) and where its text starts."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in pairs:
            text = self(token)
            out["tokens"].append(text)
            out["text_offset"].append(start)
            start += len(text)
            if lp is None:  # the prompt's first token: nothing before it to predict it from
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in lp.top:  # most likely first: tokens that read the same (U+FFFD halves) keep the likeliest
                top.setdefault(self(t), v)
            top.setdefault(text, lp.logprob)
            out["top_logprobs"].append(top)
        return out

    def chat(self, pairs: list[tuple[int, Any]]) -> list[dict[str, Any]]:
        """The chat API's ``logprobs.content``: per token its text, UTF-8 bytes, log-probability and the
        ``top_logprobs`` most likely tokens, most likely first."""
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return [one(token, lp.logprob) | {"top_logprobs": [one(t, v) for t, v in lp.top]} for token, lp in pairs]


def create_app(engine: Any, model_name: str, handle: Any = None) -> Any:
    """The FastAPI app over a started ``Engine`` (tests may run it in a thread of their own)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
    from starlette.exceptions import HTTPException

    from ..engine import EngineClosed, QueueFull

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        seed: int | None = Field(None, ge=-2**63, lt=2**64)
        stop: str | list[str] | None = None
        stream: bool = False
        n: int = Field(1, ge=1, le=1, description="one choice per prompt")
        ignore_eos: bool = False  # vLLM's extension: exactly max_tokens tokens (benchmarks)
        stream_options: dict[str, Any] | None = None  # {"include_usage": true}: a last chunk with the usage

    class CompletionBody(Sampling):
        prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]  # text, or token ids (as OpenAI's API)
        logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token, as vLLM allows
        echo: StrictBool = False  # the prompt before the completion (with logprobs: each prompt token's too)

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: str
        content: str | list[dict[str, Any]] | None = None

    class ChatBody(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: StrictBool = False
        top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    class Refused(Exception):
        def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
            super().__init__(message)
            self.status, self.body = status, error_body(status, message, param, code)

    app = FastAPI(title="offload", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            where = []
        else:
            message = f"{'.'.join(where) or 'body'}: {first['msg']}"
        return JSONResponse(error_body(400, message, where[0] if where else None), status_code=400)

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "offload"}]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        out: dict[str, Any] = engine.stats()
        if handle is not None:
            s = handle.stats()
            out |= {"bytes_read": s.bytes_read, "streamed_units": s.streamed_units}
        return out

    def check_model(body: Sampling) -> None:
        if body.model != model_name:
            raise Refused(400, f"model {body.model!r} is not served here: this server serves {model_name!r} "
                               f"(GET /v1/models)", "model", "model_not_found")

    def submit(prompts: list[str | list[int]], body: Sampling, max_tokens: int, queue: asyncio.Queue,
               logprobs: int | None, prompt_logprobs: bool) -> list[Any]:
        """Each prompt into the engine; its text arrives on ``queue`` as (choice, delta, request, n, last): ``n``
        tokens' log-probabilities recorded when that text came, ``last`` whether the request was done then
        (read later, ``request.done`` would end a stream on an earlier event: its last text never sent)."""
        loop = asyncio.get_running_loop()
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if engine.max_queue is not None and len(prompts) > engine.max_queue:  # no retry could ever fit it
            raise Refused(400, f"prompt: a list of {len(prompts)} prompts is more than this server ever queues "
                               f"(--max-queue {engine.max_queue}): send at most {engine.max_queue} per request", "prompt")
        requests = []
        try:
            for i, p in enumerate(prompts):
                requests.append(engine.submit(
                    p, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                    stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                    on_text=lambda r, d, i=i: loop.call_soon_threadsafe(
                        queue.put_nowait, (i, d, r, len(r.token_logprobs), r.done))))  # done as of this text
        except Exception as e:
            for r in requests:
                r.cancel()
            if isinstance(e, QueueFull):
                raise Refused(429, f"the server is busy: {e}; retry later") from None
            if isinstance(e, EngineClosed):
                raise Refused(503, "the server is shutting down") from None
            if isinstance(e, ValueError):
                raise Refused(400, str(e), "max_tokens" if "max_new_tokens" in str(e) else "prompt") from None
            raise
        return requests

    async def events(http: Request, requests: list[Any],
                     queue: asyncio.Queue) -> AsyncIterator[tuple[int, str, Any, int, bool]]:
        """(choice, delta, request, n, last) until every request's last event; a client gone cancels them (frees
        the rows)."""
        left = len(requests)
        checked = time.monotonic()
        try:
            while left:
                try:
                    i, delta, r, n, last = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    i = None
                # Checked once a second whether text arrives or not: the engine reports every token (an
                # empty delta while text is held back), so a wait alone would never see a client leave.
                if time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if i is None:
                    continue
                if last:
                    left -= 1
                yield i, delta, r, n, last
        finally:
            for r in requests:
                if not r.done:
                    r.cancel()

    def usage(requests: list[Any]) -> dict[str, int]:
        p, c = sum(len(r.prompt_ids) for r in requests), sum(len(r.token_ids) for r in requests)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def answer(http: Request, body: Sampling, prompts: list[str | list[int]], max_tokens: int, chat: bool,
                     logprobs: int | None = None, echo: bool = False) -> Any:
        queue: asyncio.Queue = asyncio.Queue()
        requests = submit(prompts, body, max_tokens, queue, logprobs, echo and logprobs is not None)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        words = TokenText(engine.tokenizer)
        # echo: the prompt as given (text), or decoded (token ids), before the completion
        echoed = [(p if isinstance(p, str) else words.decode(p)) if echo else "" for p in prompts]
        counted = [(0, 0)] * len(prompts)  # per choice: generated tokens whose texts' length is summed, that length
        prompt_lengths: dict[int, int] = {}

        def offset(i: int, a: int, prompt: bool = False) -> int:
            """The length of choice ``i``'s first ``a`` generated tokens' texts (``prompt``: its prompt's), summed
            once: a stream adds only its new tokens."""
            if prompt:
                if i not in prompt_lengths:
                    prompt_lengths[i] = words.length(requests[i].prompt_ids)
                return prompt_lengths[i]
            done, length = counted[i] if counted[i][0] <= a else (0, 0)
            length += words.length(requests[i].token_ids[done:a])
            counted[i] = (a, length)
            return length

        def scores(i: int, a: int, b: int | None, prompt: bool = False) -> dict[str, Any] | None:
            """Choice ``i``'s logprobs object for its generated tokens [a, b), after its prompt's when ``prompt``."""
            if logprobs is None:
                return None
            r = requests[i]
            pairs = list(zip(r.token_ids[a:b], r.token_logprobs[a:b]))
            if chat:
                return {"content": words.chat(pairs), "refusal": None}
            # text_offset: where a token's text starts in the answer's text, counted in the tokens' own texts
            # (streamed or not alike): from 0 at the first generated token, or at the prompt's first with echo
            start = (offset(i, 0, prompt=True) if echo else 0) + offset(i, a)
            if prompt:
                pairs = list(zip(r.prompt_ids, r.prompt_token_logprobs or [None] * len(r.prompt_ids))) + pairs
                start = 0
            return words.completion(pairs, start)

        def choice(i: int, text: str | None, finish: str | None, first: bool = False,
                   lp: dict[str, Any] | None = None) -> dict[str, Any]:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}

        with_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(choices: list[dict[str, Any]], last: bool = False) -> str:
            obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": model_name,
                   "choices": choices}
            if with_usage:  # OpenAI's shape: null on every chunk but the last, which has no choices
                obj["usage"] = usage(requests) if last else None
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                if chat:
                    yield chunk([choice(i, "", None, first=True) for i in range(len(requests))])
                sent = [0] * len(requests)  # generated tokens whose log-probabilities were sent, per choice
                echo_sent = [not echo] * len(requests)
                async for i, delta, r, n, last in events(http, requests, queue):
                    if not echo_sent[i]:  # the prompt first (its log-probabilities are in once text comes)
                        echo_sent[i] = True
                        yield chunk([choice(i, echoed[i], None, lp=scores(i, 0, 0, prompt=True))])
                    if delta or n > sent[i]:
                        yield chunk([choice(i, delta, None, lp=scores(i, sent[i], n))])
                        sent[i] = n
                    if last:
                        yield chunk([choice(i, None if chat else "", r.finish_reason)])
                if with_usage:
                    yield chunk([], last=True)
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async for _ in events(http, requests, queue):
            pass
        if not all(r.done for r in requests):
            return JSONResponse(error_body(499, "client closed the request"), status_code=499)
        if failed := [r for r in requests if r.finish_reason == "error"]:
            raise Refused(500, f"generation failed: {type(failed[0].error).__name__}: {failed[0].error}")
        if any(r.finish_reason == "cancelled" for r in requests):
            raise Refused(503, "the server is shutting down: the request was cancelled")
        choices = [choice(i, echoed[i] + r.text, r.finish_reason, lp=scores(i, 0, None, prompt=echo)) if not chat else
                   {"index": i, "message": {"role": "assistant", "content": r.text},
                    "logprobs": scores(i, 0, None), "finish_reason": r.finish_reason} for i, r in enumerate(requests)]
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices,
                "usage": usage(requests)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request) -> Any:
        check_model(body)
        p = body.prompt
        prompts: list[str | list[int]] = ([p] if isinstance(p, str) else [list(p)] if p and isinstance(p[0], int)
                                          else list(p))  # type: ignore[list-item]
        if not prompts or any(not x for x in prompts):
            raise Refused(400, "prompt: give a string, token ids, or a non-empty list of either", "prompt")
        return await answer(http, body, prompts, 16 if body.max_tokens is None else body.max_tokens, chat=False,
                            logprobs=body.logprobs, echo=body.echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request) -> Any:
        check_model(body)
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if any(part.get("type") != "text" for part in content):
                    raise Refused(400, "messages: only text content parts are supported", "messages")
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            prompt = chat_prompt(engine.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - the template's own error, in the answer
            raise Refused(400, f"messages: the chat template failed: {e}", "messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        if limit is None:  # no limit asked: ours, within the positions the prompt leaves (never a 400 about it)
            text = engine.model.config.get_text_config()
            room = getattr(text, "max_position_embeddings", None)
            n = len(engine.encode(prompt))
            if room is not None and n >= room:
                raise Refused(400, f"messages: the conversation is {n} tokens with the chat template, and the model "
                                   f"has {room} positions: shorten it", "messages")
            limit = min(DEFAULT_CHAT_TOKENS, room - n) if room is not None else DEFAULT_CHAT_TOKENS
        if body.top_logprobs is not None and not body.logprobs:
            raise Refused(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        return await answer(http, body, [prompt], limit, chat=True,
                            logprobs=(body.top_logprobs or 0) if body.logprobs else None)

    return app

