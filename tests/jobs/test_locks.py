"""Expiring shard claims (jobs/locks.py): one holder at a time, expiry by heartbeat age or a dead pid,
attempts counted across dead holders, the heartbeat keeping a live claim."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

from qserve_lite.jobs.locks import ShardLock, is_expired, read_holder


def _fake_holder(path, *, host="elsewhere", pid=1, age=0.0, attempt=1):
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "x", "attempt": attempt}))
    t = time.time() - age
    os.utime(path, (t, t))


def test_one_holder_at_a_time_and_release(tmp_path):
    path = tmp_path / "s.lock"
    a, b = ShardLock(path, ttl=60), ShardLock(path, ttl=60)
    assert a.acquire() and not b.acquire()
    assert read_holder(path)["pid"] == os.getpid() and a.attempt == 1
    a.release()
    assert not path.exists()
    assert b.acquire()
    a.release()  # not held: does not remove b's claim
    assert path.exists() and b.still_ours()
    b.release()


def test_a_claim_expires_when_its_heartbeat_stops(tmp_path):
    path = tmp_path / "s.lock"
    _fake_holder(path, age=5.0)
    assert not ShardLock(path, ttl=60).acquire()  # another host's claim, 5 s old: live
    _fake_holder(path, age=120.0, attempt=2)
    lock = ShardLock(path, ttl=60)
    assert lock.acquire()
    assert lock.attempt == 3 and read_holder(path)["attempt"] == 3  # the dead holders' attempts count
    lock.release()


def test_a_dead_process_on_this_host_loses_its_claim_at_once(tmp_path):
    path = tmp_path / "s.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    _fake_holder(path, host=socket.gethostname(), pid=int(dead.stdout))
    assert is_expired(path, ttl=3600)
    _fake_holder(path, host=socket.gethostname(), pid=os.getpid())
    assert not is_expired(path, ttl=3600)


def test_wait_takes_the_claim_once_it_expires_and_the_heartbeat_keeps_ours(tmp_path):
    path = tmp_path / "s.lock"
    _fake_holder(path)  # fresh, never refreshed
    t0 = time.monotonic()
    lock = ShardLock(path, ttl=0.4)
    assert lock.acquire(wait=True, poll_s=0.05)
    assert 0.3 < time.monotonic() - t0 < 5
    time.sleep(1.0)  # 2.5 ttl: only the heartbeat keeps it fresh
    assert not is_expired(path, ttl=0.4) and not ShardLock(path, ttl=0.4).acquire()
    lock.release()


def _grab(path, ttl, start, results):
    start.wait()
    lock = ShardLock(path, ttl)
    got = lock.acquire()
    results.put(got)
    if got:
        time.sleep(0.5)  # hold it while the others try
        lock.release()


def test_many_processes_take_over_an_expired_claim_exactly_once(tmp_path):
    path = tmp_path / "s.lock"
    _fake_holder(path, age=100.0)
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_grab, args=(path, 10.0, start, results)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(got) == 1
