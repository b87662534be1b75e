"""The worker of `qserve-lite batch`: one engine for its lifetime, one input shard per `process` call, under
the shard contract of jobs/shards.py.

`BatchSpec` says what to run (picklable: it travels to spawned processes and Ray actors, where `build()`
loads the model); `BatchWorker.process(shard)`:

1. opens the shard's partial log (what a killed run finished is kept and not redone);
2. streams the rows (batch/rows.py), keeping up to `window` requests in the engine at once (continuous
   batching over the whole shard: a finished request's place is taken at the next step); bad rows and
   requests the engine refuses (a prompt too long, a token id outside the vocabulary) become error records;
3. logs each finished row as it finishes;
4. writes the result OUT/NAME.jsonl in input order (atomically), then the done-marker.

Result lines: {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"}, or {"id", "line",
"error"} for a bad row.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

from qserve_lite.batch.rows import Row, count_rows, read_rows
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.random_engine import build_random_engine
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.default_models import DEFAULT_MODEL
from qserve_lite.jobs.progress import ShardProgress
from qserve_lite.jobs.shards import PartialLog, Shard, config_hash, finish_shard
from qserve_lite.llm import LLM
from qserve_lite.outputs import RequestOutput


@dataclass(frozen=True)
class BatchSpec:
    """What a batch job runs. sampling: the default SamplingParams fields of every row (a row's
    sampling_params override them). chat: wrap text prompts in the chat template (with `system`). window:
    requests in the engine at once (default 2 x max_num_seqs)."""

    model: str = DEFAULT_MODEL
    precision: str | None = None
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(device="auto"))
    random_weights: str | None = None  # a shape (llama-3-8b, ...): random weights (serve --random-weights)
    tokenizer: str | None = None  # with random_weights: a tokenizer reference, or None for token-id prompts
    group_size: int = 128
    sampling: dict = field(default_factory=dict)
    chat: bool = False
    system: str | None = None
    window: int | None = None
    unit: ClassVar[str] = "rows"

    def config(self) -> dict:
        """What changes the results (hashed into the done-markers; a change makes old results stale)."""
        return {"model": self.random_weights and f"random:{self.random_weights}" or self.model,
                "precision": self.precision, "tokenizer": self.tokenizer,
                "group_size": self.group_size if self.random_weights else None, "sampling": self.sampling,
                "chat": self.chat, "system": self.system, "seed": self.engine.seed,
                "max_model_len": self.engine.max_model_len}

    def count_items(self, shard: Shard) -> int:
        return count_rows(shard.input)

    def load(self) -> LLM:
        """The engine of this spec, on this process's device."""
        if self.random_weights is not None:
            built = build_random_engine(self.random_weights, self.tokenizer, precision=self.precision,
                                        group_size=self.group_size, config=self.engine)
            return LLM.from_engine(built.engine, built.precision)
        return LLM(self.model, self.precision, config=self.engine)

    def build(self) -> BatchWorker:
        return BatchWorker(self.load(), self)


def ok_record(row: Row, out: RequestOutput) -> dict:
    completion = out.outputs[0]
    return {"id": row.id, "text": completion.text, "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}


class BatchWorker:
    """One engine, any number of shards (module docstring)."""

    def __init__(self, llm: LLM, spec: BatchSpec):
        self.llm, self.spec = llm, spec
        self.engine = llm.engine
        self.config_hash = config_hash(spec.config())
        self.window = spec.window or 2 * self.engine.engine_config.max_num_seqs

    def _request(self, row: Row) -> str | list[int]:
        """The prompt the engine gets for a row (text or token ids); QServeLiteError if it cannot be made."""
        tok = self.llm.tokenizer
        if row.messages is None and not (self.spec.chat and isinstance(row.prompt, str)):
            return row.prompt
        if tok is None:
            raise QServeLiteError("this model has no tokenizer: give prompts as token ids, without chat")
        messages = row.messages
        if messages is None:
            system = [{"role": "system", "content": self.spec.system}] if self.spec.system else []
            messages = system + [{"role": "user", "content": row.prompt}]
        try:
            return tok.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 - a template failing on one row's messages is that row's error
            raise QServeLiteError(f"the chat template failed on these messages: {e}") from None

    def _admit(self, row: Row, log: PartialLog, progress: ShardProgress, in_flight: dict[str, Row]) -> None:
        if row.error is None:
            try:
                in_flight[self.engine.add_request(self._request(row), row.params, request_id=row.key,
                                                  stream=False)] = row
                return
            except QServeLiteError as e:
                row = dataclasses.replace(row, error=str(e))
        log.append(row.error_record())
        progress.add(False)

    def _generate(self, shard: Shard, log: PartialLog, progress: ShardProgress) -> list[str]:
        """Run every row not in the log; the keys of all rows in input order."""
        order: list[str] = []
        in_flight: dict[str, Row] = {}
        rows = read_rows(shard.input, shard.name, self.spec.sampling, self.engine.engine_config.seed)
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < self.window:
                row = next(rows, None)
                if row is None:
                    exhausted = True
                    break
                order.append(row.key)
                if row.key not in log:  # rows a killed run finished are in the log already
                    self._admit(row, log, progress, in_flight)
            if not in_flight:
                if exhausted:
                    return order
                continue
            for out in self.engine.step():
                row = in_flight.pop(out.request_id, None) if out.finished else None
                if row is not None:
                    rec = ok_record(row, out)
                    log.append(rec)
                    progress.add(True, rec["prompt_tokens"], rec["completion_tokens"])

    def process(self, shard: Shard, bar: bool = False) -> dict:
        """Run one shard to its result and done-marker (module docstring); returns the marker."""
        total = count_rows(shard.input)
        with PartialLog(shard.partial, "id", self.config_hash) as log:
            progress = ShardProgress(shard, total, already=len(log), unit=self.spec.unit, bar=bar)
            try:
                order = self._generate(shard, log, progress)
            except BaseException:
                self.engine.abort_all()  # nothing of this shard stays in the engine for the next one
                raise
            finally:
                progress.close()
            records = log.records
        missing = [k for k in order if k not in records]
        if missing:
            raise QServeLiteError(f"{len(missing)} rows of {shard.name} have no result (first: {missing[0]})")

        def write(f) -> None:
            for k in order:
                f.write(json.dumps(records[k], ensure_ascii=False) + "\n")

        errors = sum("error" in records[k] for k in order)
        marker = dict(progress.counts(), rows=len(order), ok=len(order) - errors, errors=errors)
        del marker["total"]
        return finish_shard(shard, write, marker, self.config_hash)
