"""SamplingParams: how to pick each next token and when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qserve_lite.errors import SamplingError


@dataclass
class SamplingParams:
    """Per-request sampling and stopping.

    max_tokens: most tokens to generate. temperature: 0 = greedy (exact argmax). top_k (0 = off),
    top_p (1 = off), min_p (0 = off: drop tokens whose probability is below min_p x the top token's).
    seed: a per-request generator, so the draws do not depend on what else is in the batch.
    stop: strings that end generation; the output text is trimmed before the first one found.
    stop_token_ids: token ids that end generation (not included in the output); the model's EOS ids
    do too unless ignore_eos. repetition_penalty (1 = off; > 1 discourages tokens of the prompt and the
    output), presence_penalty / frequency_penalty (0 = off; subtract once / per occurrence in the output).
    logprobs: None = off; N = return, per generated token, the log-probabilities of the N most likely
    tokens and of the sampled one under the model's distribution (before penalties and temperature).
    """

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    stop: tuple[str, ...] | str = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self):
        checks = (
            (_is_int(self.max_tokens) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (_is_number(self.temperature) and 0.0 <= self.temperature < math.inf,
             f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"),
            (_is_int(self.top_k) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
             f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}"),
            (self.seed is None or (_is_int(self.seed) and self.seed >= 0),
             f"seed must be None or an integer >= 0, got {self.seed!r}"),
            (_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty < math.inf,
             f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}"),
            (_is_number(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2] (0 = off), got {self.presence_penalty!r}"),
            (_is_number(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2] (0 = off), got {self.frequency_penalty!r}"),
            (self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
             f"logprobs must be None or an integer >= 0, got {self.logprobs!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = stop
        try:
            self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        except (TypeError, ValueError):
            raise SamplingError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value) -> bool:
    """An integer that is not a bool (JSON's true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
