"""Bulk jobs over input shards, on one process, one process per GPU (jobs/local.py) or Ray Data
(jobs/ray_runner.py): the shard contract (shards.py: atomic results, done-markers, partial logs, manifest),
expiring claims (locks.py), progress (progress.py), the worker loop (runner.py) and the driver (job.py).
The launch flags of every job command: flags.py. Nothing here knows what a shard holds: `qserve-lite batch`
(batch/) and `qserve-lite caption` (caption/) plug in a WorkerSpec."""
