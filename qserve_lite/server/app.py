"""The OpenAI-compatible HTTP front: FastAPI routes over an AsyncEngine.

    GET  /health  /metrics  /v1/models  /v1/models/{model}
    POST /v1/completions  /v1/chat/completions   (stream: true -> server-sent events, then data: [DONE])

Every error a client can cause is a 4xx with OpenAI's body {"error": {"message", "type", "param", "code"}}:
the guard middleware answers 401 (bearer API key, /v1 only) and 413 (body over max_request_bytes) before
anything is parsed; FastAPI's JSON and schema errors become 400; what needs the model (prompt length,
vocabulary, max_tokens vs max_model_len, the chat template) is checked here before the engine sees it.
A handler never waits on a step: it queues the request and reads its deltas; a client that disconnects
aborts its request, which frees its KV pages at the engine's next turn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qserve_lite import __version__
from qserve_lite.errors import QServeLiteError, SamplingError
from qserve_lite.sampling_params import SamplingParams
from qserve_lite.server.async_engine import AsyncEngine, Delta, EngineError, Submission
from qserve_lite.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from qserve_lite.server.protocol import (
    MAX_CHOICES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger("qserve_lite.server")

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
SAMPLING_EPS = 1e-5  # temperatures below this are greedy
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, type_: str | None = None
) -> dict:
    e = APIError(status, message, param, code, type_)
    return ErrorResponse(
        error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code)
    ).model_dump()


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status)


# ---- the guard: API key and body size, before anything is parsed ----


class GuardMiddleware:
    """Pure ASGI middleware (it does not buffer responses, so streaming is untouched). It checks the bearer
    key on /v1 routes, then reads the request body up to max_request_bytes (413 past it, whether announced
    by Content-Length or not) and replays it to the app."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                await self._reject(
                    send,
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                return
        limit = self.max_request_bytes
        announced = headers.get(b"content-length")
        if announced is not None:
            try:
                if int(announced) > limit:
                    await self._reject(
                        send, 413, f"the request body is larger than {limit} bytes", code="request_too_large"
                    )
                    return
            except ValueError:
                await self._reject(send, 400, "invalid Content-Length header")
                return
        chunks, size, first = [], 0, None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # a disconnect before the body was complete: let the app see it
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(
                    send, 413, f"the request body is larger than {limit} bytes", code="request_too_large"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return replay
            return await receive()

        await self.app(scope, replay_receive, send)

    @staticmethod
    async def _reject(send, status: int, message: str, code: str | None = None) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


# ---- validation errors -> OpenAI errors ----

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _param_of(loc) -> str | None:
    """'stop' / 'messages.0.content' from a pydantic location, without union-member tags."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int) or (isinstance(p, str) and _IDENT.match(p) and p not in _TYPE_TAGS):
            parts.append(str(p))
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = errors[0]
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(
            400,
            f"the request body is not valid JSON: {detail} (at position {e['loc'][-1]})",
            code="invalid_json",
        )
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return APIError(400, "the request body must be a JSON object (send Content-Type: application/json)")
    seen, parts = set(), []
    for e in errors:
        param = _param_of(e.get("loc", ()))
        text = f"{param}: {e.get('msg', 'invalid value')}" if param else e.get("msg", "invalid value")
        if text not in seen:
            seen.add(text)
            parts.append(text)
    param = _param_of(errors[0].get("loc", ())) if errors else None
    return APIError(400, "; ".join(parts[:4]) or "invalid request", param=param)


# ---- the app ----


class _Server:
    """What the routes need: the engine, its tokenizer and limits, and the served model's name."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.vocab_size
        self._token_strs: dict[int, str] = {}

    # -- request checks that need the model --

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param=param)
        if len(ids) >= self.max_model_len:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, but this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt + output): at most {self.max_model_len - 1} prompt "
                "tokens fit",
                param=param,
                code="context_length_exceeded",
            )
        bad = [t for t in ids if t >= self.vocab_size]
        if bad:
            raise APIError(
                400, f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})", param=param
            )

    def sampling_params(
        self, req, max_tokens: int | None, logprobs: int | None, n_prompts: int
    ) -> list[SamplingParams]:
        """One SamplingParams per choice (prompts x n); a seeded request gives choice i the seed + i."""
        if max_tokens is not None and max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}, but this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt + output)",
                param="max_tokens",
            )
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        temperature = 1.0 if req.temperature is None else req.temperature
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        base = dict(
            max_tokens=max_tokens or self.max_model_len,  # the engine also ends at max_model_len
            temperature=0.0 if temperature < SAMPLING_EPS else temperature,
            top_k=max(req.top_k or 0, 0),
            top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0,
            stop=stop,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logprobs=logprobs,
        )
        out = []
        for _ in range(n_prompts):
            for i in range(req.n):
                seed = None if req.seed is None else (req.seed + i) % 2**63
                try:
                    out.append(SamplingParams(seed=seed, **base))
                except SamplingError as e:
                    raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
        return out

    # -- prompts --

    async def completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
        """Token ids and texts (None for token prompts) of each prompt."""
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], str)):
            texts = [p] if isinstance(p, str) else list(p)
            if any(not t for t in texts):
                raise APIError(400, "the prompt is empty", param="prompt")
            for t in texts:
                _check_unicode(t, "prompt")
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(t) for t in texts])
        else:
            prompts = [list(p)] if isinstance(p[0], int) else [list(x) for x in p]
            texts = [None] * len(prompts)
        for ids in prompts:
            self.check_prompt(ids, "prompt")
        return prompts, texts

    async def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [
            {"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in req.messages
        ]
        for i, m in enumerate(messages):
            for key, value in m.items():
                _check_unicode(value, f"messages.{i}.{key}")
        try:
            ids = await asyncio.to_thread(self.tokenizer.encode_chat, messages, req.add_generation_prompt)
        except QServeLiteError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - a template that fails on these messages is the request's fault
            raise APIError(
                400, f"the chat template cannot render these messages: {e}", param="messages"
            ) from None
        self.check_prompt(ids, "messages")
        return ids

    # -- logprobs --

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def completion_logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int, offset: int
    ) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token, lps in zip(token_ids, logprobs, strict=False):
            s = self.token_str(token)
            out.tokens.append(s)
            out.token_logprobs.append(_finite(lps.get(token)))
            top: dict[str, float] = {}
            for t, v in list(lps.items())[
                :top_n
            ]:  # most likely first; tokens that print alike keep the first
                top.setdefault(self.token_str(t), _finite(v))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def chat_logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int
    ) -> ChatLogprobs:
        content = []
        for token, lps in zip(token_ids, logprobs, strict=False):
            s = self.token_str(token)
            top = [
                TopLogprob(
                    token=self.token_str(t), logprob=_finite(v), bytes=list(self.token_str(t).encode())
                )
                for t, v in list(lps.items())[:top_n]
            ]
            content.append(
                TokenLogprob(
                    token=s, logprob=_finite(lps.get(token)), bytes=list(s.encode()), top_logprobs=top
                )
            )
        return ChatLogprobs(content=content)


def _check_unicode(text: str, param: str) -> None:
    """JSON can carry lone surrogates (a \\ud800 escape) that no tokenizer or encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{param} is not valid Unicode text (it holds a lone surrogate)", param=param
        ) from None


def _finite(x: float | None) -> float:
    return -9999.0 if x is None or not x > -9999.0 else float(x)


def _sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


def _usage(sub: Submission, n: int) -> Usage:
    """Prompt tokens counted once per prompt (not per choice), completion tokens over all choices."""
    prompt = sum(len(p) for p in sub.prompts[::n])
    completion = sum(sub.num_output_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _abort_on_disconnect(request: Request, sub: Submission) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            sub.abort()
            return


@asynccontextmanager
async def _watch_disconnect(request: Request, sub: Submission):
    """While inside: a client disconnect aborts sub. On leaving (done, error, or cancelled because the
    client went away mid-stream): whatever has not finished is aborted, so its pages are freed."""
    watcher = asyncio.create_task(_abort_on_disconnect(request, sub))
    try:
        yield
    finally:
        watcher.cancel()
        sub.abort()


async def _collect(request: Request, sub: Submission, n_choices: int) -> list[dict]:
    """Non-streaming: the full result of every choice."""
    results = [
        {"text": [], "token_ids": [], "logprobs": [], "finish_reason": None, "stop_reason": None}
        for _ in range(n_choices)
    ]
    async with _watch_disconnect(request, sub):
        try:
            async for d in sub.deltas():
                r = results[d.index]
                r["text"].append(d.text)
                r["token_ids"] += d.token_ids
                if d.logprobs is not None:
                    r["logprobs"] += d.logprobs
                if d.finish_reason is not None:
                    r["finish_reason"], r["stop_reason"] = d.finish_reason, d.stop_reason
        except EngineError as e:
            raise APIError(e.status, str(e)) from None
    for r in results:
        r["text"] = "".join(r["text"])
    return results


def create_app(
    engine: AsyncEngine,
    model_name: str,
    *,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    model_metadata: dict | None = None,
) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine thread and, at shutdown, aborts what is left and stops it
    (uvicorn first lets in-flight requests finish, up to its timeout_graceful_shutdown). model_metadata:
    reported by /v1/models as the model's `metadata` (e.g. what random weights stand for)."""
    server = _Server(engine, model_name)

    def model_card() -> ModelCard:
        return ModelCard(id=model_name, max_model_len=server.max_model_len, metadata=model_metadata)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s (max_model_len %d)", model_name, server.max_model_len)
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(
        title="qserve-lite",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible completions and chat completions over the qserve-lite engine",
    )
    app.state.server = server
    app.add_middleware(GuardMiddleware, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be read as JSON (is it valid UTF-8?)"
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error (see the server log)"))

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if not engine.is_running:
            raise APIError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models():
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model: str):
        server.check_model(model)
        return model_card()

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of = n)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (no prompt logprobs)", param="echo")
        prompts, texts = await server.completion_prompts(req)
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
        params = server.sampling_params(
            req, req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, req.logprobs, len(prompts)
        )
        n = req.n
        prompts_n = [p for p in prompts for _ in range(n)]
        texts_n = [t for t in texts for _ in range(n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        sub = engine.submit(prompts_n, params, prefix=rid)
        echo = [
            (t if t is not None else server.tokenizer.decode(p)) if req.echo else ""
            for t, p in zip(texts_n, prompts_n, strict=True)
        ]

        def choice_logprobs(d_tokens, d_logprobs, offset):
            if req.logprobs is None:
                return None
            return server.completion_logprobs(d_tokens, d_logprobs or [], req.logprobs, offset)

        if not req.stream:
            results = await _collect(request, sub, len(prompts_n))
            choices = [
                CompletionChoice(
                    index=i,
                    text=echo[i] + r["text"],
                    finish_reason=r["finish_reason"],
                    stop_reason=r["stop_reason"],
                    logprobs=choice_logprobs(r["token_ids"], r["logprobs"], 0),
                )
                for i, r in enumerate(results)
            ]
            return CompletionResponse(
                id=rid, created=created, model=model_name, choices=choices, usage=_usage(sub, n)
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            offsets = [0] * len(prompts_n)
            async with _watch_disconnect(request, sub):
                try:
                    for i, text in enumerate(echo):
                        if text:
                            yield _sse(
                                CompletionChunk(
                                    id=rid,
                                    created=created,
                                    model=model_name,
                                    choices=[CompletionChoice(index=i, text=text)],
                                )
                            )
                    async for d in sub.deltas():
                        lp = choice_logprobs(d.token_ids, d.logprobs, offsets[d.index])
                        offsets[d.index] += len(d.text)
                        choice = CompletionChoice(
                            index=d.index,
                            text=d.text,
                            logprobs=lp,
                            finish_reason=d.finish_reason,
                            stop_reason=d.stop_reason,
                        )
                        yield _sse(
                            CompletionChunk(id=rid, created=created, model=model_name, choices=[choice])
                        )
                    if include_usage:
                        yield _sse(
                            CompletionChunk(
                                id=rid, created=created, model=model_name, choices=[], usage=_usage(sub, n)
                            )
                        )
                except EngineError as e:
                    yield _sse(error_body(e.status, str(e)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        ids = await server.chat_prompt(req)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = server.sampling_params(req, max_tokens, top_n, 1)
        n = req.n
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sub = engine.submit([ids] * n, params, prefix=rid)

        def choice_logprobs(d: Delta | dict):
            if top_n is None:
                return None
            tokens, lps = (
                (d.token_ids, d.logprobs) if isinstance(d, Delta) else (d["token_ids"], d["logprobs"])
            )
            return server.chat_logprobs(tokens, lps or [], top_n)

        if not req.stream:
            results = await _collect(request, sub, n)
            choices = [
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=r["text"]),
                    logprobs=choice_logprobs(r),
                    finish_reason=r["finish_reason"],
                    stop_reason=r["stop_reason"],
                )
                for i, r in enumerate(results)
            ]
            return ChatCompletionResponse(
                id=rid, created=created, model=model_name, choices=choices, usage=_usage(sub, n)
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(
                id=rid, created=created, model=model_name, choices=choices, usage=usage
            ).model_dump(mode="json")
            for c in body["choices"]:  # a delta carries only what it has
                c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            return _sse(body)

        async def stream() -> AsyncIterator[str]:
            async with _watch_disconnect(request, sub):
                try:
                    for i in range(n):
                        yield chunk(
                            [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
                        )
                    async for d in sub.deltas():
                        yield chunk(
                            [
                                ChatChunkChoice(
                                    index=d.index,
                                    delta=DeltaMessage(content=d.text or None),
                                    logprobs=choice_logprobs(d),
                                    finish_reason=d.finish_reason,
                                )
                            ]
                        )
                    if include_usage:
                        yield chunk([], _usage(sub, n))
                except EngineError as e:
                    yield _sse(error_body(e.status, str(e)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app


def serve(
    model: str,
    *,
    precision: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_num_seqs: int = 256,
    max_model_len: int | None = None,
    num_pages: int | None = None,
    device: str = "cpu",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    shutdown_timeout: float = 30.0,
    access_log: bool = True,
    log_level: str = "info",
    seed: int = 0,
    random_weights: str | None = None,
    tokenizer: str | None = None,
    group_size: int = 128,
) -> None:
    """Load the model and serve it until interrupted (Ctrl-C: in-flight requests get shutdown_timeout seconds
    to finish, then are aborted).

    random_weights: a shipped config name (llama-3-8b, ...) or a config.json: serve random weights of that
    shape at `precision` (default w4a8kv4; group_size for W4) with the vocabulary of `tokenizer` (default:
    `model`'s), for load tests (engine/random_engine.py). The startup line and /v1/models say so."""
    import uvicorn

    t0 = time.perf_counter()
    metadata = None
    if random_weights is not None:
        from qserve_lite.engine.random_engine import build_random_engine

        built = build_random_engine(
            random_weights,
            tokenizer or model,
            precision=precision,
            group_size=group_size,
            device=device,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            num_pages=num_pages,
            seed=seed,
        )
        engine, name, metadata = built.engine, served_model_name or built.default_name, built.metadata()
        what = f"{built.describe()}; max_model_len {engine.max_model_len}, {engine.block_manager.num_pages}"
        what += " KV pages"
    else:
        from qserve_lite.llm import LLM

        llm = LLM(
            model,
            precision,
            device=device,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            num_pages=num_pages,
            seed=seed,
        )
        engine, name = llm.engine, served_model_name or model
        what = (
            f"{model} loaded in {time.perf_counter() - t0:.1f}s ({llm.precision}, max_model_len "
            f"{engine.max_model_len}, {engine.block_manager.num_pages} KV pages)"
        )
    print(f"qserve-lite: {what}; serving as '{name}' on http://{host}:{port}/v1", flush=True)
    if metadata is not None:
        log.warning("serving RANDOM weights (outputs are random text): %s", metadata)
    app = create_app(
        AsyncEngine(engine),
        name,
        api_key=api_key,
        max_request_bytes=max_request_bytes,
        model_metadata=metadata,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
        lifespan="on",
    )
    uvicorn.Server(config).run()
