"""Communicators of tensor parallelism: one per rank process, with the two collectives the sharded forward
needs. Every rank calls them in the same order (NCCL's rule, and the pipes' too).

    all_reduce(x)           x = the sum of every rank's x, in place (x contiguous)
    broadcast(x, root=0)    x = rank 0's x, in place

- `SingleComm`: world size 1, both collectives are no-ops (numpy, or a GPU run that needs no NCCL).
- `NcclComm`: cupy.cuda.nccl, one GPU per process, the communicator built from rank 0's unique id. Both
  collectives are issued on the *current* CUDA stream, so a decode step captured into a CUDA graph (on the
  capture stream) captures them too (NCCL >= 2.9). NCCL sums fp16 in fp16: for 2 ranks that is fp16(a + b),
  one rounding of the exact sum.
- `PipeComm`: host numpy arrays over multiprocessing connections, a star through rank 0 (the numpy twin of
  NcclComm, used by the runner's numpy twin and the tests). Rank 0 adds the ranks' arrays in rank order in
  float64 and rounds once to the array's dtype: for 2 ranks exactly NCCL's fp16 / fp32 sum.

`CommSpec` is the picklable recipe a spawned rank turns into its communicator (`connect()`); `nccl_specs` /
`pipe_specs` make one per rank. NcclComm's constructor is collective: every rank must call connect()
concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.errors import DeviceError


class Communicator(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x) -> None: ...

    def broadcast(self, x, root: int = 0) -> None: ...


class SingleComm:
    """World size 1: nothing to reduce or send."""

    rank, world_size = 0, 1

    def all_reduce(self, x) -> None:
        return None

    def broadcast(self, x, root: int = 0) -> None:
        return None

    def abort(self) -> None:
        return None


def import_nccl():
    """cupy.cuda.nccl, or a DeviceError saying how to get NCCL."""
    import_cupy()
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise DeviceError(f"tensor parallelism needs NCCL through cupy.cuda.nccl, which failed to import "
                          f"({e}); pip install nvidia-nccl-cu12 (or -cu13, matching cupy)") from None
    if not getattr(nccl, "available", True):
        raise DeviceError("tensor parallelism needs NCCL: cupy found no libnccl; pip install "
                          "nvidia-nccl-cu12 (or -cu13, matching cupy)")
    return nccl


def _nccl_dtype(nccl, dtype) -> int:
    kinds = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
             np.dtype(np.int32): nccl.NCCL_INT32}
    try:
        return kinds[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"NcclComm: unsupported dtype {dtype}") from None


class NcclComm:
    """One rank of an NCCL communicator (this process's current GPU)."""

    def __init__(self, world_size: int, unique_id, rank: int):
        self.cp = import_cupy()
        self.nccl = import_nccl()
        self.rank, self.world_size = rank, world_size
        self.comm = self.nccl.NcclCommunicator(world_size, unique_id, rank)

    @staticmethod
    def unique_id():
        return import_nccl().get_unique_id()

    def _args(self, x):
        if not x.flags.c_contiguous:
            raise ValueError("NcclComm: collectives need contiguous arrays")
        return x.data.ptr, x.size, _nccl_dtype(self.nccl, x.dtype), self.cp.cuda.get_current_stream().ptr

    def all_reduce(self, x) -> None:
        ptr, n, dtype, stream = self._args(x)
        self.comm.allReduce(ptr, ptr, n, dtype, self.nccl.NCCL_SUM, stream)

    def broadcast(self, x, root: int = 0) -> None:
        ptr, n, dtype, stream = self._args(x)
        self.comm.broadcast(ptr, ptr, n, dtype, root, stream)

    def abort(self) -> None:
        """Make collectives blocked on a dead rank fail instead of hanging (ncclCommAbort)."""
        abort = getattr(self.comm, "abort", None)
        if abort is not None:
            abort()


class PipeComm:
    """Numpy collectives over connections: rank 0 holds one to every other rank, the others one to rank 0."""

    def __init__(self, world_size: int, rank: int, conns: list):
        self.rank, self.world_size, self.conns = rank, world_size, conns

    def all_reduce(self, x) -> None:
        if self.rank != 0:
            self.conns[0].send_bytes(np.ascontiguousarray(x).tobytes())
            x[...] = np.frombuffer(self.conns[0].recv_bytes(), dtype=x.dtype).reshape(x.shape)
            return
        acc = x.astype(np.float64)
        for conn in self.conns:
            acc += np.frombuffer(conn.recv_bytes(), dtype=x.dtype).reshape(x.shape)
        x[...] = acc.astype(x.dtype)
        data = np.ascontiguousarray(x).tobytes()
        for conn in self.conns:
            conn.send_bytes(data)

    def broadcast(self, x, root: int = 0) -> None:
        if root != 0:
            raise ValueError("PipeComm broadcasts from rank 0 only")
        if self.rank != 0:
            x[...] = np.frombuffer(self.conns[0].recv_bytes(), dtype=x.dtype).reshape(x.shape)
            return
        data = np.ascontiguousarray(x).tobytes()
        for conn in self.conns:
            conn.send_bytes(data)

    def abort(self) -> None:
        for conn in self.conns:
            conn.close()


@dataclass
class CommSpec:
    """What one rank needs to join its group (picklable into a spawned process)."""

    kind: str  # "single" | "nccl" | "pipe"
    rank: int = 0
    world_size: int = 1
    unique_id: tuple | None = None  # nccl
    conns: list = field(default_factory=list)  # pipe

    def connect(self) -> Communicator:
        """The rank's communicator (nccl: collective, every rank must call it concurrently)."""
        if self.kind == "single" or self.world_size == 1 and self.kind == "pipe":
            return SingleComm()
        if self.kind == "nccl":
            return NcclComm(self.world_size, self.unique_id, self.rank)
        if self.kind == "pipe":
            return PipeComm(self.world_size, self.rank, self.conns)
        raise ValueError(f"unknown communicator kind {self.kind!r}")


def nccl_specs(world_size: int) -> list[CommSpec]:
    uid = NcclComm.unique_id()
    return [CommSpec("nccl", r, world_size, unique_id=uid) for r in range(world_size)]


def pipe_specs(world_size: int, context) -> list[CommSpec]:
    """One spec per rank; `context` is the multiprocessing context whose Pipe connects them."""
    pairs = [context.Pipe() for _ in range(world_size - 1)]
    specs = [CommSpec("pipe", 0, world_size, conns=[a for a, _ in pairs])]
    specs += [CommSpec("pipe", r, world_size, conns=[b]) for r, (_, b) in enumerate(pairs, start=1)]
    return specs
