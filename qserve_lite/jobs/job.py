"""The driver of a bulk job: list the shards' states, refuse (or discard) results of another configuration,
run the unfinished shards on a launcher with an overall progress bar, then write the manifest and print the
summary table.

    result = run_job(spec, shards, launcher="inline" | "local" | "ray", gpus=N, lock_ttl=300)
    result.exit_code   # 0 when every shard is done (items recorded as errors included), else 1

Launchers: `inline` runs one worker in this process; `local` one spawned process per GPU (jobs/local.py);
`ray` a Ray Data actor pool (jobs/ray_runner.py). The worker of a job is its WorkerSpec (jobs/runner.py).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qserve_lite.jobs.local import run_local
from qserve_lite.jobs.locks import DEFAULT_TTL_S
from qserve_lite.jobs.progress import OverallProgress, summary_table
from qserve_lite.jobs.ray_runner import run_ray
from qserve_lite.jobs.runner import WorkerSpec, merge_statuses, status_of, work_through
from qserve_lite.jobs.shards import (
    Shard,
    ShardError,
    config_hash,
    discard_results,
    read_done,
    shard_state,
    write_manifest,
)

LAUNCHERS = ("inline", "local", "ray")


@dataclass
class JobResult:
    statuses: list[dict]  # one per shard, in shard order
    manifest: Path
    seconds: float
    items: int  # items finished by this run
    generated_tokens: int
    exit_code: int
    table: str = field(repr=False, default="")


def _partial_count(shard: Shard) -> int:
    try:
        with open(shard.partial, "rb") as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def _check_states(shards: list[Shard], chash: str, overwrite: bool) -> dict[str, str]:
    states = {s.name: shard_state(s, chash) for s in shards}
    stale = [s for s in shards if states[s.name] == "stale"]
    if stale and not overwrite:
        names = ", ".join(s.name for s in stale[:3]) + (" ..." if len(stale) > 3 else "")
        raise ShardError(f"{len(stale)} shard(s) in {stale[0].out_dir} hold results of another configuration "
                         f"({names}); use another output directory, or --overwrite to redo them")
    for s in stale:
        discard_results(s)
        states[s.name] = "todo"
    return states


def _launch(spec: WorkerSpec, todo: list[Shard], launcher: str, gpus: int | None, lock_ttl: float,
            max_restarts: int, ray_gpus_per_worker: float, ray_address: str | None) -> list[dict]:
    if launcher == "inline":
        return work_through(spec.build(), todo, lock_ttl=lock_ttl, unit=spec.unit, bar=sys.stderr.isatty(),
                            max_attempts=max_restarts + 1)
    if launcher == "local":
        return run_local(spec, todo, gpus or 1, lock_ttl=lock_ttl, max_restarts=max_restarts)
    if launcher == "ray":
        return run_ray(spec, todo, gpus, lock_ttl=lock_ttl, max_restarts=max_restarts,
                       gpus_per_worker=ray_gpus_per_worker, address=ray_address)
    raise ShardError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")


def run_job(spec: WorkerSpec, shards: list[Shard], *, launcher: str = "inline", gpus: int | None = None,
            lock_ttl: float = DEFAULT_TTL_S, max_restarts: int = 3, overwrite: bool = False,
            progress: bool = True, ray_gpus_per_worker: float = 1.0, ray_address: str | None = None,
            run_info: dict | None = None) -> JobResult:
    """Run the job (module docstring). Shards already done with this config are skipped; `overwrite` redoes
    shards holding results of another config (else that is a ShardError). max_restarts: a shard whose
    worker died is run again up to this many times (then it is an error, retried by the next run); a dead
    local process is restarted up to this many times per GPU (Ray restarts its actors itself)."""
    if not shards:
        raise ShardError("no input shards given")
    chash = config_hash(spec.config())
    shards[0].out_dir.mkdir(parents=True, exist_ok=True)
    states = _check_states(shards, chash, overwrite)
    todo = [s for s in shards if states[s.name] != "done"]
    earlier = [status_of(s, "skipped", read_done(s), spec.unit) for s in shards if states[s.name] == "done"]
    totals = {s.name: spec.count_items(s) for s in todo}
    totals.update({st["shard"]: int(st.get(spec.unit, 0)) for st in earlier})
    start = sum(int(st.get(spec.unit, 0)) for st in earlier) + sum(_partial_count(s) for s in todo)
    t0 = time.perf_counter()
    statuses: list[dict] = []
    if todo:
        with OverallProgress(shards, totals, start, unit=spec.unit, enabled=progress):
            statuses = _launch(spec, todo, launcher, gpus, lock_ttl, max_restarts, ray_gpus_per_worker,
                               ray_address)
    seconds = time.perf_counter() - t0
    merged = merge_statuses(shards, earlier + statuses)
    for i, st in enumerate(merged):  # a shard no worker reported may have been done by another run
        if st["status"] == "missing" and read_done(shards[i]) is not None:
            merged[i] = status_of(shards[i], "skipped", read_done(shards[i]), spec.unit)
    ran = [s for s in merged if s["status"] == "done"]
    items = sum(int(s.get("done", 0)) for s in ran)
    tokens = sum(int(s.get("generated_tokens", 0)) for s in ran)
    info = dict(run_info or {}, config_hash=chash, config=spec.config(), launcher=launcher, gpus=gpus,
                seconds=round(seconds, 3), items=items, generated_tokens=tokens,
                items_per_s=round(items / max(seconds, 1e-9), 3),
                gen_tok_s=round(tokens / max(seconds, 1e-9), 1), pid=os.getpid(), finished_at=time.time())
    manifest = write_manifest(shards[0].out_dir, merged, info)
    ok = all(s["status"] in ("done", "skipped") for s in merged)
    table = summary_table(merged, unit=spec.unit)
    table += (f"\nrun: {items} {spec.unit} in {seconds:.1f}s ({info['items_per_s']:.1f} {spec.unit}/s, "
              f"{info['gen_tok_s']:.0f} generated tok/s), {launcher} launcher; manifest {manifest}")
    return JobResult(merged, manifest, seconds, items, tokens, 0 if ok else 1, table)

