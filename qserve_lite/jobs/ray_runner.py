"""`--launcher ray`: the unfinished shards mapped over a pool of GPU actors with Ray Data (the optional
`[ray]` extra: `pip install "qserve-lite[ray]"`).

    ds = ray.data.from_items(shards, override_num_blocks=len(shards))       # one block per shard
    ds.map_batches(ShardActor, batch_size=1, num_gpus=1, concurrency=N, ...)  # one shard per call

Each actor (`ShardActor`) builds the job's worker once (one engine for the actor's lifetime; Ray has set its
CUDA_VISIBLE_DEVICES) and runs each shard it gets under the shard contract (jobs/runner.run_one: claim, skip
if done, process, release). An actor that dies (killed, a node lost) is restarted and its task retried by
Ray (its defaults for actor pools: restarts and retries without limit); the retried shard resumes from its
partial log, after its dead owner's claim expires (at once on the same host, after lock_ttl on another). A
shard on which max_restarts + 1 workers died is given up (an error status; the claim counts the attempts),
so a shard that kills its worker every time does not loop forever. A shard that fails inside the
worker is an `error` status, not an exception, so one bad shard never stops the dataset.

`ray.init()` joins the cluster of RAY_ADDRESS, or one started with `ray start` on this machine, or starts a
local one; its workers get PYTHONPATH with this checkout of qserve_lite first (on other nodes it must be
installed, or be at the same path on a shared file system). The driver collects one status per shard: the
manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from qserve_lite.errors import QServeLiteError
from qserve_lite.jobs.runner import WorkerSpec, run_one
from qserve_lite.jobs.shards import Shard


def import_ray():
    """ray and ray.data, or a one-line error saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of ray
    except ImportError as e:
        raise QServeLiteError(f"--launcher ray needs Ray Data ({e}): pip install 'qserve-lite[ray]' "
                              "(or 'ray[data]')") from None
    return ray


class ShardActor:
    """A Ray Data callable class: one worker per actor, one shard per call (module docstring)."""

    def __init__(self, spec: WorkerSpec, lock_ttl: float, max_attempts: int):
        self.spec, self.lock_ttl, self.max_attempts = spec, lock_ttl, max_attempts
        self.worker = spec.build()

    def __call__(self, batch: dict) -> dict:
        statuses = []
        for item in batch["shard"]:
            shard = Shard.from_dict(json.loads(str(item)))
            # wait=True: a retried task waits for the claim of the actor that died to expire
            st = run_one(self.worker, shard, lock_ttl=self.lock_ttl, unit=self.spec.unit, wait=True,
                         max_attempts=self.max_attempts)
            statuses.append(dict(st, gpu=os.environ.get("CUDA_VISIBLE_DEVICES")))
        return {"status": [json.dumps(s) for s in statuses]}


def ray_gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def run_ray(spec: WorkerSpec, shards: Sequence[Shard], gpus: int | None, *, lock_ttl: float,
            max_restarts: int = 3, gpus_per_worker: float = 1.0, address: str | None = None,
            on_status: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the shards on a pool of Ray actors (module docstring). gpus: actors (default: every GPU of the
    cluster). gpus_per_worker 0 runs CPU workers (the numpy engine)."""
    ray = import_ray()
    if not ray.is_initialized():
        # the workers import qserve_lite from where this process does (a checkout that is not installed)
        here = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    available = ray_gpus(ray)
    if gpus_per_worker > 0 and available < gpus_per_worker:
        raise QServeLiteError(f"the Ray cluster has {available} GPUs; start it on GPU nodes (ray start), or "
                              "run on the CPU with --device cpu")
    n = gpus if gpus is not None else max(1, int(available // gpus_per_worker) if gpus_per_worker else 1)
    n = max(1, min(n, len(shards)))
    items = [{"shard": json.dumps(s.to_dict())} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    resources = {"num_gpus": gpus_per_worker} if gpus_per_worker > 0 else {"num_cpus": 1}
    out = ds.map_batches(
        ShardActor,
        fn_constructor_kwargs={"spec": spec, "lock_ttl": lock_ttl, "max_attempts": max_restarts + 1},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=n), batch_format="numpy", **resources,
    )
    statuses = []
    for row in out.iter_rows():
        st = json.loads(str(row["status"]))
        statuses.append(st)
        if on_status is not None:
            on_status(st)
    return statuses
