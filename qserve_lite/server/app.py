"""The OpenAI-compatible HTTP front: the FastAPI app and its routes over an AsyncEngine.

    GET  /health  /metrics  /v1/models  /v1/models/{model}
    POST /v1/completions  /v1/chat/completions   (stream: true -> server-sent events, then data: [DONE])

Every error a client can cause is a 4xx with OpenAI's body {"error": {"message", "type", "param", "code"}}
(errors.py): the guard middleware answers 401 (bearer API key, /v1 only) and 413 (body over
max_request_bytes) before anything is parsed (middleware.py); FastAPI's JSON and schema errors become 400;
what needs the model (prompt length, vocabulary, max_tokens vs max_model_len, the chat template) is checked
before the engine sees it (serving.py, which also builds the responses and event streams).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from qserve_lite._version import __version__
from qserve_lite.server.async_engine import AsyncEngine
from qserve_lite.server.errors import ERROR_RESPONSES, APIError, install_error_handlers
from qserve_lite.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from qserve_lite.server.middleware import DEFAULT_MAX_REQUEST_BYTES, GuardMiddleware
from qserve_lite.server.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from qserve_lite.server.serving import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    Reply,
    Serving,
    chat_events,
    chat_response,
    check_chat_request,
    check_completion_request,
    collect,
    completion_events,
    completion_response,
    event_stream,
)

log = logging.getLogger("qserve_lite.server")

router = APIRouter()


def _serving(request: Request) -> Serving:
    return request.app.state.server


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(request: Request):
    if not _serving(request).engine.is_running:
        raise APIError(503, "the engine is not running")
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request):
    return Response(_serving(request).engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request):
    return ModelList(data=[_serving(request).model_card()])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model: str, request: Request):
    server = _serving(request)
    server.check_model(model)
    return server.model_card()


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def completions(req: CompletionRequest, request: Request):
    server = _serving(request)
    server.check_model(req.model)
    check_completion_request(req)
    prompts, texts = await server.completion_prompts(req)
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
    params = server.sampling_params(
        req, req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, req.logprobs, len(prompts)
    )
    prompts_n = [p for p in prompts for _ in range(req.n)]
    texts_n = [t for t in texts for _ in range(req.n)]
    reply = Reply.new("cmpl", server.model_name)
    sub = server.engine.submit(prompts_n, params, prefix=reply.id)
    echo = server.echo_texts(req, prompts_n, texts_n)
    if not req.stream:
        results = await collect(request, sub, len(prompts_n))
        return completion_response(server, req, reply, sub, results, echo)
    return event_stream(completion_events(server, req, reply, request, sub, echo))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    server = _serving(request)
    server.check_model(req.model)
    check_chat_request(req)
    ids = await server.chat_prompt(req)
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    params = server.sampling_params(req, req.max_completion_tokens or req.max_tokens, top_n, 1)
    reply = Reply.new("chatcmpl", server.model_name)
    sub = server.engine.submit([ids] * req.n, params, prefix=reply.id)
    if not req.stream:
        results = await collect(request, sub, req.n)
        return chat_response(server, req, reply, sub, results, top_n)
    return event_stream(chat_events(server, req, reply, request, sub, top_n))


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Starts the engine thread; at shutdown, aborts what is left and stops it."""
    server: Serving = app.state.server
    server.engine.start()
    log.info("serving %s (max_model_len %d)", server.model_name, server.max_model_len)
    try:
        yield
    finally:
        await server.engine.stop()


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
    app = FastAPI(
        title="qserve-lite",
        version=__version__,
        lifespan=_lifespan,
        description="OpenAI-compatible completions and chat completions over the qserve-lite engine",
    )
    app.state.server = Serving(engine, model_name, model_metadata)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_request_bytes=max_request_bytes)
    install_error_handlers(app)
    app.include_router(router)
    return app
