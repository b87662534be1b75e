"""What one worker does with a list of shards, whatever launched it: claim a shard (jobs/locks.py), skip it if
it is done, process it, release it; and what a job provides for that.

A job (batch generation, captioning) provides a picklable `WorkerSpec` whose `build()` returns a
`ShardWorker` (one per process, holding its engine for its lifetime):

    class MySpec:                       # a dataclass: pickled to spawned processes and Ray actors
        unit = "rows"                   # what an item is, for progress and the table
        def config(self) -> dict: ...   # what changes the results (hashed into config_hash)
        def count_items(self, shard) -> int | None: ...  # items in an input shard (None: not known)
        def build(self) -> ShardWorker: ...

    class MyWorker:
        config_hash: str
        def process(self, shard, bar: bool) -> dict:
            '''Run the shard under the contract of jobs/shards.py (PartialLog, finish_shard) and return its
            done-marker: <unit> (items in the result), ok, errors, done (items of this attempt), resumed,
            prompt_tokens, generated_tokens, seconds, <unit>_per_s, gen_tok_s, and optionally a warning.
            Bad items are records; raise only when the whole shard cannot be done.'''

A status (one per shard and attempt; collected into OUT/manifest.json) is the marker's counts plus
`status`: done (ran now), skipped (found done), claimed (another live worker holds it), error (`message`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from qserve_lite.jobs.locks import ShardLock, read_holder
from qserve_lite.jobs.shards import Shard, read_done, shard_state, worker_name

STATUS_FIELDS = ("ok", "errors", "done", "resumed", "prompt_tokens", "generated_tokens", "seconds",
                 "gen_tok_s", "worker", "warning")  # and <unit>, <unit>_per_s
_PRIORITY = {"done": 3, "error": 2, "skipped": 1, "claimed": 0}


class ShardWorker(Protocol):
    config_hash: str

    def process(self, shard: Shard, bar: bool) -> dict: ...


class WorkerSpec(Protocol):
    unit: str

    def config(self) -> dict: ...

    def count_items(self, shard: Shard) -> int | None: ...

    def build(self) -> ShardWorker: ...


def status_of(shard: Shard, status: str, marker: dict | None = None, unit: str = "rows", **extra) -> dict:
    """A status line: the marker's counts (when there is one), `status` and `extra`."""
    out = {"shard": shard.name, "status": status}
    if marker is not None:
        out.update({k: marker[k] for k in (unit, *STATUS_FIELDS, f"{unit}_per_s") if k in marker})
    out.update(extra)
    return out


def run_one(worker: ShardWorker, shard: Shard, *, lock_ttl: float, unit: str = "rows", wait: bool = False,
            bar: bool = False, max_attempts: int = 4) -> dict:
    """Claim `shard`, process it unless it is done, release it; its status. A failure of the shard (not of
    an item: those are records) becomes an `error` status, never an exception: the shard keeps its partial
    log and the next run resumes it. A process that dies (killed, out of memory) leaves its claim to
    expire; after `max_attempts` workers died on a shard, it is given up (an error status; the next run
    tries again)."""
    shard.out_dir.mkdir(parents=True, exist_ok=True)
    lock = ShardLock(shard.lock, lock_ttl)
    if not lock.acquire(wait=wait):
        holder = read_holder(shard.lock) or {}
        return status_of(shard, "claimed", holder=f"{holder.get('host', '?')}:{holder.get('pid', '?')}")
    try:
        if lock.attempt > max_attempts:
            return status_of(shard, "error", worker=worker_name(),
                             message=f"{lock.attempt - 1} workers died running it (killed? out of memory?)")
        state = shard_state(shard, worker.config_hash)
        if state == "done":
            return status_of(shard, "skipped", read_done(shard), unit)
        if state == "stale":
            return status_of(shard, "error", message="holds results of another configuration",
                             worker=worker_name())
        return status_of(shard, "done", worker.process(shard, bar), unit)
    except Exception as e:  # noqa: BLE001 - one shard's failure must not stop the others
        return status_of(shard, "error", message=f"{type(e).__name__}: {e}", worker=worker_name())
    finally:
        lock.release()


def work_through(worker: ShardWorker, shards: Sequence[Shard], *, lock_ttl: float, unit: str = "rows",
                 bar: bool = False, report: Callable[[dict], None] | None = None,
                 poll_s: float | None = None, max_attempts: int = 4) -> list[dict]:
    """Run every shard this worker can claim, in order. Shards other workers hold are tried again every
    poll_s seconds until they are done (or their claims expire and this worker takes them): a worker ends
    when no shard of the list is left unfinished by a live worker. report(status) is called for each."""
    poll_s = poll_s if poll_s is not None else min(1.0, lock_ttl / 4)
    statuses, remaining = [], list(shards)
    while remaining:
        held = []
        for shard in remaining:
            st = run_one(worker, shard, lock_ttl=lock_ttl, unit=unit, bar=bar, max_attempts=max_attempts)
            if st["status"] == "claimed":
                held.append(shard)
                continue
            statuses.append(st)
            if report is not None:
                report(st)
        remaining = held
        if remaining:
            time.sleep(poll_s)
    return statuses


def merge_statuses(shards: Sequence[Shard], statuses: Sequence[dict]) -> list[dict]:
    """One status per shard, in shard order: what happened to it (done beats error beats skipped: several
    workers may report the same shard); `missing` for a shard nobody reported (its worker died)."""
    best: dict[str, dict] = {}
    for st in statuses:
        cur = best.get(st["shard"])
        if cur is None or _PRIORITY.get(st["status"], -1) > _PRIORITY.get(cur["status"], -1):
            best[st["shard"]] = st
    return [best.get(s.name, {"shard": s.name, "status": "missing"}) for s in shards]
