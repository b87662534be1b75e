"""What a request returns: RequestOutput (one per request) holding CompletionOutputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str  # generated text so far (final once finished); stop strings trimmed
    token_ids: list[int]  # generated ids: those of a matched stop string included, a stop token id not
    finish_reason: str | None = None  # None while running; "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string, for finish_reason "stop"
    logprobs: list[dict[int, float]] | None = (
        None  # per token: {token id: logprob}, with SamplingParams.logprobs
    )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_preemptions: int = 0  # times the request was preempted (and recomputed) while running

    @property
    def text(self) -> str:
        """The first completion's text (the only one: n = 1)."""
        return self.outputs[0].text
