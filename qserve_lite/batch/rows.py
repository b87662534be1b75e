"""The rows of `qserve-lite batch`: one JSON object per line of an input shard (JSONL).

    {"id": "q1", "prompt": "The capital of France is"}
    {"id": 7, "prompt": [128000, 791, 6864]}                                   # token ids
    {"messages": [{"role": "user", "content": "Name three primes."}], "sampling_params": {"max_tokens": 64}}

- `prompt` (text, or a list of token ids) or `messages` (a conversation for the chat template), not both.
- `id` (a string or an integer; default "<shard>:<line>"): unique within the shard.
- `sampling_params` (optional): SamplingParams fields over the run's defaults: max_tokens, temperature,
  top_k, top_p, min_p, seed, stop, stop_token_ids, ignore_eos, repetition_penalty, presence_penalty,
  frequency_penalty.
- Other keys are ignored. Blank lines are skipped (they are not rows).

A row that breaks these rules (not JSON, no prompt, a bad value, an id seen before) is a `Row` with `error`
set: recorded in the output as {"id", "line", "error"}, never fatal.

Seeds: a row without a seed gets one derived from the run's seed and its id, so sampled rows give the same
text however the rows are batched, split over workers or resumed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qserve_lite.errors import QServeLiteError
from qserve_lite.sampling_params import SamplingParams

SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class Row:
    line: int  # 1-based line number in the shard
    key: str  # str(id): the row's key in the partial log
    id: str | int
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    params: SamplingParams | None = None
    error: str | None = None

    def error_record(self) -> dict:
        return {"id": self.id, "line": self.line, "error": self.error}


def row_seed(run_seed: int, row_id: str) -> int:
    """The seed of a row that has none: from the run's seed and the row's id."""
    digest = hashlib.sha256(f"{run_seed}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _prompt_of(obj: dict) -> tuple[str | list[int] | None, list[dict] | None]:
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise QServeLiteError("a row needs exactly one of 'prompt' (text or token ids) and 'messages'")
    if messages is not None:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise QServeLiteError("'messages' must be a non-empty list of {\"role\": str, \"content\": str}")
        return None, messages
    if isinstance(prompt, str):
        if not prompt:
            raise QServeLiteError("'prompt' is empty")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                    for t in prompt):
        return prompt, None
    raise QServeLiteError("'prompt' must be a non-empty string or a non-empty list of integer token ids")


def _params_of(obj: dict, defaults: dict, run_seed: int, key: str) -> SamplingParams:
    over = obj.get("sampling_params", {})
    if not isinstance(over, dict):
        raise QServeLiteError("'sampling_params' must be an object")
    unknown = sorted(set(over) - set(SAMPLING_KEYS))
    if unknown:
        raise QServeLiteError(f"unknown sampling_params {', '.join(unknown)} "
                              f"(known: {', '.join(SAMPLING_KEYS)})")
    values = dict(defaults, **over)
    if values.get("seed") is None:
        values["seed"] = row_seed(run_seed, key)
    for name in ("stop", "stop_token_ids"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return SamplingParams(**values)


def parse_row(raw: str, line: int, shard_name: str, defaults: dict, run_seed: int) -> Row:
    """One line -> a Row (with `error` set when it is bad)."""
    default_id = f"{shard_name}:{line}"
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return Row(line, default_id, default_id, error=f"not JSON: {e}")
    if not isinstance(obj, dict):
        return Row(line, default_id, default_id,
                   error=f"a row must be a JSON object, got {type(obj).__name__}")
    row_id = obj.get("id", default_id)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return Row(line, default_id, default_id,
                   error=f"'id' must be a string or an integer, got {row_id!r:.60}")
    row = Row(line, str(row_id), row_id)
    try:
        row.prompt, row.messages = _prompt_of(obj)
        row.params = _params_of(obj, defaults, run_seed, row.key)
    except (QServeLiteError, TypeError) as e:
        row.error = str(e)
    return row


def read_rows(path: str | Path, shard_name: str, defaults: dict, run_seed: int) -> Iterator[Row]:
    """The rows of a shard in order; a second row with an id already seen is an error row (keyed by its
    line, "<shard>:<line>"). Bytes that are not UTF-8 make their row an error."""
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for line, data in enumerate(f, 1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                key = f"{shard_name}:{line}"
                yield Row(line, key, key, error=f"not UTF-8: {e}")
                continue
            if not raw.strip():
                continue
            row = parse_row(raw, line, shard_name, defaults, run_seed)
            if row.key in seen:
                key = f"{shard_name}:{line}"
                row = Row(line, key, key, error=f"duplicate id {row.id!r} (first on line {seen[row.key]})")
            seen.setdefault(row.key, line)
            yield row


def count_rows(path: str | Path) -> int:
    """Rows of a shard (non-blank lines), without parsing them."""
    n = 0
    with open(path, "rb") as f:
        for data in f:
            n += bool(data.strip())
    return n
