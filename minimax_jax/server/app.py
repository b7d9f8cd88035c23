"""The OpenAI-compatible FastAPI app: /v1/completions, /v1/chat/completions, /v1/models,
sglang's native /generate and /get_model_info, /flush_cache, /health and /metrics, over an
AsyncEngine.

Every 4xx answer is an OpenAI error body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minimax_jax.engine.async_engine import AsyncEngine, EngineClosed, StreamDelta
from minimax_jax.engine.engine import RequestError
from minimax_jax.engine.scheduler import Request as EngineRequest
from minimax_jax.server.metrics import ServerMetrics
from minimax_jax.server.native import GenerateRequest, generate_result
from minimax_jax.server.protocol import (
    REQUEST_FIELDS, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatLogprobs, ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob, CompletionChoice,
    CompletionLogprobs, CompletionRequest, CompletionResponse, DeltaMessage, ModelCard, ModelList,
    OpenAIError, REASONING_PARSERS, ReasoningSplitter, ThinkPrefixer, TopLogprob, UsageInfo, new_id, now,
    openai_finish_reason)
from minimax_jax.server.tool_calls import TOOL_CALL_PARSERS, ToolCallSplitter

T = TypeVar("T")
DEFAULT_COMPLETION_MAX_TOKENS = 16         # OpenAI's default for /v1/completions
GUARDED_PATHS = ("/v1", "/generate", "/get_model_info", "/flush_cache")   # what --api-key protects
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    reasoning_parser: str | None = None        # a REASONING_PARSERS name: "minimax" splits <think>...</think>
                                               # into reasoning_content, "minimax-append-think" keeps it in content
    tool_call_parser: str | None = None        # "minimax-m2": <minimax:tool_call> blocks -> tool_calls
    max_request_bytes: int = 8 * 2**20


def create_app(engine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig) -> FastAPI:
    """The app starts the engine thread on startup and stops it on shutdown."""
    if config.reasoning_parser not in (None, *REASONING_PARSERS):
        raise ValueError(f"unknown reasoning parser {config.reasoning_parser!r}")
    if config.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
        raise ValueError(f"unknown tool call parser {config.tool_call_parser!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="minimax-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    serving, native = OpenAIServing(engine, config), NativeServing(engine, config)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_request_bytes=config.max_request_bytes)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        pages = await engine.flush_cache()
        return JSONResponse({"status": "ok", "flushed_pages": pages})

    @app.get("/v1/models")
    async def models() -> ModelList:
        return serving.models()

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await native.generate(body, request)

    @app.get("/get_model_info")
    async def model_info() -> Response:
        return JSONResponse(native.model_info())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat_completions(body, request)

    return app


# -- request handling ----------------------------------------------------------------------------

class _Serving:
    """What both APIs' handlers share: the engine, the config, tokenising a text prompt."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.created = now()

    def _check_alive(self) -> None:
        if not self.engine.is_alive:
            raise EngineClosed("the engine is not running")

    def _encode(self, text: str) -> list[int]:
        if self.engine.tokenizer is None:
            raise OpenAIError(400, "this model has no tokenizer: give the prompt as token ids", "prompt")
        return self.engine.tokenizer.encode(text)

    async def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids: text is tokenised off the event loop."""
        return await asyncio.to_thread(self._encode, prompt) if isinstance(prompt, str) else list(prompt)

    async def _generate_all(self, request: Request, reqs: list[EngineRequest]) -> list[StreamDelta]:
        """Every request's whole output, or all of them aborted if the client goes away."""
        return await _unless_disconnected(request, asyncio.gather(*(self.engine.generate(r) for r in reqs)))

    def _token_text(self, token: int) -> str:
        return self._text([token])

    def _text(self, ids: list[int]) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode(ids) if tokenizer is not None else "".join(f"<{t}>" for t in ids)


class OpenAIServing(_Serving):

    def models(self) -> ModelList:
        card = ModelCard(id=self.config.served_model_name, created=self.created,
                         root=self.engine.loaded_from, max_model_len=self.engine.context_length)
        return ModelList(data=[card])

    def _check(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self._check_alive()
        if body.model is not None and body.model != self.config.served_model_name:
            raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves "
                                   f"{self.config.served_model_name!r}", "model", "model_not_found")
        error = body.unsupported()
        if error is not None:
            raise error

    # -- /v1/completions --

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(body)
        prompts = body.prompts()
        rid, reqs = new_id("cmpl"), []
        names = {"prompt": "prompt", "input_ids": "prompt", "max_new_tokens": "max_tokens",
                 "top_logprobs_num": "logprobs"}
        echoes = []         # each choice's prompt text, with echo
        for prompt in prompts:
            ids = await self._prompt_ids(prompt)
            default = min(DEFAULT_COMPLETION_MAX_TOKENS, self.engine.context_length - len(ids))
            if body.echo:
                echoes += [prompt if isinstance(prompt, str) else self._text(ids)] * body.n
            for choice in range(body.n):
                params = body.sampling_params(_max_tokens(body.max_tokens, default), body.logprobs or 0, choice)
                reqs.append(self._make_request(ids, params, _choice_rid(rid, len(reqs), len(prompts) * body.n), names,
                                               logprob_start_len=0 if body.scores_prompt else -1))
        created, model = now(), self.config.served_model_name
        if body.stream:
            return _sse(_choices_then_usage(
                reqs, functools.partial(self._completion_choice_chunks, body, rid, created, model, echoes), body,
                lambda usage: CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage)))
        outs = await self._generate_all(request, reqs)
        choices = [CompletionChoice(
            index=index, text=(echoes[index] if body.echo else "") + out.text,
            finish_reason=openai_finish_reason(out.finish_reason),
            logprobs=None if body.logprobs is None else self._completion_logprobs(
                out, body.logprobs, 0, req.prompt_ids if body.echo else None),
            token_ids=out.token_ids if body.return_token_ids else None,
            prompt_token_ids=req.prompt_ids if body.return_token_ids else None)
            for index, (req, out) in enumerate(zip(reqs, outs))]
        return _json(CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                        usage=UsageInfo.of(outs, body.n)))

    async def _completion_choice_chunks(self, body: CompletionRequest, rid: str, created: int, model: str,
                                        echoes: list[str], req: EngineRequest, index: int,
                                        lasts: list[StreamDelta | None]) -> AsyncIterator[BaseModel]:
        """One choice's chunks; with echo the first carries the prompt (and its scored tokens)."""
        offset, echo = 0, body.echo
        async with contextlib.aclosing(self.engine.generate_stream(req)) as stream:
            async for delta in stream:
                lasts[index] = delta
                if not (echo or delta.text or delta.finished or body.return_token_ids or body.logprobs is not None):
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = self._completion_logprobs(delta, body.logprobs, offset, req.prompt_ids if echo else None)
                    offset += sum(len(t) for t in logprobs.tokens)
                choice = CompletionChoice(
                    index=index, text=(echoes[index] if echo else "") + delta.text, logprobs=logprobs,
                    finish_reason=openai_finish_reason(delta.finish_reason),
                    token_ids=delta.token_ids if body.return_token_ids else None)
                echo = False
                yield CompletionResponse(id=rid, created=created, model=model, choices=[choice])

    def _completion_logprobs(self, delta: StreamDelta, top: int, offset: int,
                             echoed: list[int] | None = None) -> CompletionLogprobs:
        """The delta's tokens, their logprobs, top alternatives and text offsets; echoed: the
        prompt's tokens go first, scored by the engine (the first one has none)."""
        ids, logprobs, alternatives = delta.token_ids, delta.logprobs, delta.top_logprobs
        if echoed is not None:
            ids, logprobs = echoed + ids, delta.input_logprobs + logprobs
            alternatives = (delta.input_top_logprobs or [None] * len(echoed)) + alternatives
        tokens = [self._token_text(t) for t in ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        tops = None
        if top:
            tops = [None if alts is None else {self._token_text(t): lp for lp, t in alts[:top]}
                    for alts in alternatives]
        return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)

    # -- /v1/chat/completions --

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check(body)
        ids = await asyncio.to_thread(self._encode_chat, body)
        max_tokens = _max_tokens(body.requested_max_tokens, self.engine.context_length - len(ids))
        top = (body.top_logprobs or 0) if body.logprobs else 0
        names = {"prompt": "messages", "input_ids": "messages", "max_new_tokens": body.max_tokens_field,
                 "top_logprobs_num": "top_logprobs"}
        rid = new_id("chatcmpl")
        reqs = [self._make_request(ids, body.sampling_params(max_tokens, top, choice), _choice_rid(rid, choice, body.n),
                                   names) for choice in range(body.n)]
        created, model = now(), self.config.served_model_name
        if body.stream:
            return _sse(_choices_then_usage(
                reqs, functools.partial(self._chat_choice_chunks, body, rid, created, model), body,
                lambda usage: ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)))
        outs = await self._generate_all(request, reqs)
        return _json(ChatCompletionResponse(
            id=rid, created=created, model=model,
            choices=[self._chat_choice(body, out, top, index) for index, out in enumerate(outs)],
            usage=UsageInfo.of(outs, body.n), prompt_token_ids=ids if body.return_token_ids else None))

    def _chat_choice(self, body: ChatCompletionRequest, out: StreamDelta, top: int, index: int) -> ChatChoice:
        reasoning, content = None, out.text
        if parser := self._reasoning_parser():
            reasoning, content = parser.feed(out.text, final=True)
        calls = []
        if tool_calls := self._tool_call_splitter(body):
            content, calls = tool_calls.feed(content, final=True)
            content = content.strip() or None if calls else content
        return ChatChoice(
            index=index,
            message=ChatResponseMessage(content=content, reasoning_content=reasoning or None, tool_calls=calls or None),
            logprobs=self._chat_logprobs(out, top) if body.logprobs else None,
            finish_reason=_chat_finish_reason(out.finish_reason, bool(calls)),
            token_ids=out.token_ids if body.return_token_ids else None)

    async def _chat_choice_chunks(self, body: ChatCompletionRequest, rid: str, created: int, model: str,
                                  req: EngineRequest, index: int,
                                  lasts: list[StreamDelta | None]) -> AsyncIterator[BaseModel]:
        def chunk(choice: ChatStreamChoice) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

        splitter = self._reasoning_parser()
        tool_calls = self._tool_call_splitter(body)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""),
                                     token_ids=[] if body.return_token_ids else None))
        called = 0
        async with contextlib.aclosing(self.engine.generate_stream(req)) as stream:
            async for delta in stream:
                lasts[index] = delta
                reasoning, content = splitter.feed(delta.text, delta.finished) if splitter else ("", delta.text)
                calls = []
                if tool_calls:
                    content, calls = tool_calls.feed(content, delta.finished)
                    calls = [dict(call, index=called + i) for i, call in enumerate(calls)]
                    called += len(calls)
                if not (reasoning or content or calls or delta.finished or body.return_token_ids or body.logprobs):
                    continue
                yield chunk(ChatStreamChoice(
                    index=index,
                    delta=DeltaMessage(content=content or None, reasoning_content=reasoning or None,
                                       tool_calls=calls or None),
                    logprobs=self._chat_logprobs(delta, top) if body.logprobs else None,
                    finish_reason=_chat_finish_reason(delta.finish_reason, called > 0),
                    token_ids=delta.token_ids if body.return_token_ids else None))

    def _reasoning_parser(self) -> ReasoningSplitter | ThinkPrefixer | None:
        """A fresh parser of one output's reasoning, if the server parses it."""
        name = self.config.reasoning_parser
        return REASONING_PARSERS[name]() if name else None

    def _tool_call_splitter(self, body: ChatCompletionRequest) -> ToolCallSplitter | None:
        """A splitter of the output's tool calls, if the server parses them and the request
        offers tools."""
        tools = body.offered_tools() if self.config.tool_call_parser else None
        return ToolCallSplitter(tools) if tools else None

    def _chat_logprobs(self, delta: StreamDelta, top: int) -> ChatLogprobs:
        def entry(token: int, logprob: float) -> TopLogprob:
            text = self._token_text(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

        content = []
        for i, (token, logprob) in enumerate(zip(delta.token_ids, delta.logprobs)):
            alternatives = delta.top_logprobs[i][:top] if top else []
            content.append(ChatTokenLogprob(**entry(token, logprob).model_dump(),
                                            top_logprobs=[entry(t, lp) for lp, t in alternatives]))
        return ChatLogprobs(content=content)

    # -- shared --

    def _encode_chat(self, body: ChatCompletionRequest) -> list[int]:
        if self.engine.tokenizer is None:
            raise OpenAIError(400, "this model has no tokenizer, so it cannot render chat messages", "messages")
        messages, tools = body.template_inputs()
        try:
            return self.engine.tokenizer.encode_chat(messages, tools)
        except Exception as e:      # jinja TemplateError, or tool call arguments that are not JSON
            raise OpenAIError(400, f"cannot render the messages: {e}", "messages") from None

    def _make_request(self, ids: list[int], params: dict[str, Any], rid: str,
                      names: dict[str, str], logprob_start_len: int = -1) -> EngineRequest:
        """Engine validation; RequestError params are renamed to the OpenAI field names."""
        try:
            return self.engine.make_request(input_ids=ids, sampling_params=params, rid=rid,
                                            logprob_start_len=logprob_start_len)
        except RequestError as e:
            message, param = str(e), names.get(e.param, e.param)
            for engine_name, openai_name in names.items():
                if engine_name not in ("prompt", "input_ids"):
                    message = message.replace(engine_name, openai_name)
            raise OpenAIError(400, message, param) from None


class NativeServing(_Serving):
    """sglang's native API (wire format: `server.native`)."""

    def model_info(self) -> dict[str, Any]:
        return {"model_path": self.config.served_model_name, "is_generation": True,
                "context_length": self.engine.context_length}

    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        self._check_alive()
        error = body.unsupported()
        if error is not None:
            raise error
        prompts = body.prompts()
        reqs = []
        for prompt, (params, rid) in zip(prompts, body.per_prompt(len(prompts))):
            ids = await self._prompt_ids(prompt)
            reqs.append(self.engine.make_request(input_ids=ids, sampling_params=params, rid=rid,
                                                 logprob_start_len=body.prompt_logprobs_from))
        if body.stream:
            return _sse(_merged([self._chunks(body, req, index) for index, req in enumerate(reqs)]))
        outs = await self._generate_all(request, reqs)
        results = [generate_result(req.rid, out.text, out.token_ids, out, self._logprobs(body, out), i,
                                   self._input_logprobs(body, req, out))
                   for i, (req, out) in enumerate(zip(reqs, outs))]
        return JSONResponse([r.model_dump() for r in results]) if body.is_batch else _json(results[0])

    async def _chunks(self, body: GenerateRequest, req: EngineRequest, index: int = 0) -> AsyncIterator[BaseModel]:
        text, ids, logprobs, scored = "", [], [] if body.return_logprob else None, None
        async with contextlib.aclosing(self.engine.generate_stream(req)) as stream:
            async for delta in stream:
                text, ids = text + delta.text, ids + delta.token_ids
                if logprobs is not None:
                    logprobs = logprobs + self._logprobs(body, delta)
                scored = scored or self._input_logprobs(body, req, delta)
                if delta.text or delta.token_ids or delta.finished:
                    yield generate_result(req.rid, text, ids, delta, logprobs, index, scored)

    def _input_logprobs(self, body: GenerateRequest, req: EngineRequest,
                        delta: StreamDelta) -> dict[str, list] | None:
        """meta_info's input_token_logprobs ([logprob or None, token id, text or None] of each
        prompt token from logprob_start_len) and, with top_logprobs_num, input_top_logprobs."""
        if delta.input_logprobs is None:
            return None
        text = self._token_text if body.return_text_in_logprobs else (lambda _: None)
        scored = req.prompt_ids[req.logprob_start_len:]
        out = {"input_token_logprobs": [[lp, t, text(t)] for lp, t in zip(delta.input_logprobs, scored)]}
        if req.params.top_logprobs_num:
            out["input_top_logprobs"] = [None if alts is None else [[lp, t, text(t)] for lp, t in alts]
                                         for alts in delta.input_top_logprobs]
        return out

    def _logprobs(self, body: GenerateRequest, delta: StreamDelta) -> list[list[Any]] | None:
        """[logprob, token id, text or None] of each of the delta's tokens, with return_logprob."""
        if not body.return_logprob:
            return None
        text = self._token_text if body.return_text_in_logprobs else (lambda _: None)
        return [[lp, t, text(t)] for lp, t in zip(delta.logprobs, delta.token_ids)]


def _max_tokens(requested: int | None, default: int) -> int:
    return requested if requested is not None else max(default, 1)


def _choice_rid(rid: str, index: int, choices: int) -> str:
    """The engine request id of one of a response's choices: the response's id when it has one."""
    return rid if choices == 1 else f"{rid}-{index}"


async def _choices_then_usage(reqs: list[EngineRequest], choice_chunks: Callable[..., AsyncIterator[BaseModel]],
                              body: CompletionRequest | ChatCompletionRequest,
                              usage_chunk: Callable[[UsageInfo], BaseModel]) -> AsyncIterator[BaseModel]:
    """Every choice's chunks (choice_chunks(req, index, lasts), which keeps lasts[index], the
    choice's last delta) as they come, then with stream_options.include_usage one chunk of the
    usage of all of them."""
    lasts: list[StreamDelta | None] = [None] * len(reqs)
    async for chunk in _merged([choice_chunks(req, index, lasts) for index, req in enumerate(reqs)]):
        yield chunk
    if body.include_usage and all(lasts):
        yield usage_chunk(UsageInfo.of(lasts, body.n))


async def _merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators as each comes (a response's choices streamed
    together); an iterator's error is raised here; leaving early closes every iterator."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put((item, None))
        except Exception as e:      # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((done, e))
            return
        await queue.put((done, None))

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        for _ in tasks:
            while True:
                item, error = await queue.get()
                if error is not None:
                    raise error
                if item is done:
                    break
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits work; if the client goes away first, cancels it (which aborts the request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _ClientGone()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ClientGone(Exception):
    pass


def _chat_finish_reason(finish: dict | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" where the output called tools and stopped by itself."""
    reason = openai_finish_reason(finish)
    return "tool_calls" if called and reason == "stop" else reason


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield b"data: " + chunk.model_dump_json().encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# -- errors --------------------------------------------------------------------------------------

_STATUS_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(OpenAIError(status, message, param, code, type).body(), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation_error(exc.errors()[0])
        return _error_response(400, message, param)

    @app.exception_handler(RequestError)
    async def engine_request_error(request: Request, exc: RequestError) -> Response:
        return _error_response(400, str(exc), exc.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error_response(exc.status_code, str(exc.detail), code=_STATUS_CODES.get(exc.status_code))

    @app.exception_handler(EngineClosed)
    async def engine_closed(request: Request, exc: EngineClosed) -> Response:
        return _error_response(503, str(exc), type="server_error", code="engine_closed")

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)


def _describe_validation_error(error: dict[str, Any]) -> tuple[str, str | None]:
    """(message, param) of a pydantic / FastAPI validation error."""
    if error["type"] == "json_invalid":
        return f"malformed JSON body: {error.get('ctx', {}).get('error', 'decode error')}", None
    loc = list(error["loc"])
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = _param_path(loc)
    if param is None:
        return f"the request body must be a JSON object: {error['msg']}", None
    return f"{param}: {error['msg']}", param


def _param_path(loc: list[Any]) -> str | None:
    """'messages[0].content' from a pydantic loc; stops at union-branch tags such as 'list[int]'."""
    path = ""
    for part in loc:
        if isinstance(part, int) and path:
            path += f"[{part}]"
        elif isinstance(part, str) and (part in REQUEST_FIELDS or part in GenerateRequest.model_fields):
            path += f".{part}" if path else part
        else:
            break
    return path or None


# -- middleware ----------------------------------------------------------------------------------

class GuardMiddleware:
    """API key check on /v1/* (before anything else is read), then the request body size limit."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_request_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith(GUARDED_PATHS) and not self._authorised(headers):
            response = _error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                       code="invalid_api_key")
            return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            response = _error_response(413, self._too_large(), code="request_too_large")
            return await response(scope, receive, send)
        await self.app(scope, self._limited(receive), send)

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes} bytes"

    def _limited(self, receive: Receive) -> Receive:
        """Counts a body sent without Content-Length (chunked) against the limit."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large())
            return message
        return limited_receive

