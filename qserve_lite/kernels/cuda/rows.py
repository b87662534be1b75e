"""Launcher of cuda/rows.cu, the per-token row kernels: INT8 quantization, residual-add + RMSNorm (+ quant),
SiLU(gate) * up (+ quant), one block per row with the row in registers. Public entry points (and numpy
twins): kernels/act_quant.py and kernels/norm_quant.py."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import aligned16, c_rows, int32_array, ptr_or_null, vector
from qserve_lite.kernels.cuda.jit import get_kernel
from qserve_lite.kernels.fusions import step_fusions

ROW_OPS = {"quant": 0, "rmsnorm": 1, "silu": 2}
MAX_PREFETCH_THREADS = 512  # QS_PREFETCH holds 4 more registers per chunk: not at 1024 threads (64 at most)


def _row_geometry(k: int) -> tuple[int, int]:
    """(chunks of 8 per thread, threads) for a row of k elements: one block per row, row in registers."""
    chunks = max(1, -(-k // 8))
    for nc in (1, 2, 4, 8):
        threads = -(-chunks // nc)
        if threads <= (256 if nc < 4 else 1024) or nc == 8:
            break
    threads = -(-threads // 32) * 32
    if threads > 1024:
        raise ValueError(f"row kernels support rows of at most {8 * 8 * 1024} elements, got {k}")
    return nc, threads


def rows(op: str, x, k: int, *, residual=None, gamma=None, eps: float = 0.0, want_y: bool = False,
         want_q: bool = True, want_sum: bool = True, ids=None):
    """Runs cuda/rows.cu over the rows of x (2-D), or with ids (int32 [m]) over x[ids] (the gather done by
    the kernel). Returns (y, q, scales, sums, residual_out); unrequested outputs are None."""
    cupy = import_cupy()
    op_id = ROW_OPS[op]
    x = c_rows(x, "input")
    x_rows = x.shape[0]
    if ids is not None:
        ids = int32_array(ids, "ids")
        if ids.ndim != 1:
            raise ValueError(f"ids: expected a 1-D array, got shape {ids.shape}")
        if x_rows == 0:
            raise ValueError("ids: gathering from an empty table")
    m = x_rows if ids is None else ids.shape[0]
    in_f32 = op_id == 0 and x.dtype == cupy.float32
    if not in_f32 and x.dtype != cupy.float16:
        raise ValueError(f"{op}: expected float16 input, got {x.dtype}")
    width = 2 * k if op_id == 2 else k
    if x.shape[1] != width:
        raise ValueError(f"{op}: expected rows of {width} elements, got {x.shape[1]}")
    y = cupy.empty((m, k), dtype=cupy.float16) if want_y else None
    q = cupy.empty((m, k), dtype=cupy.int8) if want_q else None
    scales = cupy.empty((m,), dtype=cupy.float16) if want_q else None
    sums = cupy.empty((m,), dtype=cupy.float32) if want_q and want_sum else None
    res_out = None
    if op_id == 1:
        gamma = vector(gamma, k, cupy.float16, "norm weight")
        res_out = cupy.empty((m, k), dtype=cupy.float16)
        if residual is not None:
            residual = c_rows(residual, "residual")
            if residual.shape != (m, k) or residual.dtype != cupy.float16:
                raise ValueError(f"residual: expected {(m, k)} float16, got {residual.shape} "
                                 f"{residual.dtype}")
    if m == 0:
        return y, q, scales, sums, res_out
    ldx = x.strides[0] // x.itemsize if x_rows > 1 else width
    ldr = residual.strides[0] // 2 if residual is not None and m > 1 else k
    vec = k % 8 == 0 and ldx % 8 == 0 and aligned16(x) and (residual is None or (ldr % 8 == 0 and
                                                                                  aligned16(residual)))
    if gamma is not None:
        vec = vec and aligned16(gamma)
    nc, threads = _row_geometry(k)
    defines = {"QS_ROW_OP": op_id, "QS_NC": nc, "QS_VEC": int(vec), "QS_IN_F32": int(in_f32)}
    if op_id == 1 and vec and threads <= MAX_PREFETCH_THREADS and step_fusions():
        defines["QS_PREFETCH"] = 1
    kern = get_kernel("rows.cu", "qs_rows", defines)
    kern((m,), (threads,), (
        x, np.int64(ldx), ptr_or_null(ids), np.int32(x_rows), ptr_or_null(residual), np.int64(ldr),
        ptr_or_null(res_out), np.int64(k),
        ptr_or_null(gamma), np.float64(eps), ptr_or_null(y), np.int64(k), ptr_or_null(q), np.int64(k),
        ptr_or_null(scales), ptr_or_null(sums), np.int32(k),
    ))
    return y, q, scales, sums, res_out
