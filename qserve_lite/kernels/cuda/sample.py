"""Launcher of cuda/sample.cu: one sampled token per row of fp32 logits (spec: kernels/sample.py)."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import c_rows
from qserve_lite.kernels.cuda.jit import get_kernel

THREADS = 1024
MAX_TILES = 256  # vocabulary up to 256 x 1,024 entries (the per-tile sums of the draw live in shared memory)


_tables: dict = {}


def _table(mass_table):
    """The mass table on the current device, copied once (not once per decode step)."""
    cp = import_cupy()
    key = cp.cuda.Device().id
    if key not in _tables:
        _tables[key] = cp.asarray(np.ascontiguousarray(mass_table, dtype=np.uint32))
    return _tables[key]


def sample_rows(logits, temperature, top_k, top_p, minp_log, u, mass_table):
    """int32 [R] on the device; the per-row parameters are host arrays (see kernels/sample.sample_rows;
    minp_log: fp32 log(min_p), -inf where min-p is off)."""
    cp = import_cupy()
    logits = c_rows(logits, "logits")
    if logits.dtype != cp.float32:
        raise ValueError(f"sample: expected float32 logits, got {logits.dtype}")
    R, V = logits.shape
    if V > THREADS * MAX_TILES:
        raise ValueError(f"sample: at most {THREADS * MAX_TILES} vocabulary entries, got {V}")
    out = cp.empty((R,), dtype=cp.int32)
    if R == 0:
        return out
    host = [(temperature, np.float32), (top_k, np.int32), (top_p, np.float64), (minp_log, np.float32),
            (u, np.float64)]
    args = tuple(cp.asarray(np.ascontiguousarray(a, dtype=t)) for a, t in host) + (_table(mass_table),)
    ld = logits.strides[0] // 4 if R > 1 else V
    kern = get_kernel("sample.cu", "qs_sample", {"QS_SMP_THREADS": THREADS, "QS_SMP_MAX_TILES": MAX_TILES})
    kern((R,), (THREADS,), (logits, np.int64(ld), np.int32(V), *args, out))
    return out
