"""`zhjax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous batcher, and a chat page.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (OpenAI's request and response
bodies; `stream: true` sends server-sent events in OpenAI's chunk format, ending with `data: [DONE]`),
`GET /health` and the chat page at `/`. Beyond OpenAI's parameters, `top_k` and `repetition_penalty` are
accepted; any sampling setting a request leaves out takes the server's default, the seed's (temperature 0.2,
top-k 40, top-p 0.9, repetition penalty 1.1) unless the command line says otherwise. `temperature: 0` decodes
greedily. `max_tokens` defaults to `--max-new-tokens`, cut to what the context leaves.

Chat messages are rendered with the model's template by `zhjax.infer.chat.Conversation` (alpaca, alpaca2, or
the tokenizer's chat template); when the conversation does not fit the context with `max_tokens` to spare, the
oldest turns are dropped (the response header `x-zhjax-dropped-turns` says how many).

Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a body that is not a
JSON object, 404 for an unknown model or route, 413 for a prompt that does not fit the context, 422 for a
parameter of the wrong type or out of range (the message names the field); an unexpected failure is a 500 with
a one-line message, never a traceback. A client that disconnects has its request cancelled and its slot freed.

Text is made from tokens as `zhjax.infer.generate` makes it: EOS cut, stop strings cut (the row is cancelled),
and, when streaming, text that could still become a stop string or is half a UTF-8 character is held back.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhjax.infer import batcher as batching
from zhjax.infer.chat import Conversation
from zhjax.infer.generate import _cut_at_eos, _emit, _first_stop, _RowText

# ------------------------------------------------------------------------------------------- request bodies


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: _Options | None = None
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Common):
    """`POST /v1/completions`: one prompt (text or token ids) or a list of text prompts (one choice each)."""

    prompt: str | list[str] | list[int] = Field(min_length=1)


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; `content` is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {404: "not_found_error", 413: "invalid_request_error"}.get(self.status, "invalid_request_error")
        kind = "server_error" if self.status >= 500 else kind
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _field(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    body = await request.body()
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = _field(first["loc"])
        raise ApiError(422, f"{where}: {first['msg']} (got {json.dumps(first.get('input'), default=str)[:80]})",
                       param=where, code="invalid_value") from None


# ------------------------------------------------------------------------------------------- the engine side


@dataclass
class Settings:
    """Server-wide settings: the model's name, the template and the defaults of omitted request fields."""

    model_name: str
    template: str
    system_prompt: str | None = None
    max_tokens: int = 400
    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.1


@dataclass
class _Choice:
    text: _RowText
    tokens: list[int]
    request: batching.Request
    finish: str | None = None


class Server:
    """The app's state: tokenizer, batcher and settings; `create_app(server)` builds the FastAPI application."""

    def __init__(self, batcher: batching.Batcher, tokenizer, settings: Settings):
        self.batcher, self.tokenizer, self.settings = batcher, tokenizer, settings

    # ---- prompts

    def _check_model(self, body: _Common) -> None:
        if body.model is not None and body.model != self.settings.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def _budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """The new-token budget of a prompt of `n_prompt` tokens, or a 413 when it does not fit."""
        limit = self.batcher.max_seq_len
        if max_tokens is None:
            max_tokens = min(self.settings.max_tokens, limit - n_prompt)
        if max_tokens < 1 or n_prompt + max_tokens > limit:
            raise ApiError(413, f"the prompt has {n_prompt} tokens; with max_tokens {max(max_tokens, 1)} that "
                                f"exceeds the context of {limit} tokens", code="context_length_exceeded")
        return max_tokens

    def chat_prompt(self, body: ChatRequest) -> tuple[list[int], int]:
        """The prompt ids of a chat request and how many of its oldest turns were dropped to fit."""
        system, turns, pending = None, [], None
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if role == "system":
                if i != 0:
                    raise ApiError(422, f"messages[{i}].role: a system message must come first",
                                   param=f"messages[{i}].role")
                system = m.text()
            elif (role == "user") != (pending is None):
                raise ApiError(422, f"messages[{i}].role: expected {'user' if pending is None else 'assistant'} "
                                    "(turns alternate user, assistant, ..., user)", param=f"messages[{i}].role")
            elif role == "user":
                pending = m.text()
            else:
                turns.append((pending, m.text()))
                pending = None
        if pending is None:
            raise ApiError(422, "messages: the last message must be the user's", param="messages")
        conversation = Conversation(self.settings.template, system or self.settings.system_prompt, turns)
        limit = self.batcher.max_seq_len
        requested = body.max_completion_tokens or body.max_tokens
        reserve = requested or min(self.settings.max_tokens, limit // 2)
        ids, dropped = conversation.prompt_ids(self.tokenizer, pending, max(limit - reserve, 1))
        if not conversation.turns:  # prompt_ids cuts an over-long last turn to fit; here it is a 413 (`_budget`)
            ids = Conversation(self.settings.template, conversation.system_prompt).prompt_ids(
                self.tokenizer, pending)[0]
        return ids, dropped

    def _request(self, body: _Common, ids: list[int], max_tokens: int, sink) -> batching.Request:
        s = self.settings
        temperature = s.temperature if body.temperature is None else body.temperature
        return batching.Request(
            ids, max_tokens, sink, greedy=temperature == 0, temperature=temperature or 1.0,
            top_k=s.top_k if body.top_k is None else body.top_k, top_p=s.top_p if body.top_p is None else body.top_p,
            repetition_penalty=s.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
            seed=secrets.randbits(31) if body.seed is None else body.seed,
        )


def _usage(prompts: list[list[int]], completion: list[int]) -> dict:
    p, c = sum(len(x) for x in prompts), sum(completion)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Call:
    """One API call: its prompts, budgets and the stream of its choices."""

    def __init__(self, server: Server, body: _Common, prompts: list[list[int]], chat: bool, http: Request):
        self.server, self.body, self.prompts, self.chat, self.http = server, body, prompts, chat, http
        if server.batcher.failed is not None:
            raise ApiError(503, "the decoding engine failed; see the server log", code="engine_error")
        requested = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        self.max_tokens = [server._budget(len(p), requested) for p in prompts]
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.tokens = [0] * len(prompts)

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.server.settings.model_name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _choice(self, i: int, text: str, finish: str | None) -> dict:
        if self.chat:
            return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    async def _events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """Submit the prompts and yield `(choice, new text, finish_reason)` as text becomes final; cancels the
        requests when the client goes away or the caller stops iterating."""
        server, batcher, tokenizer = self.server, self.server.batcher, self.server.tokenizer
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        stops = [self.body.stop] if isinstance(self.body.stop, str) else [s for s in (self.body.stop or ()) if s]
        holdback = max((len(s) for s in stops), default=1) - 1
        choices = []
        for i, (ids, n) in enumerate(zip(self.prompts, self.max_tokens, strict=True)):
            sink = lambda new, reason, i=i: loop.call_soon_threadsafe(inbox.put_nowait, (i, new, reason))
            choices.append(_Choice(_RowText(), [], server._request(self.body, ids, n, sink)))
        # a streamed response is cancelled by starlette when its client goes; a whole one watches for it here
        gone = None if self.body.stream else asyncio.ensure_future(self._disconnected())
        try:
            for c in choices:
                batcher.submit(c.request)
            while any(c.finish is None for c in choices):
                get = asyncio.ensure_future(inbox.get())
                done, _ = await asyncio.wait({get} if gone is None else {get, gone},
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return
                i, new, reason = get.result()
                if reason == "error":
                    raise ApiError(500, "the decoding engine failed; see the server log", code="engine_error")
                c = choices[i]
                if c.finish is not None:
                    continue
                c.tokens += new
                text = tokenizer.decode(_cut_at_eos(np.asarray(c.tokens, np.int64), batcher.eos_ids, keep_eos=False),
                                        skip_special_tokens=True)
                cut = _first_stop(text, stops)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    batcher.cancel(c.request)
                c.text.text, c.text.final, c.finish = text, reason is not None, reason
                deltas: list[str] = []
                _emit(lambda _row, d, out=deltas: out.append(d), i, c.text, holdback)
                if deltas or reason:
                    yield i, "".join(deltas), reason
        finally:
            if gone is not None:
                gone.cancel()
            for c in choices:
                batcher.cancel(c.request)
            self.tokens = [len(c.tokens) for c in choices]

    async def _disconnected(self) -> None:
        while (await self.http.receive())["type"] != "http.disconnect":
            pass

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format (a comment first, so the client has its 200 at once)."""
        yield ": zhjax\n\n"
        if self.chat:
            yield _sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None} for i in range(len(self.prompts))]))
        try:
            async for i, text, finish in self._events():
                yield _sse(self._chunk([self._choice(i, text, finish)]))
        except ApiError as e:
            yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": e.code}})
            return
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            yield _sse(self._chunk([], _usage(self.prompts, self.tokens)))
        yield "data: [DONE]\n\n"

    async def complete(self) -> dict:
        """The whole response body."""
        texts, finish = [""] * len(self.prompts), [None] * len(self.prompts)
        async for i, text, reason in self._events():
            texts[i] += text
            finish[i] = reason or finish[i]
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
        else:
            choices = [self._choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
        body = self._chunk(choices, _usage(self.prompts, self.tokens))
        body["object"] = "chat.completion" if self.chat else "text_completion"
        return body

    async def respond(self, headers: dict | None = None):
        if self.body.stream:
            return StreamingResponse(self.stream(), media_type="text/event-stream", headers=headers)
        return JSONResponse(await self.complete(), headers=headers)


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of `server` (routes in the module docstring)."""
    app = FastAPI(title="zhjax serve", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}", code="internal_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("zhjax.infer").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        b, s = server.batcher, server.settings
        ok = b.failed is None
        return JSONResponse({
            "status": "ok" if ok else "error", "model": s.model_name, "template": s.template,
            "slots": b.max_batch, "active": b.active, "queued": b.queued, "max_seq_len": b.max_seq_len,
            "defaults": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_k": s.top_k,
                         "top_p": s.top_p, "repetition_penalty": s.repetition_penalty},
        }, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "zhjax"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        server._check_model(body)
        p = body.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        prompts = [server.tokenizer(x, add_special_tokens=True)["input_ids"] if isinstance(x, str) else list(x)
                   for x in p]
        vocab = server.batcher.config.vocab_size
        if any(not ids for ids in prompts):
            raise ApiError(422, "prompt: a prompt has no tokens", param="prompt")
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise ApiError(422, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        return await _Call(server, body, prompts, False, request).respond()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, ChatRequest)
        server._check_model(body)
        ids, dropped = server.chat_prompt(body)
        return await _Call(server, body, [ids], True, request).respond({"x-zhjax-dropped-turns": str(dropped)})

    return app


# ------------------------------------------------------------------------------------------- building and CLI


def build_server(decoder, tokenizer, settings: Settings, *, max_batch: int = 8, max_seq_len: int | None = None,
                 warmup: bool = True) -> Server:
    """A `Server` with a started batcher for `decoder` (`zhjax.infer.generate.Decoder`); `max_seq_len` defaults to
    the model's context, at most 2048 (every step attends over it)."""
    from zhjax.infer.generate import eos_token_ids

    config = decoder.config
    eos = eos_token_ids(config, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    batcher = batching.Batcher(decoder, max_batch=max_batch,
                               max_seq_len=max_seq_len or min(config.max_position_embeddings, 2048), eos_ids=eos,
                               pad_id=pad if pad is not None else (eos[0] if eos else 0))
    if warmup:
        batcher.warmup()
    return Server(batcher.start(), tokenizer, settings)


def serve_main(argv: list[str]) -> int:
    """`zhjax serve`: load the model once and serve the OpenAI-compatible API and the chat page."""
    import argparse
    import sys
    from pathlib import Path

    from zhjax.infer.cli import _add_model_args, _apply_ntk, _load

    parser = argparse.ArgumentParser(prog="zhjax serve", description="OpenAI-compatible server and chat page. "
                                     "The sampling flags set the defaults of requests that leave them out.")
    _add_model_args(parser, default_template=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots of the cache)")
    parser.add_argument("--max-seq-len", type=int,
                        help="tokens of prompt + answer per request (default: the model's context, at most 2048)")
    parser.add_argument("--model-name", help="the id clients pass as `model` (default: the model dir's name)")
    args = parser.parse_args(argv)
    import uvicorn

    from zhjax.infer.generate import Decoder

    model, tokenizer = _load(args)
    template = args.template or ("chat" if getattr(tokenizer, "chat_template", None) else "alpaca2")
    max_seq_len = args.max_seq_len or min(model.config.max_position_embeddings, 2048)
    _apply_ntk(args, model, max_seq_len)
    decoder = Decoder(model)
    del model  # the decoder holds its own copy of the kernels
    settings = Settings(
        model_name=args.model_name or Path(args.model).resolve().name, template=template,
        system_prompt=args.system_prompt, max_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    print(f"zhjax serve: compiling for {args.max_batch} slots of {max_seq_len} tokens ...", file=sys.stderr)
    server = build_server(decoder, tokenizer, settings, max_batch=args.max_batch, max_seq_len=max_seq_len)
    print(f"zhjax serve: {settings.model_name} ({template} template) on http://{args.host}:{args.port}/",
          file=sys.stderr)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    finally:
        server.batcher.stop()
    return 0
