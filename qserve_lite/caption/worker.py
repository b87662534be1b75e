"""The worker of `qserve-lite caption`: one VILA1.5 engine for its lifetime, one WebDataset shard per
`process` call, under the shard contract of jobs/shards.py, so the jobs/ launchers run it (this process, one
process per GPU, Ray Data) as they run `qserve-lite batch`.

`CaptionSpec` says what to run (picklable: it travels to spawned processes and Ray actors, where `build()`
loads the checkpoint); `CaptionWorker.process(shard)`:

1. opens the shard's partial log (the keys a killed run finished are kept, and skipped before their images
   are decoded);
2. feeds the other images to the engine (caption/feed.py), which keeps up to max_num_seqs captions in
   flight across the whole shard (engine/vlm_engine.VLMEngine.generate); each finished key is logged as it
   finishes, {"key", "caption"} or {"key", "error"} (no image, an image that cannot be decoded);
3. writes OUT/<shard>.json, QServe's format {key: {model_name: caption}} ({key: {"error": why}} for a key
   that failed) with the entries of other model names already in the file kept, then the done-marker.

The model name is the shard's variant (jobs/shards.py): each model name has its own marker
(<shard>.<model_name>.done.json: counts, images/s, generated tok/s, the settings' hash), partial log and
progress, so captions of several models share one JSON per shard. A truncated shard, or one holding another
number of samples than the index says, is finished with what it holds and a `warning` in its marker.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from qserve_lite.caption.feed import ShardFeed
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.vlm_engine import VLMEngine, VLMStats, build_vlm_engine
from qserve_lite.engine.vlm_prompt import DEFAULT_CAPTION_PROMPT
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.vila import load_vila
from qserve_lite.jobs.progress import ShardProgress
from qserve_lite.jobs.shards import PartialLog, Shard, ShardError, config_hash, finish_shard
from qserve_lite.sampling_params import SamplingParams

VISION_PRECISIONS = {"w16a16": "f16", "w8a8": "w8"}


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption job runs. expected: samples per shard name, from the wids index (when there is one)."""

    model: str
    model_name: str
    llm: str | None = None
    precision: str | None = None
    vision_precision: str = "w16a16"
    token_order: str | None = None
    template: str | None = None
    prompt: str = DEFAULT_CAPTION_PROMPT
    max_new_tokens: int = 300
    temperature: float = 0.0
    top_p: float = 1.0
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(device="auto", max_num_seqs=256))
    decode_threads: int = 8
    expected: dict = field(default_factory=dict)
    unit: ClassVar[str] = "images"

    def config(self) -> dict:
        """What changes the captions (hashed into the done-markers; a change makes old ones stale)."""
        return {"model": self.model, "model_name": self.model_name, "llm": self.llm,
                "precision": self.precision, "vision_precision": self.vision_precision,
                "token_order": self.token_order, "template": self.template, "prompt": self.prompt,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.engine.seed, "max_model_len": self.engine.max_model_len}

    def count_items(self, shard: Shard) -> int | None:
        return self.expected.get(shard.name)

    def load(self) -> VLMEngine:
        """The engine of this spec, on this process's device."""
        loaded = load_vila(self.model, precision=self.precision, llm=self.llm, token_order=self.token_order,
                           conv_template=self.template)
        loaded.name = self.model_name
        return build_vlm_engine(loaded, self.engine, VISION_PRECISIONS[self.vision_precision])

    def build(self) -> CaptionWorker:
        return CaptionWorker(self.load(), self)


def read_captions(path: Path) -> dict:
    """The captions already in a shard's JSON ({} when there is none); ShardError when it is not ours."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} is not readable JSON ({e}); move it away to redo the shard") from None
    if not isinstance(data, dict):
        raise ShardError(f"{path} is not a JSON object; move it away to redo the shard")
    return data


def merge_captions(existing: dict, records: list[dict], model_name: str) -> dict:
    """The shard's JSON: `existing` (other model names' entries) with this model's records in: its caption
    under its name, or the key's error in place of it."""
    out = dict(existing)
    for rec in records:
        entry = out.get(rec["key"])
        entry = dict(entry) if isinstance(entry, dict) else {}
        if "error" in rec:
            entry.pop(model_name, None)
            entry["error"] = rec["error"]
        else:
            entry.pop("error", None)
            entry[model_name] = rec["caption"]
        out[rec["key"]] = entry
    return out


def shard_warning(feed: ShardFeed, expected: int | None) -> str | None:
    """What was off about the shard's input (damage, or another count than the index's), if anything."""
    if feed.error is not None:
        return feed.error
    if expected is not None and feed.samples != expected:
        return f"the index says {expected} samples, the shard holds {feed.samples}"
    return None


class CaptionWorker:
    """One VLM engine, any number of shards (module docstring)."""

    def __init__(self, vlm: VLMEngine, spec: CaptionSpec):
        self.vlm, self.spec = vlm, spec
        self.config_hash = config_hash(spec.config())
        self.prompt = vlm.prompt_ids(spec.prompt, spec.template)
        self.params = SamplingParams(max_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                     top_p=spec.top_p)

    def _caption(self, shard: Shard, log: PartialLog, progress: ShardProgress) -> tuple[ShardFeed, VLMStats]:
        """Caption every key of the shard not in the log, logging each as it finishes."""
        def on_done(key, output, error) -> None:
            if error is not None:
                log.append({"key": key, "error": error})
                progress.add(False)
                return
            completion = output.outputs[0]
            log.append({"key": key, "caption": completion.text})
            progress.add(True, len(output.prompt_token_ids), len(completion.token_ids))

        with ThreadPoolExecutor(self.spec.decode_threads, thread_name_prefix="decode") as pool:
            feed = ShardFeed(shard.input, set(log.records), self.vlm.config, pool,
                             ahead=2 * self.vlm.max_num_seqs)
            return feed, self.vlm.generate(feed, self.params, self.prompt, on_done)

    def process(self, shard: Shard, bar: bool = False) -> dict:
        """Caption one shard to its JSON and done-marker (module docstring); returns the marker."""
        existing = read_captions(shard.output)  # read first: a file that is not ours fails the shard early
        expected = self.spec.expected.get(shard.name)
        with PartialLog(shard.partial, "key", self.config_hash) as log:
            progress = ShardProgress(shard, expected, already=len(log), unit=self.spec.unit, bar=bar)
            try:
                feed, stats = self._caption(shard, log, progress)
            except BaseException:
                self.vlm.engine.abort_all()  # nothing of this shard stays in the engine for the next one
                raise
            finally:
                progress.close()
            records = log.records
        missing = [k for k in feed.order if k not in records]
        if missing:
            raise QServeLiteError(f"{len(missing)} images of {shard.name} have no caption "
                                  f"(first: {missing[0]})")
        mine = [records[k] for k in feed.order]
        result = merge_captions(existing, mine, self.spec.model_name)
        errors = sum("error" in r for r in mine)
        marker = dict(progress.counts(), images=len(mine), ok=len(mine) - errors, errors=errors,
                      model_name=self.spec.model_name, expected=expected, samples_read=feed.samples,
                      vision_s=round(stats.vision_s, 3), warning=shard_warning(feed, expected),
                      max_new_tokens=self.spec.max_new_tokens, temperature=self.spec.temperature)
        del marker["total"]
        return finish_shard(shard, lambda f: json.dump(result, f, ensure_ascii=False, indent=1), marker,
                            self.config_hash)
