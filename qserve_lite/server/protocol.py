"""Request and response bodies of the OpenAI-compatible API (completions, chat completions, models, errors).

Requests are validated here first (types, ranges, sizes); what needs the model (token counts, vocabulary,
max_model_len) is checked in serving.py. Every bound is finite so no value can overflow inside the engine
step, which serves every request at once. Unknown fields are ignored, as OpenAI-compatible servers do;
fields of the OpenAI API that we do not implement are accepted only at their neutral value.

Scalars are strict JSON types, as OpenAI checks them: an integer field takes a JSON integer (not true, 5.0
or "5"), a number field a JSON number (an integer too, not true or "0.5"), a boolean field true or false
(not 1 or "true").
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's chat limit)
MAX_STOP = 16  # stop strings per request: each one is searched after every token
MAX_CHOICES = 128  # prompts x n per request
INT32 = 2**31 - 1

# strict JSON scalars (module docstring): pydantic's lax mode would take true as 1 and "5" as 5
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # a JSON integer is a number too
Bool = Annotated[bool, Strict()]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: Bool = False


Stop = Annotated[str, Field(min_length=1)]
TokenId = Annotated[Int, Field(ge=0, le=INT32)]


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (vLLM's extras included: top_k, min_p,
    repetition_penalty, stop_token_ids, ignore_eos)."""

    model: str | None = Field(None, description="the served model's name (default: the served model)")
    max_tokens: Int | None = Field(None, ge=1, le=INT32, description="at most max_model_len")
    temperature: Float | None = Field(None, ge=0.0, le=1e6, description="0 = greedy; default 1")
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=-1, le=INT32, description="0 or -1 = off")
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=1024)
    ignore_eos: Bool = False
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Float | None = Field(None, gt=0.0, le=100.0)
    n: Int = Field(1, ge=1, le=MAX_CHOICES)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Float] | None = Field(None, description="not supported: only {} or null")


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. prompt: a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)
        ]
    )
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, description="not supported: only null or ''")
    best_of: Int | None = Field(None, ge=1, le=MAX_CHOICES, description="not supported: only 1 or n")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: Int | None = Field(None, ge=1, le=INT32, description="alias of max_tokens")
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: Bool = True
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: only [] or null")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')


# ---- responses ----


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qserve-lite"
    max_model_len: int | None = None
    metadata: dict | None = None  # qserve-lite's extra: what --random-weights stand for (shape, vocabulary)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    """A streamed piece of /v1/completions (OpenAI names it text_completion too)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
