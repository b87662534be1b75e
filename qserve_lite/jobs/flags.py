"""The flags that launch a bulk job, shared by every job command (`qserve-lite batch`, `qserve-lite caption`):
where its workers run (--launcher, --gpus, --ray-address), how claims expire and dead workers are replaced
(--lock-ttl, --max-restarts), what to do with results of other settings (--overwrite), and --no-progress.

    flags.add_arguments(parser)
    result = flags.run_from_args(spec, shards, args, cpu=spec.engine.device == "cpu")
    print(result.table, file=sys.stderr)
"""

from __future__ import annotations

import argparse

from qserve_lite.errors import QServeLiteError
from qserve_lite.jobs.job import LAUNCHERS, JobResult, run_job
from qserve_lite.jobs.locks import DEFAULT_TTL_S
from qserve_lite.jobs.runner import WorkerSpec
from qserve_lite.jobs.shards import Shard


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", choices=LAUNCHERS, default="inline",
                   help="inline: this process (default); local: one spawned process per GPU (--gpus); ray: "
                   "a Ray Data actor pool, one actor per GPU (pip install 'qserve-lite[ray]')")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="local: processes, one per GPU (default 1); ray: actors (default: every GPU of the "
                   "cluster)")
    p.add_argument("--lock-ttl", type=float, default=DEFAULT_TTL_S, metavar="S",
                   help=f"a shard claim whose worker stopped its heartbeat for S seconds is taken over "
                   f"(default {DEFAULT_TTL_S:.0f}; a dead process on the same host: at once)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts of a worker process (local) or actor (ray) that died (default 3)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo shards whose results in --out were made with other settings (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the summary is printed)")
    p.add_argument("--ray-address", default=None,
                   help="ray: the cluster to join (default: $RAY_ADDRESS, a local `ray start`, or a new one)")


def run_from_args(spec: WorkerSpec, shards: list[Shard], args: argparse.Namespace, cpu: bool) -> JobResult:
    """run_job with the parsed flags. cpu: the workers run the numpy engine (Ray actors then take no GPU)."""
    if args.gpus is not None and args.gpus < 1:
        raise QServeLiteError(f"--gpus must be >= 1, got {args.gpus}")
    if not args.lock_ttl > 0:
        raise QServeLiteError(f"--lock-ttl must be > 0 seconds, got {args.lock_ttl}")
    if args.max_restarts < 0:
        raise QServeLiteError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    return run_job(spec, shards, launcher=args.launcher, gpus=args.gpus, lock_ttl=args.lock_ttl,
                   max_restarts=args.max_restarts, overwrite=args.overwrite, progress=not args.no_progress,
                   ray_gpus_per_worker=0.0 if cpu else 1.0, ray_address=args.ray_address)
