"""`--launcher local --gpus N`: one process per GPU on this machine, without Ray.

Each process is started with multiprocessing's spawn method (a fresh interpreter: nothing of the parent's
CUDA state) and with CUDA_VISIBLE_DEVICES set to its one GPU in its environment from the start, so CuPy, when
the worker loads it, sees that GPU only, as device 0. The GPUs are the parent's own CUDA_VISIBLE_DEVICES
list when it has one (e.g. what Slurm gave the job), else 0..N-1.

Every process builds its worker (one engine for its lifetime) and works through all the shards with
jobs/runner.work_through: shards are claimed with lock files, so the processes share them dynamically, and
so do several launches on one shared file system (Slurm array tasks, a rerun beside a running job). A
process that dies is started again (up to max_restarts times per GPU); its shard's claim expires at once
(its pid is gone) and the new process resumes it from the partial log.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from qserve_lite.errors import QServeLiteError
from qserve_lite.jobs.runner import WorkerSpec, work_through
from qserve_lite.jobs.shards import Shard


def visible_gpus(n: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each of n processes: the parent's own list, else 0..n-1."""
    if n < 1:
        raise ValueError(f"--gpus must be >= 1, got {n}")
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if parent:
        if len(parent) < n:
            raise ValueError(f"--gpus {n}, but CUDA_VISIBLE_DEVICES lists {len(parent)}: {','.join(parent)}")
        return parent[:n]
    return [str(i) for i in range(n)]


@contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _child(spec: WorkerSpec, shards: list[Shard], lock_ttl: float, max_attempts: int, index: int,
           out: mp.Queue, poll_s: float | None) -> None:
    """One process: build the worker, work through the shards (starting at a different one per process so
    they do not all queue on the same lock), send each status to the parent."""
    try:
        worker = spec.build()
    except QServeLiteError as e:  # a bad model or setting: the same in every process, so no restart
        out.put({"status": "fatal", "message": str(e)})
        return
    order = shards[index % len(shards):] + shards[: index % len(shards)] if shards else []
    work_through(worker, order, lock_ttl=lock_ttl, unit=spec.unit, poll_s=poll_s, max_attempts=max_attempts,
                 report=lambda st: out.put(dict(st, gpu=os.environ.get("CUDA_VISIBLE_DEVICES"))))


class _Pool:
    """The processes of run_local, one per GPU, and the statuses they sent."""

    def __init__(self, spec: WorkerSpec, shards: list[Shard], devices: list[str], lock_ttl: float,
                 max_attempts: int, poll_s: float | None, on_status: Callable[[dict], None] | None):
        self.ctx = mp.get_context("spawn")
        self.results: mp.Queue = self.ctx.Queue()
        self.args = (spec, shards, lock_ttl, max_attempts)
        self.devices, self.poll_s, self.on_status = devices, poll_s, on_status
        self.statuses: list[dict] = []
        self.procs: dict = {}

    def start(self, i: int) -> None:
        with _environ(CUDA_VISIBLE_DEVICES=self.devices[i]):  # the child's CuPy sees this GPU only
            p = self.ctx.Process(target=_child, args=(*self.args, i, self.results, self.poll_s),
                                 name=f"qserve-lite-gpu{self.devices[i]}")
            p.start()
        self.procs[i] = p

    def drain(self, timeout: float) -> bool:
        """Take one status from the queue (False when none came within timeout)."""
        try:
            st = self.results.get(timeout=timeout)
        except queue.Empty:
            return False
        if st.get("status") == "fatal":
            raise QServeLiteError(st["message"])
        self.statuses.append(st)
        if self.on_status is not None:
            self.on_status(st)
        return True

    def ended(self) -> list[tuple[int, int]]:
        """(index, exit code) of each process that ended since the last call."""
        out = []
        for i, p in list(self.procs.items()):
            if not p.is_alive():
                p.join()
                del self.procs[i]
                out.append((i, p.exitcode))
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
            p.join()


def run_local(spec: WorkerSpec, shards: Sequence[Shard], gpus: int, *, lock_ttl: float,
              max_restarts: int = 3, poll_s: float | None = None,
              on_status: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the shards on `gpus` spawned processes (module docstring); every status they reported. A dead
    process is started again up to max_restarts times per GPU, and a shard is given up after max_restarts
    + 1 workers died on it. A worker that cannot be built (a QServeLiteError: bad model, bad setting) stops
    the run with that error."""
    pool = _Pool(spec, list(shards), visible_gpus(gpus), lock_ttl, max_restarts + 1, poll_s, on_status)
    restarts = dict.fromkeys(range(gpus), 0)
    try:
        for i in range(gpus):
            pool.start(i)
        while pool.procs:
            pool.drain(0.2)
            for i, code in pool.ended():
                if code != 0 and restarts[i] < max_restarts:
                    restarts[i] += 1
                    pool.start(i)
        while pool.drain(0.2):  # what the last processes sent before they ended
            pass
    finally:
        pool.stop()
    return pool.statuses
