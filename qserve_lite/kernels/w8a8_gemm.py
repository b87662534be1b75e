"""The integer GEMM core shared by every quantized linear, and QServe's W8A8 GEMM.

These numpy functions are the specification the CUDA kernels must match bit for bit:

- Main loop: acc[m, n] = sum_k q_x[m, k] * w[n, k], exact in int32 (the s8 x s8 -> s32 tensor-core MMA).
- W8A8 epilogue, fp32, each operation rounded to nearest even, left to right, no FMA contraction
  (write it with __fmul_rn / __fadd_rn in CUDA):
      out[m, n] = fp16( (fp32(acc[m, n]) * fp32(scales[n])) * fp32(sx[m]) )
  then, with a bias, out = fp16(fp32(out) + fp32(fp16(bias[n]))).

Exact integer accumulation on the CPU: numpy's integer matmul does not use BLAS and is ~100x slower than
float matmul. Instead both integer operands are converted to float64 and multiplied with BLAS dgemm.
Every product and every partial sum is an integer of magnitude < 2^53, and float64 represents those
exactly, so each BLAS addition (in any order, with or without FMA) is exact and the result equals the
int64 matmul. Here |q_x| <= 127 and |w| <= 255, so |acc| <= 127 * 255 * K, far below 2^53 for any K.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import is_cupy
from qserve_lite.kernels.cuda import gemm as cuda_gemm

INT32_MAX = 2**31 - 1


def exact_int_matmul(a, b, xp=np):
    """acc[m, n] = sum_k a[m, k] * b[n, k] for integer-valued a [M, K], b [N, K]; returns int32 [M, N].

    Runs as a float64 BLAS matmul (exact, see the module docstring). `b` may already be a float64 array
    of integer values (callers cache the converted weight so it is not re-converted every call).
    """
    assert a.shape[-1] == b.shape[-1], (a.shape, b.shape)
    acc = a.astype(xp.float64, copy=False) @ b.astype(xp.float64, copy=False).T
    # int32 is the kernel's accumulator; the bound holds for every shape this project meets (K < 66000).
    assert acc.size == 0 or float(xp.abs(acc).max()) <= INT32_MAX, "int32 accumulator overflow"
    return acc.astype(xp.int32)


def pad_k(q_x, k_pad: int, xp=np):
    """Zero-pad activations [M, K] to k_pad columns (weights padded along K meet zero activations)."""
    k = q_x.shape[-1]
    if k == k_pad:
        return q_x
    if k > k_pad:
        raise ValueError(f"activation has {k} input features, the weight only {k_pad}")
    out = xp.zeros((q_x.shape[0], k_pad), dtype=q_x.dtype)
    out[:, :k] = q_x
    return out


def add_bias_fp16(out16, bias, xp=np):
    """fp16 output + bias (rounded to fp16 first), as the GPU adds them: fp16(fp32(out) + fp32(bias))."""
    if bias is None:
        return out16
    b32 = xp.asarray(bias).astype(xp.float16).astype(xp.float32)
    return (out16.astype(xp.float32) + b32[None, :]).astype(xp.float16)


def w8a8_epilogue(acc, x_scales, w_scales, bias=None, xp=np):
    """fp16 [M, N] = fp16((fp32(acc) * w_scales[n]) * x_scales[m]) (+ bias); scales are fp16."""
    out = acc.astype(xp.float32) * w_scales.astype(xp.float16).astype(xp.float32)[None, :]
    out *= x_scales.astype(xp.float16).astype(xp.float32)[:, None]
    return add_bias_fp16(out.astype(xp.float16), bias, xp)


def w8a8_gemm(q_x, x_scales, codes, w_scales, bias=None, xp=np):
    """QServe W8A8: q_x int8 [M, K], x_scales fp16 [M], codes int8 [N, K] (or their float64 copy),
    w_scales fp16 [N] (QServe dequant_scale) -> fp16 [M, N].

    With xp = cupy and int8 codes this runs the CUDA kernel (cuda/gemm.cu, mode 2), bit-identical; float64
    codes (the emulation's cached BLAS operand) keep the emulation on either array module."""
    if is_cupy(xp) and codes.dtype == xp.int8:
        n, k = codes.shape
        return cuda_gemm.gemm("w8", q_x, codes, n, k, x_scales=x_scales, w_scales=w_scales, bias=bias)
    acc = exact_int_matmul(pad_k(q_x, codes.shape[1], xp), codes, xp)
    return w8a8_epilogue(acc, x_scales, w_scales, bias, xp)
