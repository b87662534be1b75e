"""Helpers of the batch tests: input shards, reading results, and a worker that dies mid-shard once (it is
pickled into spawned processes and Ray actors, so it lives in a module of its own)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qserve_lite.batch.worker import BatchSpec, BatchWorker
from qserve_lite.engine.config import EngineConfig

PROMPTS = ["The capital of France is", "def forward(x):", "Quantization maps", "A key-value cache",
           "Numbers like 12345"]


def write_shards(directory: Path, num_shards: int, rows: int) -> list[Path]:
    """num_shards JSONL files of `rows` text prompts each, ids "<shard>-<row>"."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = directory / f"part-{s:02d}.jsonl"
        with open(path, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"{s}-{i}", "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}"}) + "\n")
        paths.append(path)
    return paths


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def spec_for(model_dir: Path, **over) -> BatchSpec:
    values = dict(model=str(model_dir), engine=EngineConfig(device="cpu", max_num_seqs=4),
                  sampling={"max_tokens": 4})
    values.update(over)
    return DyingSpec(**values) if "flag" in over else BatchSpec(**values)


class DyingWorker(BatchWorker):
    """A BatchWorker whose process exits (os._exit: no cleanup, like a kill) once its shard's partial log
    holds spec.die_after rows, the first time only (spec.flag marks that it died)."""

    def _generate(self, shard, log, progress):
        append = log.append

        def append_then_die(record):
            append(record)
            if len(log) >= self.spec.die_after and not os.path.exists(self.spec.flag):
                Path(self.spec.flag).write_text(str(os.getpid()))
                os._exit(17)

        log.append = append_then_die
        return super()._generate(shard, log, progress)


@dataclass(frozen=True)
class DyingSpec(BatchSpec):
    die_after: int = 5
    flag: str = ""

    def build(self) -> DyingWorker:
        return DyingWorker(self.load(), self)
