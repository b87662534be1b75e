"""The numpy communicator (core/comm.py PipeComm), the twin of NCCL's: in-place sums and broadcasts between
ranks on threads of one process (the runner's twin runs them between spawned processes)."""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest

from qserve_lite.core.comm import CommSpec, PipeComm, SingleComm, pipe_specs


def run_ranks(world: int, body) -> list:
    """body(comm) on every rank, each on its thread; their results in rank order."""
    comms = [spec.connect() for spec in pipe_specs(world, mp.get_context("spawn"))]
    results, errors = [None] * world, []

    def target(rank):
        try:
            results[rank] = body(comms[rank])
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_sums_in_place_on_every_rank(world):
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((5, 7)).astype(np.float16) for _ in range(world)]

    def body(comm):
        x = data[comm.rank].copy()
        view = x[1:4]  # a contiguous slice, as the model's buffers are
        comm.all_reduce(view)
        return x

    out = run_ranks(world, body)
    exact = sum(d[1:4].astype(np.float64) for d in data)
    for x in out:
        assert np.array_equal(x[1:4], exact.astype(np.float16))  # one rounding of the exact sum
    for r, x in enumerate(out):
        assert np.array_equal(x[[0, 4]], data[r][[0, 4]])
    if world == 2:  # NCCL's fp16 sum of two ranks: fp16(a + b)
        a, b = data[0][1:4].astype(np.float32), data[1][1:4].astype(np.float32)
        assert np.array_equal(out[1][1:4], (a + b).astype(np.float16))


def test_broadcast_copies_rank_0():
    def body(comm):
        x = np.full(6, comm.rank + 10, dtype=np.int32)
        comm.broadcast(x)
        return x

    assert all(np.array_equal(x, np.full(6, 10)) for x in run_ranks(3, body))


def test_world_of_one_is_a_no_op():
    assert isinstance(CommSpec("pipe").connect(), SingleComm)
    x = np.arange(4.0)
    SingleComm().all_reduce(x)
    assert np.array_equal(x, np.arange(4.0))
    with pytest.raises(ValueError):
        PipeComm(2, 0, []).broadcast(x, root=1)
