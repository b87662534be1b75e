"""Single-sequence generation on the reference forward: prefill, then one decode step per token
with a KV cache. The exact oracle for the GPU engine; also what `generate --device cpu` runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from qserve_lite.engine.sampler import sample_next
from qserve_lite.errors import QServeLiteError
from qserve_lite.model.llama import LlamaModel
from qserve_lite.model.tokenizer import IncrementalDetokenizer, Tokenizer
from qserve_lite.sampling_params import SamplingParams


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS / stop id) or "length"


def generate_tokens(
    model: LlamaModel, prompt_ids: list[int], params: SamplingParams, eos_ids: tuple[int, ...] = ()
) -> Iterator[tuple[int, str | None]]:
    """Yield (token_id, finish_reason or None) for each generated token."""
    if not prompt_ids:
        raise QServeLiteError("the prompt is empty: give at least one token")
    max_ctx = model.cfg.max_position_embeddings
    if len(prompt_ids) >= max_ctx:
        raise QServeLiteError(f"prompt has {len(prompt_ids)} tokens; the model's context is {max_ctx}")
    max_new = min(params.max_tokens, max_ctx - len(prompt_ids))
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    rng = np.random.default_rng(params.seed)
    cache = model.new_cache(batch=1, max_len=len(prompt_ids) + max_new)
    hidden = model.forward(np.asarray([prompt_ids]), cache, fresh_new_kv=True)  # as QServe's prefill
    for step in range(max_new):
        logits = model.logits(hidden[0, -1])
        token = sample_next(logits, params, rng)
        if token in stop_ids:
            yield token, "stop"
            return
        if step == max_new - 1:
            yield token, "length"
            return
        yield token, None
        hidden = model.forward(np.asarray([[token]]), cache)


def generate(
    model: LlamaModel,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    on_text: Callable[[str], None] | None = None,
) -> Completion:
    """Generate one completion; `on_text` receives text pieces as they are decoded (streaming)."""
    detok = IncrementalDetokenizer(tokenizer)
    out: list[int] = []
    reason = "length"
    for token, finish in generate_tokens(model, prompt_ids, params, tokenizer.eos_token_ids):
        if finish == "stop":
            reason = "stop"
            break
        out.append(token)
        piece = detok.add(token)
        if on_text and piece:
            on_text(piece)
        if finish:
            reason = finish
    return Completion(list(prompt_ids), out, tokenizer.decode(out), reason)
