"""The shard contract: one input shard is the unit of work of a bulk job (`qserve-lite batch`, `qserve-lite
caption`, any job that maps files to result files). It is idempotent and resumable, and no launcher
(in-process, one process per GPU, Slurm arrays, Ray Data) needs to know more than this module.

Files of one shard `NAME` in the output directory OUT (`Shard`):

    OUT/NAME<suffix>         the result, written whole or not at all (temporary file + os.replace)
    OUT/NAME.done.json       the done-marker: counts, config hash, throughput, who and when (written last)
    OUT/NAME.partial.jsonl   the partial log: a header line with the config hash, then one JSON record per
                             finished item, appended as they finish; deleted once the result is in place
    OUT/NAME.lock            the claim of a live worker (jobs/locks.py); expires when its heartbeat stops
    OUT/NAME.progress.json   a live worker's counts, rewritten every second or so (jobs/progress.py)

Variants: a job whose result file holds the results of several configurations side by side (captioning:
QServe's {key: {model_name: caption}}, one variant per model name) gives its shards a `variant`. Each variant
then has its own done-marker, partial log and progress (OUT/NAME.VARIANT.done.json, ...), so it is done,
resumed or stale on its own; the result file and the lock stay the shard's (one writer at a time), and the
job's write_result keeps the other variants' entries of the result file it finds.

API (what a job implements and calls):

    shards = list_shards(inputs, out_dir, suffix=".jsonl")     # files or directories -> [Shard]; refuses a
                                                               # name used twice or an output over an input
    shards = make_shards([(name, path), ...], out_dir, suffix, variant)   # named inputs (an index's order)
    h = config_hash({...})                # everything that changes the results (model, sampling, ...)
    shard_state(shard, h)                 # "done" | "partial" | "todo" | "stale" (another config's results)
    with PartialLog(shard.partial, "id", h) as log:   # loads what a killed run finished (a torn last
        if key in log: ...                            #   line is dropped), or starts a new log
        log.append({"id": key, ...})                  # one finished record (flushed; fsync every so often)
        records = log.records                         # {str(key): record}
    finish_shard(shard, write_result, marker)  # write_result(file) writes the result; it is renamed into
                                               # place, then the done-marker (marker + config hash, time,
                                               # host) is written, then the partial log and progress go.
                                               # The marker counts the shard's items under the job's unit
                                               # ("rows": 12, or "images": 12), with ok, errors, <unit>_per_s,
                                               # and a "warning" when something about the input was off
    read_done(shard) -> dict | None
    write_manifest(out_dir, statuses, run)     # OUT/manifest.json: one status per shard of the run

A record that failed (a bad input row, a corrupt image) is a record too, with an "error" field: it is
logged and written like the others and counted in the marker, never fatal. An error of the whole shard (its
input unreadable, an engine failure) leaves no marker: the shard is retried by the next run, resuming from its
partial log. Results of another configuration ("stale") are never mixed in: the caller refuses them or
starts over (`discard_results`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from qserve_lite.errors import QServeLiteError

DONE_SUFFIX = ".done.json"
PARTIAL_SUFFIX = ".partial.jsonl"
LOCK_SUFFIX = ".lock"
PROGRESS_SUFFIX = ".progress.json"
MANIFEST = "manifest.json"
FSYNC_EVERY_RECORDS = 256  # the partial log is flushed per record, fsynced every this many
FSYNC_EVERY_S = 5.0  # ... or this often
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class ShardError(QServeLiteError):
    """The shards of a job are unusable (names clash, outputs would overwrite inputs, a stale result)."""


@dataclass(frozen=True)
class Shard:
    """One input file and where its results go."""

    input: Path
    out_dir: Path
    name: str  # unique within out_dir
    suffix: str  # of the result file: ".jsonl", ".json", ...
    variant: str = ""  # whose results these are, when the result file holds several (module docstring)

    @property
    def output(self) -> Path:
        return self.out_dir / f"{self.name}{self.suffix}"

    @property
    def _stem(self) -> str:
        return f"{self.name}.{self.variant}" if self.variant else self.name

    @property
    def done(self) -> Path:
        return self.out_dir / f"{self._stem}{DONE_SUFFIX}"

    @property
    def partial(self) -> Path:
        return self.out_dir / f"{self._stem}{PARTIAL_SUFFIX}"

    @property
    def lock(self) -> Path:
        return self.out_dir / f"{self.name}{LOCK_SUFFIX}"

    @property
    def progress(self) -> Path:
        return self.out_dir / f"{self._stem}{PROGRESS_SUFFIX}"

    def files(self) -> tuple[Path, ...]:
        """Every file of the shard in out_dir."""
        return self.output, self.done, self.partial, self.lock, self.progress

    def to_dict(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Shard:
        return cls(Path(d["input"]), Path(d["out_dir"]), str(d["name"]), str(d["suffix"]),
                   str(d.get("variant", "")))


def check_variant(variant: str, what: str = "the variant") -> str:
    """`variant` if it can be part of a file name, else ShardError (`what` names it in the message)."""
    if not _VARIANT.fullmatch(variant):
        raise ShardError(f"{what} {variant!r} cannot name result files: use letters, digits and . _ + - "
                         "(not first)")
    return variant


def list_shards(inputs: Iterable[str | Path], out_dir: str | Path, suffix: str,
                pattern: str = "*.jsonl", variant: str = "") -> list[Shard]:
    """The shards of `inputs` (files, or directories whose files matching `pattern` are taken, sorted), each
    named by its file name without its last suffix. ShardError when there is none or an input is missing,
    and as make_shards."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.glob(pattern) if p.is_file())
            if not found:
                raise ShardError(f"{path} has no {pattern} files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ShardError(f"input {path} does not exist")
    return make_shards([(f.name.rsplit(".", 1)[0] if "." in f.name else f.name, f) for f in files], out_dir,
                       suffix, variant)


def make_shards(named: Iterable[tuple[str, str | Path]], out_dir: str | Path, suffix: str,
                variant: str = "") -> list[Shard]:
    """The shards of (name, input file) pairs, in order. ShardError when there is none, when two inputs share
    a name, or when a file of one shard would be a file of another or an input."""
    out_dir = Path(out_dir).resolve()
    if variant:
        check_variant(variant)
    shards, owner, first_of = [], {}, {}
    for name, f in named:
        shard = Shard(Path(f).resolve(), out_dir, name, suffix, variant)
        if name in first_of:
            raise ShardError(f"two input shards are named {name!r} ({first_of[name]} and {f}); their results "
                             "would share one file: rename one")
        first_of[name] = f
        for path in shard.files():
            other = owner.setdefault(path, shard)
            if other is not shard:
                raise ShardError(f"the shards {other.name!r} and {name!r} would both write {path.name}: "
                                 "rename one")
        shards.append(shard)
    if not shards:
        raise ShardError("no input shards given")
    for shard in shards:
        if shard.input in owner:
            raise ShardError(f"the result of {shard.input} would overwrite it: choose an output directory "
                             f"other than {shard.input.parent}")
    return shards


def config_hash(config: Mapping) -> str:
    """A short stable hash of a JSON-able mapping (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or unreadable (e.g. being replaced)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_done(shard: Shard) -> dict | None:
    """The done-marker of `shard`, when it has one and its result file exists."""
    marker = read_json(shard.done)
    return marker if marker is not None and shard.output.is_file() else None


def _partial_hash(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
        return header["_header"]["config_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_state(shard: Shard, chash: str) -> str:
    """'done' (a marker of this config), 'partial' (a partial log of this config), 'todo' (nothing yet) or
    'stale' (results or a partial log of another config)."""
    marker = read_done(shard)
    if marker is not None:
        return "done" if marker.get("config_hash") == chash else "stale"
    if shard.partial.exists():
        return "partial" if _partial_hash(shard.partial) == chash else "stale"
    return "todo"


def discard_results(shard: Shard) -> None:
    """Remove the result, marker, partial log and progress of `shard` (to run it again from scratch). The
    result file of a variant stays (it holds the other variants' results; this one's are replaced when the
    shard is done again)."""
    for path in (shard.done, shard.partial, shard.progress) + (() if shard.variant else (shard.output,)):
        path.unlink(missing_ok=True)


class PartialLog:
    """The append-only log of the finished records of one shard (module docstring). Opening it loads the
    records of an earlier run of the same config; a torn last line (a writer killed mid-write) is cut off.
    A log of another config is an error (ShardError). Records are keyed by str(record[key])."""

    def __init__(self, path: str | Path, key: str, chash: str):
        self.path, self.key, self.config_hash = Path(path), key, chash
        self.records: dict[str, dict] = {}
        self._unsynced, self._synced_at = 0, time.monotonic()
        if self.path.exists():
            self._load()
            self._f: TextIO = open(self.path, "a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")
            self._f.write(json.dumps({"_header": {"config_hash": chash, "created": time.time()}}) + "\n")
            self._sync()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: cut it, so the next record starts on a line of its own
            with open(self.path, "r+b") as f:
                f.truncate(end)
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        if not lines or _partial_hash(self.path) != self.config_hash:
            raise ShardError(f"{self.path} was written with another configuration; remove it (or use a new "
                             "output directory) to start this shard over")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                self.records[str(rec[self.key])] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a damaged line: that record is simply redone

    def __contains__(self, key) -> bool:
        return str(key) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        """Log one finished record (written through to the OS at once, so a killed process loses none)."""
        self.records[str(record[self.key])] = record
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self._unsynced += 1
        if self._unsynced >= FSYNC_EVERY_RECORDS or time.monotonic() - self._synced_at > FSYNC_EVERY_S:
            self._sync()

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._unsynced, self._synced_at = 0, time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._sync()
            self._f.close()

    def __enter__(self) -> PartialLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: str | Path, write: Callable[[TextIO], None] | str) -> None:
    """Write `path` whole or not at all: `write(file)` (or the text given) fills a temporary file beside it,
    which is fsynced and renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if isinstance(write, str):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def finish_shard(shard: Shard, write_result: Callable[[TextIO], None], marker: dict, chash: str) -> dict:
    """Put the result of `shard` in place (atomically), then its done-marker (`marker` plus the config hash,
    the result's name, the worker and the time), then drop its partial log and progress. Returns the
    marker."""
    write_atomic(shard.output, write_result)
    marker = dict(marker, shard=shard.name, input=str(shard.input), output=str(shard.output),
                  config_hash=chash, worker=worker_name(), finished_at=time.time())
    if shard.variant:
        marker["variant"] = shard.variant
    write_atomic(shard.done, json.dumps(marker, indent=1) + "\n")
    shard.partial.unlink(missing_ok=True)
    shard.progress.unlink(missing_ok=True)
    return marker


def write_manifest(out_dir: str | Path, statuses: list[dict], run: dict) -> Path:
    """OUT/manifest.json (atomic): the run's settings and one status per shard (done, skipped, error...)."""
    path = Path(out_dir) / MANIFEST
    write_atomic(path, json.dumps({"run": run, "shards": statuses}, indent=1) + "\n")
    return path
