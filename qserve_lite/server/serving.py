"""What the routes do between the HTTP layer and the engine: the checks that need the model (prompt length,
vocabulary, max_tokens vs max_model_len, the chat template), SamplingParams from a request, prompts to token
ids, log-probabilities in OpenAI's shapes, and the responses: whole bodies, or server-sent events ending in
data: [DONE].

A handler never waits on a step: it queues the request and reads its deltas; a client that disconnects
aborts its request (watch_disconnect), which frees its KV pages at the engine's next turn. A request the
engine aborts at shutdown ends like any other: a stream with a final chunk (finish_reason "abort") and
data: [DONE]; a whole response, of which nothing was sent yet, is answered 503.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from qserve_lite.engine.llm_engine import check_max_tokens
from qserve_lite.errors import QServeLiteError, SamplingError
from qserve_lite.sampling_params import SamplingParams
from qserve_lite.server.async_engine import AsyncEngine, Delta, EngineError, Submission
from qserve_lite.server.errors import APIError, error_body
from qserve_lite.server.protocol import (
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
    ModelCard,
    TokenLogprob,
    TopLogprob,
    Usage,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
SAMPLING_EPS = 1e-5  # temperatures below this are greedy
SSE_DONE = "data: [DONE]\n\n"


class Serving:
    """What the routes need: the engine, its tokenizer and limits, and the served model's name."""

    def __init__(self, engine: AsyncEngine, model_name: str, model_metadata: dict | None = None):
        self.engine = engine
        self.model_name = model_name
        self.model_metadata = model_metadata
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.vocab_size
        self._token_strs: dict[int, str] = {}

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, max_model_len=self.max_model_len, metadata=self.model_metadata)

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
        try:
            check_max_tokens(max_tokens, self.max_model_len)
        except SamplingError as e:
            raise APIError(400, str(e), param="max_tokens") from None
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
                check_unicode(t, "prompt")
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(t) for t in texts])
        else:
            prompts = [list(p)] if isinstance(p[0], int) else [list(x) for x in p]
            texts = [None] * len(prompts)
        for ids in prompts:
            self.check_prompt(ids, "prompt")
        return prompts, texts

    def echo_texts(
        self, req: CompletionRequest, prompts: list[list[int]], texts: list[str | None]
    ) -> list[str]:
        """What each choice starts with: its prompt's text with echo, else ''."""
        return [
            (t if t is not None else self.tokenizer.decode(p)) if req.echo else ""
            for t, p in zip(texts, prompts, strict=True)
        ]

    async def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [
            {"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in req.messages
        ]
        for i, m in enumerate(messages):
            for key, value in m.items():
                check_unicode(value, f"messages.{i}.{key}")
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
            out.token_logprobs.append(finite(lps.get(token)))
            top: dict[str, float] = {}
            # most likely first; tokens that print alike keep the first
            for t, v in list(lps.items())[:top_n]:
                top.setdefault(self.token_str(t), finite(v))
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
                    token=self.token_str(t), logprob=finite(v), bytes=list(self.token_str(t).encode())
                )
                for t, v in list(lps.items())[:top_n]
            ]
            content.append(
                TokenLogprob(
                    token=s, logprob=finite(lps.get(token)), bytes=list(s.encode()), top_logprobs=top
                )
            )
        return ChatLogprobs(content=content)


# ---- checks of fields we do not implement ----


def check_completion_request(req: CompletionRequest) -> None:
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (only best_of = n)", param="best_of")
    if req.echo and req.logprobs is not None:  # OpenAI's answer would hold the prompt tokens' logprobs too
        raise APIError(
            400,
            "echo together with logprobs is not supported: it asks for the prompt tokens' log-probabilities, "
            "which this server does not compute; use echo or logprobs (the generated tokens'), not both",
            param="echo",
        )


def check_chat_request(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def check_unicode(text: str, param: str) -> None:
    """JSON can carry lone surrogates (a \\ud800 escape) that no tokenizer or encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{param} is not valid Unicode text (it holds a lone surrogate)", param=param
        ) from None


def finite(x: float | None) -> float:
    return -9999.0 if x is None or not x > -9999.0 else float(x)


# ---- server-sent events and disconnects ----


def sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def usage(sub: Submission, n: int) -> Usage:
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
async def watch_disconnect(request: Request, sub: Submission):
    """While inside: a client disconnect aborts sub. On leaving (done, error, or cancelled because the
    client went away mid-stream): whatever has not finished is aborted, so its pages are freed."""
    watcher = asyncio.create_task(_abort_on_disconnect(request, sub))
    try:
        yield
    finally:
        watcher.cancel()
        sub.abort()


async def collect(request: Request, sub: Submission, n_choices: int) -> list[dict]:
    """Non-streaming: the full result of every choice."""
    results = [
        {"text": [], "token_ids": [], "logprobs": [], "finish_reason": None, "stop_reason": None}
        for _ in range(n_choices)
    ]
    async with watch_disconnect(request, sub):
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
    if any(r["finish_reason"] == "abort" for r in results):  # nothing is sent yet: the client may retry
        raise APIError(503, "the request was aborted: the server is shutting down")
    for r in results:
        r["text"] = "".join(r["text"])
    return results


# ---- responses ----


@dataclass(frozen=True)
class Reply:
    """What every body of one response shares: its id, creation time and model name."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def completion_chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(
            CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )

    def chat_chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        ).model_dump(mode="json")
        for c in body["choices"]:  # a delta carries only what it has
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return sse(body)


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _completion_logprobs(server: Serving, req: CompletionRequest, tokens, logprobs, offset: int):
    if req.logprobs is None:
        return None
    return server.completion_logprobs(tokens, logprobs or [], req.logprobs, offset)


def completion_response(
    server: Serving,
    req: CompletionRequest,
    reply: Reply,
    sub: Submission,
    results: list[dict],
    echo: list[str],
) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=i,
            text=echo[i] + r["text"],
            finish_reason=r["finish_reason"],
            stop_reason=r["stop_reason"],
            logprobs=_completion_logprobs(server, req, r["token_ids"], r["logprobs"], 0),
        )
        for i, r in enumerate(results)
    ]
    return CompletionResponse(
        id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage(sub, req.n)
    )


async def completion_events(
    server: Serving, req: CompletionRequest, reply: Reply, request: Request, sub: Submission, echo: list[str]
) -> AsyncIterator[str]:
    """The SSE stream of a completion: echoed prompts, then each delta, then the usage if asked for."""
    offsets = [0] * len(echo)
    async with watch_disconnect(request, sub):
        try:
            for i, text in enumerate(echo):
                if text:
                    yield reply.completion_chunk([CompletionChoice(index=i, text=text)])
            async for d in sub.deltas():
                lp = _completion_logprobs(server, req, d.token_ids, d.logprobs, offsets[d.index])
                offsets[d.index] += len(d.text)
                choice = CompletionChoice(
                    index=d.index,
                    text=d.text,
                    logprobs=lp,
                    finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason,
                )
                yield reply.completion_chunk([choice])
            if _include_usage(req):
                yield reply.completion_chunk([], usage(sub, req.n))
        except EngineError as e:
            yield sse(error_body(e.status, str(e)))
    yield SSE_DONE


def _chat_logprobs(server: Serving, top_n: int | None, d: Delta | dict) -> ChatLogprobs | None:
    if top_n is None:
        return None
    tokens, lps = (d.token_ids, d.logprobs) if isinstance(d, Delta) else (d["token_ids"], d["logprobs"])
    return server.chat_logprobs(tokens, lps or [], top_n)


def chat_response(
    server: Serving, req: ChatCompletionRequest, reply: Reply, sub: Submission, results: list[dict],
    top_n: int | None,
) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r["text"]),
            logprobs=_chat_logprobs(server, top_n, r),
            finish_reason=r["finish_reason"],
            stop_reason=r["stop_reason"],
        )
        for i, r in enumerate(results)
    ]
    return ChatCompletionResponse(
        id=reply.id, created=reply.created, model=reply.model, choices=choices, usage=usage(sub, req.n)
    )


async def chat_events(
    server: Serving, req: ChatCompletionRequest, reply: Reply, request: Request, sub: Submission,
    top_n: int | None,
) -> AsyncIterator[str]:
    """The SSE stream of a chat completion: each choice's role, then each delta, then the usage if asked
    for."""
    async with watch_disconnect(request, sub):
        try:
            for i in range(req.n):
                role = DeltaMessage(role="assistant", content="")
                yield reply.chat_chunk([ChatChunkChoice(index=i, delta=role)])
            async for d in sub.deltas():
                choice = ChatChunkChoice(
                    index=d.index,
                    delta=DeltaMessage(content=d.text or None),
                    logprobs=_chat_logprobs(server, top_n, d),
                    finish_reason=d.finish_reason,
                )
                yield reply.chat_chunk([choice])
            if _include_usage(req):
                yield reply.chat_chunk([], usage(sub, req.n))
        except EngineError as e:
            yield sse(error_body(e.status, str(e)))
    yield SSE_DONE
