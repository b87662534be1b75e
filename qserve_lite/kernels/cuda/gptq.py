"""Launcher of cuda/gptq.cu: GPTQ's column loop over one block of columns (spec: kernels/gptq.py)."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.jit import get_kernel

THREADS = 32  # output channels per block (each thread keeps its errors in shared memory)
MAX_NB = 128  # columns per launch (the shared-memory error array: MAX_NB x THREADS float64 = 32 KB)
KIND_IDS = {"w4_per_channel": 0, "w4_progressive": 1, "w8": 2}


def gptq_block(w, hb, params, gidx: np.ndarray):
    """(qt, e) [nb, n] float64 of the block w [nb, n] (C-contiguous float64) with hb [nb, >= nb] the block's
    rows and columns of the upper factor (float64, unit inner stride); `params` a kernels.gptq.ColumnParams
    on cupy; gidx [nb] int32 groups."""
    cp = import_cupy()
    nb, n = w.shape
    if not 1 <= nb <= MAX_NB:
        raise ValueError(f"gptq block: 1 to {MAX_NB} columns per launch, got {nb}")
    if w.dtype != cp.float64 or not w.flags.c_contiguous:
        raise ValueError("gptq block: w must be C-contiguous float64")
    if hb.dtype != cp.float64 or hb.ndim != 2 or hb.strides[1] != 8 or hb.shape[0] < nb or hb.shape[1] < nb:
        raise ValueError(f"gptq block: hb must be float64 [>= {nb}, >= {nb}] with unit column stride")
    kind = KIND_IDS[params.kind]

    def vec(a, shape):
        a = cp.ascontiguousarray(cp.asarray(a, dtype=cp.float64))
        if a.shape != shape:
            raise ValueError(f"gptq block: {params.kind} parameter of shape {a.shape}, expected {shape}")
        return a

    p0 = vec(params.p0, (n,))
    if kind == 1:
        groups = params.p1.shape[1]
        p1, p2 = vec(params.p1, (n, groups)), vec(params.p2, (n, groups))
    else:
        groups = 1
        p1 = vec(params.p1, (n,)) if kind == 0 else p0
        p2 = p0
    g = cp.asarray(np.ascontiguousarray(gidx, dtype=np.int32))
    qt = cp.empty((nb, n), dtype=cp.float64)
    err = cp.empty((nb, n), dtype=cp.float64)
    kern = get_kernel("gptq.cu", "qs_gptq_block", {"QS_GPTQ_KIND": kind, "QS_GPTQ_THREADS": THREADS,
                                                  "QS_GPTQ_MAX_NB": MAX_NB})
    kern((-(-n // THREADS),), (THREADS,),
         (w, hb, np.int64(hb.strides[0] // 8), np.int32(nb), np.int32(n), qt, err, p0, p1, p2, g,
          np.int32(groups), np.float64(params.protect)))
    return qt, err
