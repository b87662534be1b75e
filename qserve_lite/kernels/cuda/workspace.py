"""TEMPORARY (replaced by the kernels split): pin/release of split-K workspaces for CUDA graphs."""

from __future__ import annotations

from qserve_lite.kernels.cuda import _gpu
from qserve_lite.kernels.cuda import attention as _gpu_attention


def _key(stream):
    import cupy

    return (cupy.cuda.Device().id, stream.ptr)


def pin_workspaces(stream) -> list:
    key = _key(stream)
    return [w.bufs.get(key) for w in (_gpu._workspace, _gpu_attention._workspace)]


def release_workspaces(stream) -> None:
    key = _key(stream)
    for w in (_gpu._workspace, _gpu_attention._workspace):
        with w.lock:
            w.bufs.pop(key, None)
