"""The worker loop (jobs/runner.py) with a fake worker: skip done shards, report claimed ones, give a shard up
after its workers died too often, one merged status per shard."""

from __future__ import annotations

import json
import os
import time

from qserve_lite.jobs.runner import merge_statuses, run_one, work_through
from qserve_lite.jobs.shards import finish_shard, list_shards


class FakeWorker:
    config_hash = "h"

    def __init__(self, fail: bool = False):
        self.ran, self.fail = [], fail

    def process(self, shard, bar):
        self.ran.append(shard.name)
        if self.fail:
            raise OSError("input unreadable")
        return finish_shard(shard, lambda f: f.write("x\n"), {"rows": 1, "errors": 0, "done": 1}, "h")


def _shards(tmp_path, n):
    (tmp_path / "in").mkdir()
    for i in range(n):
        (tmp_path / "in" / f"s{i}.jsonl").write_text("{}\n")
    return list_shards([tmp_path / "in"], tmp_path / "out", ".jsonl")


def test_done_shards_are_skipped_and_failures_are_statuses(tmp_path):
    shards = _shards(tmp_path, 2)
    w = FakeWorker()
    assert [s["status"] for s in work_through(w, shards, lock_ttl=10)] == ["done", "done"]
    assert [s["status"] for s in work_through(w, shards, lock_ttl=10)] == ["skipped", "skipped"]
    assert w.ran == ["s0", "s1"]
    shards[0].done.unlink()
    st = run_one(FakeWorker(fail=True), shards[0], lock_ttl=10)
    assert st["status"] == "error" and "OSError: input unreadable" in st["message"]
    assert not shards[0].lock.exists()


def test_a_shard_held_by_a_live_worker_is_waited_for(tmp_path):
    shards = _shards(tmp_path, 1)
    shards[0].out_dir.mkdir()
    shards[0].lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t"}))
    assert run_one(FakeWorker(), shards[0], lock_ttl=60)["status"] == "claimed"
    t0 = time.monotonic()
    w = FakeWorker()
    statuses = work_through(w, shards, lock_ttl=0.5, poll_s=0.05)  # its claim is never renewed: expires
    assert [s["status"] for s in statuses] == ["done"] and time.monotonic() - t0 >= 0.4


def test_a_shard_whose_workers_keep_dying_is_given_up(tmp_path):
    shards = _shards(tmp_path, 1)
    shards[0].out_dir.mkdir()
    shards[0].lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "attempt": 4}))
    old = time.time() - 100
    os.utime(shards[0].lock, (old, old))
    w = FakeWorker()
    st = run_one(w, shards[0], lock_ttl=10, max_attempts=4)
    assert st["status"] == "error" and "4 workers died" in st["message"] and w.ran == []
    assert not shards[0].lock.exists()  # the next run starts counting again
    assert run_one(w, shards[0], lock_ttl=10, max_attempts=4)["status"] == "done"


def test_merge_keeps_what_happened_to_each_shard(tmp_path):
    shards = _shards(tmp_path, 3)
    got = merge_statuses(shards, [{"shard": "s0", "status": "skipped"}, {"shard": "s0", "status": "done"},
                                  {"shard": "s1", "status": "claimed"}, {"shard": "s1", "status": "error"}])
    assert [s["status"] for s in got] == ["done", "error", "missing"]
