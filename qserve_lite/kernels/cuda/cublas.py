"""The "dequantize once + cuBLAS INT8" route (a prefill option; not capturable in a CUDA graph): unpack a
W4 weight to row-major int8 once (`w4_to_int8`, cuda/cublas.cu), multiply with cuBLAS gemmEx
(`int8_matmul_cublas`), then apply the W4 / W8 epilogue of cuda/gemm.cu to the int32 result (`epilogue_i32`,
cuda/cublas.cu). Reached through kernels/w4a8_gemm.py (method="cublas") and benchmarks/kernels.py."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import NULL, ptr_or_null, vector
from qserve_lite.kernels.cuda.blas import cublas_lib, handle_on_current_stream
from qserve_lite.kernels.cuda.gemm import MODES
from qserve_lite.kernels.cuda.jit import get_kernel


def w4_to_int8(qweight, s2_scales=None, s2_zeros=None):
    """Packed W4 [n, K/2] -> row-major int8 [n, K]: codes (per-channel) or level-1 weights (g128)."""
    cupy = import_cupy()
    qweight = cupy.ascontiguousarray(qweight)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % 32 or k % 32:
        raise ValueError(f"packed W4 weight: n and K must be multiples of 32, got {n}, {k}")
    out = cupy.empty((n, k), dtype=cupy.int8)
    lanes = n * k // 32
    kern = get_kernel("cublas.cu", "qs_w4_to_int8")
    if s2_scales is not None:
        s2_scales, s2_zeros = cupy.ascontiguousarray(s2_scales), cupy.ascontiguousarray(s2_zeros)
    kern(((lanes + 255) // 256,), (256,), (qweight, ptr_or_null(s2_scales), ptr_or_null(s2_zeros), out,
                                          np.int32(n), np.int32(k)))
    return out


CUDA_R_8I, CUDA_R_32I, CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT = 3, 10, 72, -1
_ONE = np.ones(1, dtype=np.int32)
_ZERO = np.zeros(1, dtype=np.int32)


def int8_matmul_cublas(q_x, w8, out=None):
    """int32 [M, N] = q_x int8 [M, K] . w8 int8 [N, K]^T with cuBLAS gemmEx (tensor cores, exact).

    Not capturable in a CUDA graph (CuPy refuses cuBLAS during capture). K must be a multiple of 4."""
    cupy = import_cupy()
    cublas = cublas_lib()
    q_x = cupy.ascontiguousarray(q_x)
    w8 = cupy.ascontiguousarray(w8)
    m, k = q_x.shape
    n = w8.shape[0]
    if w8.shape[1] != k or k % 4:
        raise ValueError(f"int8 GEMM: K must match and be a multiple of 4, got {q_x.shape} x {w8.shape}")
    if out is None:
        out = cupy.empty((m, n), dtype=cupy.int32)
    handle = handle_on_current_stream()
    # Row-major Y[M, N] = X W^T is column-major Y^T[N, M] = op(W) X with op = T on W stored [N, K].
    cublas.gemmEx(handle, 1, 0, n, m, k, _ONE.ctypes.data, w8.data.ptr, CUDA_R_8I, k, q_x.data.ptr, CUDA_R_8I,
                  k, _ZERO.ctypes.data, out.data.ptr, CUDA_R_32I, n, CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT)
    return out


def epilogue_i32(acc, mode: str, x_scales, w_scales, x_sums=None, w_szeros=None, bias=None):
    """fp16 [M, N] from int32 accumulators with the W4/W8 epilogue of cuda/gemm.cu."""
    cupy = import_cupy()
    m, n = acc.shape
    out = cupy.empty((m, n), dtype=cupy.float16)
    mode_id = MODES[mode]
    kern = get_kernel("cublas.cu", "qs_epilogue_i32")
    kern((-(-n // 2048), m), (256,), (
        cupy.ascontiguousarray(acc), vector(w_scales, n, cupy.float16, "w_scales"),
        NULL if mode_id != 0 else vector(w_szeros, n, cupy.float16, "w_szeros"),
        vector(x_scales, m, cupy.float16, "x_scales"),
        NULL if mode_id != 0 else vector(x_sums, m, cupy.float32, "x_sums"),
        NULL if bias is None else vector(bias, n, cupy.float16, "bias"), out, np.int32(m), np.int32(n),
        np.int32(0 if mode_id == 0 else 1),
    ))
    return out
