"""The shard contract of a resumable job over WebDataset shards: what one shard's outputs are, when a shard is
done, and which of its keys are.

For shard <name> (its .tar name without .tar) under the output directory:

    <name>.partial.jsonl   progress: one JSON line {"key": k, "record": {...}} per finished key, appended and
                           flushed as each finishes (fsync'ed every FSYNC_EVERY lines and at the end); a line
                           torn by a kill is ignored on resume. Exists only while the shard is unfinished.
    <name>.json            the result, written atomically at the end: {key: {model_name: text}} (QServe's
                           caption format; other models' entries already in the file are kept) and
                           {key: {"error": why}} for keys that failed (corrupt or missing image).
    <name>.done.json       the done-marker, written atomically after <name>.json:
                           {"shard": name, "models": {model_name: {counts, throughput, settings}}}.

A shard is done for a model when its marker lists the model and <name>.json exists: a re-run skips it. An
unfinished shard resumes: the keys in its partial log are skipped before their images are decoded, so
nothing is done twice and nothing is lost. The job itself is idempotent: re-running the same command
after a kill (or on a machine that shares the output directory) finishes what is left.

    job = ShardJob(out_dir, "shard-000", "VILA1.5-13b")
    if not job.is_done():
        done = job.finished()                      # {key: record} from an earlier, interrupted run
        with job.log() as log:
            log.append(key, {"text": caption})     # or {"error": why}
        job.finish(stats)                          # <name>.json + marker; the partial log is removed
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qserve_lite.errors import QServeLiteError
from qserve_lite.io.atomic_dir import atomic_write_text

FSYNC_EVERY = 64  # partial-log lines between fsyncs (a power cut loses at most these; a kill loses none)


class ShardOutputError(QServeLiteError):
    """A shard's output files cannot be written or are not what this job wrote."""


class PartialLog:
    """Appends finished keys to <name>.partial.jsonl (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close() / the context manager
        self._unsynced = 0

    def append(self, key: str, record: dict) -> None:
        self._f.write(json.dumps({"key": key, "record": record}, ensure_ascii=False) + "\n")
        self._f.flush()
        self._unsynced += 1
        if self._unsynced >= FSYNC_EVERY:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._f.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> PartialLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardJob:
    """One shard's outputs for one model under out_dir."""

    def __init__(self, out_dir: str | Path, name: str, model_name: str):
        self.out_dir = Path(out_dir)
        self.name = name
        self.model_name = model_name
        self.result_path = self.out_dir / f"{name}.json"
        self.partial_path = self.out_dir / f"{name}.partial.jsonl"
        self.marker_path = self.out_dir / f"{name}.done.json"

    def _read_json(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardOutputError(f"{path} is not readable JSON ({e}); move it away to redo the "
                                   "shard") from None
        if not isinstance(data, dict):
            raise ShardOutputError(f"{path} is not a JSON object; move it away to redo the shard")
        return data

    def marker(self) -> dict | None:
        return self._read_json(self.marker_path) if self.marker_path.is_file() else None

    def is_done(self) -> bool:
        marker = self.marker()
        return (marker is not None and self.model_name in (marker.get("models") or {})
                and self.result_path.is_file())

    def finished(self) -> dict[str, dict]:
        """{key: record} of the keys an earlier run finished (its partial log; a torn last line ignored)."""
        out: dict[str, dict] = {}
        if not self.partial_path.is_file():
            return out
        with open(self.partial_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    key, record = entry["key"], entry["record"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a kill: that key runs again
                if isinstance(key, str) and isinstance(record, dict):
                    out.setdefault(key, record)
        return out

    def log(self) -> PartialLog:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            return PartialLog(self.partial_path)
        except OSError as e:
            raise ShardOutputError(f"cannot write {self.partial_path}: {e}") from None

    def result(self, records: dict[str, dict]) -> dict:
        """The shard's JSON: the existing file's entries (other models') with this model's records in."""
        out = self._read_json(self.result_path) if self.result_path.is_file() else {}
        for key, record in records.items():
            entry = out.get(key) if isinstance(out.get(key), dict) else {}
            if "error" in record:
                entry = {**entry, "error": record["error"]}
                entry.pop(self.model_name, None)
            else:
                entry = {k: v for k, v in entry.items() if k != "error"}
                entry[self.model_name] = record["text"]
            out[key] = entry
        return out

    def finish(self, stats: dict) -> dict:
        """Write <name>.json from the partial log and the marker with `stats` (this model's entry); remove the
        partial log. Returns the records."""
        records = self.finished()
        try:
            text = json.dumps(self.result(records), ensure_ascii=False, indent=1)
            atomic_write_text(self.result_path, text)
            marker = self.marker() or {"shard": self.name, "models": {}}
            marker.setdefault("models", {})[self.model_name] = {
                **stats, "keys": len(records), "errors": sum("error" in r for r in records.values()),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write_text(self.marker_path, json.dumps(marker, indent=1))
            self.partial_path.unlink(missing_ok=True)
        except OSError as e:
            raise ShardOutputError(f"cannot write the outputs of shard {self.name} to {self.out_dir}: "
                                   f"{e}") from None
        return records
