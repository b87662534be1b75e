"""QServe's W4A8 GEMMs: per-channel (QoQ "gchn") and progressive per-group (QoQ g128).

These numpy functions are the specification the CUDA kernels must match bit for bit. Activations come
from ops.act_quant.quantize_per_token (q_x int8, sx fp16, xsum fp32); integer accumulation is exact
(ops.w8a8_gemm.exact_int_matmul). Epilogues run in fp32, each operation rounded to nearest even, left to
right, with no FMA contraction (use __fmul_rn / __fsub_rn in CUDA), then round once to fp16.

Per-channel (weights W_hat = codes * s1 - szeros, codes uint4 0..15):
    acc[m, n] = sum_k q_x[m, k] * codes[n, k]              no zero subtraction in the main loop
    out[m, n] = fp16( (fp32(acc) * s1[n]) * sx[m]  -  szeros[n] * xsum[m] )
  The zero term uses xsum, the per-token sum of the fp16 activation *before* quantization (QServe's
  Σx), not sx * Σq: this is what the kernel computes, and differs from (q_x * sx) @ W_hat^T by that much.

Progressive g128 (W_hat = s1 * u8, u8 = codes * s2 - z per group of 128 input channels):
    u8[n, k]  = int8( (uint8(codes * s2) + uint8(-z mod 256)) mod 256 )    "subtraction after multiplication"
    acc[m, n] = sum_k q_x[m, k] * u8[n, k]
    out[m, n] = fp16( (fp32(acc) * s1[n]) * sx[m] )
  The byte-lane arithmetic is exact because codes * s2 <= 255 and the true u8 lies in [-128, 127]
  (guaranteed by the protective range); group_level1 checks both.

K padding: weights whose codes are wider than the activation (K padded to a multiple of the group size)
are multiplied by zero-padded activations, which is exact. Bias (fp16) is added after fp16 rounding.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import is_cupy
from qserve_lite.core.pack import from_qserve_group_params, unpack_w4
from qserve_lite.kernels.cuda import cublas as cuda_cublas
from qserve_lite.kernels.cuda import gemm as cuda_gemm
from qserve_lite.kernels.w8a8_gemm import add_bias_fp16, exact_int_matmul, pad_k


def _f32(a, xp):
    """fp16 parameter -> fp32 (rounds to fp16 first, so float32 inputs behave like the stored fp16)."""
    return xp.asarray(a).astype(xp.float16).astype(xp.float32)


def w4a8_per_channel_epilogue(acc, x_scales, x_sums, s1_scales, s1_szeros, bias=None, xp=np):
    """fp16 [M, N] = fp16((fp32(acc) * s1[n]) * sx[m] - szeros[n] * xsum[m]) (+ bias)."""
    out = acc.astype(xp.float32) * _f32(s1_scales, xp)[None, :]
    out *= _f32(x_scales, xp)[:, None]
    out -= _f32(s1_szeros, xp)[None, :] * xp.asarray(x_sums, dtype=xp.float32)[:, None]
    return add_bias_fp16(out.astype(xp.float16), bias, xp)


def w4a8_per_channel_gemm(q_x, x_scales, x_sums, codes, s1_scales, s1_szeros, bias=None, xp=np):
    """q_x int8 [M, K], x_scales fp16 [M], x_sums fp32 [M]; codes uint8 [N, K_pad] in 0..15 (or their
    float64 copy), s1_scales / s1_szeros fp16 [N] -> fp16 [M, N]."""
    acc = exact_int_matmul(pad_k(q_x, codes.shape[1], xp), codes, xp)
    return w4a8_per_channel_epilogue(acc, x_scales, x_sums, s1_scales, s1_szeros, bias, xp)


def group_level1(codes, s2, zeros, group_size: int = 128, xp=np):
    """The int8 weights the g128 GEMM multiplies, built with the kernel's byte-lane arithmetic.

    codes uint8 [N, K_pad] (0..15), s2 uint8 [N, K_pad // group_size] (integer group scales), zeros
    [N, K_pad // group_size] (integer scaled zeros z; QServe stores -z as int8) -> int8 [N, K_pad].
    Raises ValueError if the data break the kernel's preconditions (product > 255 or u8 outside int8).
    """
    n, k_pad = codes.shape
    if k_pad % group_size or s2.shape != (n, k_pad // group_size) or zeros.shape != s2.shape:
        raise ValueError(f"g{group_size} weight: codes {codes.shape}, s2 {s2.shape}, zeros {zeros.shape}")
    s2_full = xp.repeat(xp.asarray(s2).astype(xp.int32), group_size, axis=1)
    z_full = xp.repeat(xp.asarray(zeros).astype(xp.int32), group_size, axis=1)
    prod = codes.astype(xp.int32) * s2_full
    true_u8 = prod - z_full
    lo, hi = int(true_u8.min(initial=0)), int(true_u8.max(initial=0))
    if int(prod.max(initial=0)) > 255 or lo < -128 or hi > 127:
        raise ValueError(
            "g128 weight out of the kernel's range: need codes*s2 <= 255 and codes*s2 - z in [-128, 127]"
        )
    wrapped = ((prod + (-z_full) % 256) % 256).astype(xp.uint8).view(xp.int8)
    assert bool((wrapped.astype(xp.int32) == true_u8).all())
    return wrapped


def w4a8_group_epilogue(acc, x_scales, s1_scales, bias=None, xp=np):
    """fp16 [M, N] = fp16((fp32(acc) * s1[n]) * sx[m]) (+ bias)."""
    out = acc.astype(xp.float32) * _f32(s1_scales, xp)[None, :]
    out *= _f32(x_scales, xp)[:, None]
    return add_bias_fp16(out.astype(xp.float16), bias, xp)


def w4a8_group_gemm(q_x, x_scales, level1, s1_scales, bias=None, xp=np):
    """q_x int8 [M, K], x_scales fp16 [M]; level1 int8 [N, K_pad] from group_level1 (or its float64
    copy), s1_scales fp16 [N] -> fp16 [M, N]. K < K_pad: activations are zero-padded."""
    acc = exact_int_matmul(pad_k(q_x, level1.shape[1], xp), level1, xp)
    return w4a8_group_epilogue(acc, x_scales, s1_scales, bias, xp)


# ---- the packed QServe layout: numpy twin (via unpack) or the CUDA kernel ----

def w4a8_per_channel_gemm_packed(q_x, x_scales, x_sums, qweight, s1_scales, s1_szeros, bias=None, xp=np,
                                 method: str = "mma"):
    """w4a8_per_channel_gemm on QServe's packed ``qweight`` int8 [N, K_pad / 2] (core/pack.py).

    numpy: unpacks and runs the twin above. cupy: the CUDA kernel (cuda/gemm.cu, mode 0), bit-identical;
    method "cublas" instead dequantizes to int8 and calls cuBLAS gemmEx + the same epilogue (prefill
    option; not capturable in a CUDA graph)."""
    if not is_cupy(xp):
        codes = unpack_w4(np.asarray(qweight))
        return w4a8_per_channel_gemm(q_x, x_scales, x_sums, codes, s1_scales, s1_szeros, bias, xp)
    n, k_pad = qweight.shape[0], 2 * qweight.shape[1]
    if method == "cublas":
        acc = cuda_cublas.int8_matmul_cublas(pad_k(q_x, k_pad, xp), cuda_cublas.w4_to_int8(qweight))
        return cuda_cublas.epilogue_i32(acc, "w4_per_channel", x_scales, s1_scales, x_sums, s1_szeros,
                                        bias)
    return cuda_gemm.gemm("w4_per_channel", q_x, qweight, n, k_pad, x_scales=x_scales, x_sums=x_sums,
                          w_scales=s1_scales, w_szeros=s1_szeros, bias=bias)


def w4a8_group_gemm_packed(q_x, x_scales, qweight, s1_scales, s2_scales, s2_zeros, bias=None, xp=np,
                           method: str = "mma"):
    """w4a8_group_gemm (g128) on QServe's packed ``qweight`` [N, K_pad / 2] and its ``s2_scales`` /
    ``s2_zeros`` int8 [K_pad / 128, N] (group-major, 0,8,16,24-permuted; core/pack.py).

    numpy: unpacks and runs the twin above. cupy: the CUDA kernel (cuda/gemm.cu, mode 1), bit-identical;
    method "cublas": dequantize to int8 + cuBLAS gemmEx + epilogue."""
    if not is_cupy(xp):
        codes = unpack_w4(np.asarray(qweight))
        s2, zeros = from_qserve_group_params(np.asarray(s2_scales), np.asarray(s2_zeros))
        level1 = group_level1(codes, s2, zeros, 128, np)
        return w4a8_group_gemm(q_x, x_scales, level1, s1_scales, bias, xp)
    n, k_pad = qweight.shape[0], 2 * qweight.shape[1]
    if method == "cublas":
        qx = pad_k(q_x, k_pad, xp)
        acc = cuda_cublas.int8_matmul_cublas(qx, cuda_cublas.w4_to_int8(qweight, s2_scales, s2_zeros))
        return cuda_cublas.epilogue_i32(acc, "w4_g128", x_scales, s1_scales, bias=bias)
    return cuda_gemm.gemm("w4_g128", q_x, qweight, n, k_pad, x_scales=x_scales, w_scales=s1_scales,
                          s2_scales=s2_scales, s2_zeros=s2_zeros, bias=bias)


def w4_to_int8(qweight, s2_scales=None, s2_zeros=None, xp=np):
    """Packed W4 -> row-major int8 [N, K_pad]: the codes (per-channel) or, given the g128 parameters, the
    level-1 weights codes * s2 - z (what the cuBLAS INT8 path multiplies)."""
    if is_cupy(xp):
        return cuda_cublas.w4_to_int8(qweight, s2_scales, s2_zeros)
    codes = unpack_w4(np.asarray(qweight))
    if s2_scales is None:
        return codes.astype(np.int8)
    s2, zeros = from_qserve_group_params(np.asarray(s2_scales), np.asarray(s2_zeros))
    return group_level1(codes, s2, zeros, 128, np)
