"""Launcher of cuda/sample.cu: filtered sampling, one block per sampled row (spec: kernels/sample.py).

The per-row parameters travel in one int32 array (one host-to-device copy); the kernel writes the
temperature-scaled rows to a scratch buffer [rows, V rounded up to 4] that its later passes read."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import c_rows
from qserve_lite.kernels.cuda.jit import get_kernel

THREADS = 512
BINS = 2048
SMEM_BYTES = 2 * BINS * (4 + 8)  # two histograms: count u32 + mass u64 per bin


def pack_params(rows, temps, k, p, log_min_p, u) -> np.ndarray:
    """int32 [6 * R]: rows, k, then the fp32 bits of temps, p, log_min_p, u (the kernel's layout)."""
    f32 = [np.ascontiguousarray(a, dtype=np.float32).view(np.int32) for a in (temps, p, log_min_p, u)]
    return np.concatenate([np.asarray(rows, dtype=np.int32), np.asarray(k, dtype=np.int32), *f32])


def sample_rows(logits, rows, temps, k, p, log_min_p, u):
    """int32 [R] (CuPy): the token drawn for logits[rows[r]] (fp32 [B, V], contiguous rows) with the
    normalized parameters of kernels/sample.row_params."""
    cp = import_cupy()
    logits = c_rows(logits, "logits")
    if logits.dtype != cp.float32:
        raise ValueError(f"sample: expected float32 logits, got {logits.dtype}")
    B, V = logits.shape
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= B):
        raise ValueError(f"sample: row indices must be in [0, {B}), got {rows.min()}..{rows.max()}")
    R = len(rows)
    out = cp.empty((R,), dtype=cp.int32)
    if R == 0:
        return out
    if np.any(np.asarray(temps) <= 0):
        raise ValueError("sample: temperatures must be > 0 (greedy rows take the argmax)")
    ldl = logits.strides[0] // 4 if B > 1 else V
    Vp = -(-V // 4) * 4
    scratch = cp.empty((R, Vp), dtype=cp.float32)
    params = cp.asarray(pack_params(rows, temps, k, p, log_min_p, u))
    get_kernel("sample.cu", "qs_sample", {"QS_SP_THREADS": THREADS}, dynamic_smem=SMEM_BYTES)(
        (R,), (THREADS,), (logits, np.int64(ldl), params, np.int32(V), np.int32(Vp), scratch, out),
        shared_mem=SMEM_BYTES)
    return out
