"""Sequence: one request's tokens, state, pages and output text as it moves through the engine."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from qserve_lite.errors import QServeLiteError
from qserve_lite.model.tokenizer import IncrementalDetokenizer
from qserve_lite.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued for (re)prefill: new, or preempted and to be recomputed
    RUNNING = "running"  # holds pages; decodes every step
    FINISHED = "finished"


@dataclass
class PromptEmbeds:
    """Input embeddings that replace the token embeddings at some prompt positions (a VLM's image tokens):
    prompt position positions[j] enters the model as values[j] instead of its token's embedding. values is an
    array of the runner's module ([n, hidden]; fp16 on the GPU) and stays with the sequence, so a preempted
    sequence is prefilled again with the same embeddings."""

    positions: np.ndarray  # int64 [n], increasing, each < the prompt's length
    values: object  # [n, hidden]

    def __post_init__(self):
        self.positions = np.asarray(self.positions, dtype=np.int64).reshape(-1)

    def check(self, num_prompt_tokens: int, hidden_size: int) -> None:
        """QServeLiteError unless the positions lie in the prompt, increase, and match values [n, hidden]."""
        pos, n = self.positions, len(self.positions)
        if getattr(self.values, "ndim", 0) != 2 or tuple(self.values.shape) != (n, hidden_size):
            raise QServeLiteError(f"prompt embeddings: expected values of shape [{n}, {hidden_size}] for {n} "
                                  f"positions, got {list(getattr(self.values, 'shape', []))}")
        if n and (pos[0] < 0 or pos[-1] >= num_prompt_tokens or np.any(np.diff(pos) <= 0)):
            raise QServeLiteError(f"prompt embeddings: positions must increase within the prompt's "
                                  f"{num_prompt_tokens} tokens")

    def from_position(self, first: int) -> tuple[np.ndarray, object]:
        """(positions, values) of the entries at positions >= first (a prefill that starts there)."""
        start = int(np.searchsorted(self.positions, first))
        return self.positions[start:], self.values[start:]


class Sequence:
    """token_ids = prompt + generated tokens. The first `num_cached_tokens` of them have their K/V in
    the pages of `block_table`; the rest (the whole sequence after admission or preemption, the last
    sampled token while decoding) go through the model in the next step that schedules this sequence.

    With overlapped steps, `num_pending` tokens (0 or 1) are sampled on the device but not yet known on the
    host: len(seq) counts them (positions, pages), token_ids does not. `slot` is the sequence's row in the
    engine's persistent per-sequence state (its last sampled token on the device) while it runs."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: np.random.Generator,
        prompt: str | None = None,
        detokenizer: IncrementalDetokenizer | None = None,
        stop_ids: frozenset[int] = frozenset(),
    ):
        self.seq_id = seq_id  # arrival order: lower = older (preemption takes the newest first)
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.stop_ids = stop_ids  # stop_token_ids plus EOS unless ignore_eos
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # detokenizer state: full text so far (trimmed at a stop string once one is found)
        self.detokenizer = detokenizer
        self.text = ""
        self.stream = True  # the engine reports it after every token (else only when it finishes)
        self.num_pending = 0  # tokens sampled on the device, not yet appended (overlapped steps)
        self.slot: int | None = None  # row of the persistent per-sequence state while running
        self.prompt_embeds: PromptEmbeds | None = None  # embeddings replacing some prompt tokens' (images)

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, {self.status.value}, "
            f"{self.num_prompt_tokens}+{self.num_output_tokens} tokens, pages={self.block_table})"
        )

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def ends_after_pending(self, max_model_len: int) -> bool:
        """Its pending token is certainly its last (max_tokens or max_model_len reached): schedule no more."""
        return self.num_pending > 0 and (
            len(self) - self.num_prompt_tokens >= self.params.max_tokens or len(self) >= max_model_len
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> str:
        """Add a generated token; returns the newly decoded text (empty without a detokenizer)."""
        self.token_ids.append(int(token_id))
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if self.detokenizer is None:
            return ""
        piece = self.detokenizer.add(token_id)
        self.text += piece
        return piece

    def visible_text(self) -> str:
        """The text safe to show now: while running, the tail that could still turn out to be the start of
        a stop string is held back, so streamed pieces never have to be taken back."""
        if self.is_finished or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[: max(0, len(self.text) - hold)]
