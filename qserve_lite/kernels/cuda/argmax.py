"""Launcher of cuda/argmax.cu: the argmax of each row of fp32 logits (spec: kernels/argmax.py). Launch
geometry depends only on host-side sizes."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import aligned16, c_rows, ptr_or_null
from qserve_lite.kernels.cuda.device import sm_count
from qserve_lite.kernels.cuda.jit import get_kernel

THREADS = 512
MIN_PER_THREAD = 16  # elements a thread scans at least, before a row is split over more blocks
COMBINE_ROWS = 8  # rows per block of the combine pass (a warp each)


def argmax_splits(rows: int, n: int, sms: int) -> tuple[int, int]:
    """(splits, chunk): each row split into `splits` slices of `chunk` columns (a multiple of 4), so that
    about one block per SM runs, each thread scanning at least MIN_PER_THREAD elements."""
    want = -(-sms // rows)
    most = max(1, n // (THREADS * MIN_PER_THREAD))
    splits = max(1, min(want, most, 1024))
    per_split = -(-n // splits)
    chunk = -(-per_split // 4) * 4
    return -(-n // chunk), chunk


def argmax_rows(x):
    """int32 [rows]: the argmax of each row of x (fp32 [rows, n], contiguous rows)."""
    cp = import_cupy()
    x = c_rows(x, "logits")
    if x.dtype != cp.float32:
        raise ValueError(f"argmax: expected float32 logits, got {x.dtype}")
    m, n = x.shape
    out = cp.empty((m,), dtype=cp.int32)
    if m == 0:
        return out
    ldx = x.strides[0] // 4 if m > 1 else n
    vec = n % 4 == 0 and ldx % 4 == 0 and aligned16(x)
    splits, chunk = argmax_splits(m, n, sm_count())
    defines = {"QS_AM_THREADS": THREADS, "QS_VEC": int(vec)}
    partial = cp.empty((m, splits), dtype=cp.uint64) if splits > 1 else None
    get_kernel("argmax.cu", "qs_argmax", defines)(
        (m, splits), (THREADS,), (x, np.int64(ldx), np.int32(n), np.int32(chunk), ptr_or_null(partial), out))
    if splits > 1:
        get_kernel("argmax.cu", "qs_argmax_combine", defines)(
            (-(-m // COMBINE_ROWS),), (32 * COMBINE_ROWS,), (partial, np.int32(splits), out, np.int32(m)))
    return out
