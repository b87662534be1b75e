"""fp16 GEMM with fp32 accumulation: the w16a16 linears and lm_head, capturable in a CUDA graph (no cuBLAS).

Spec: out[m, n] = fp16(sum_k fp32(x[m, k]) * fp32(w[n, k])), then + bias as fp16(fp32(out) + fp32(bias)),
or the fp32 sum (+ fp32(bias)) with out_dtype float32. The GPU accumulates in fp32 in an order of its own
(tensor-core mma, split-K partials summed in split order), so it agrees with this float64 twin within the
fp32 accumulation error (about k * 2^-24 * sum_k |x w|) before the final rounding: the fp16 result is the
twin's or one fp16 ulp away, except where cancellation makes the sum tiny next to its terms.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import is_cupy
from qserve_lite.kernels.cuda import gemm as cuda_gemm


def fp16_gemm(x, w, bias=None, out_dtype=np.float16, xp=np, cublas: bool = False):
    """x [M, K] and w [N, K] (fp16, or float values rounded to fp16) -> [M, N] in out_dtype (fp16 or fp32).
    `cublas`: on the device, large products outside CUDA graphs may run on cuBLAS (same spec)."""
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.float16, np.float32):
        raise ValueError(f"fp16_gemm: out_dtype must be float16 or float32, got {out_dtype}")
    if is_cupy(xp):
        x = x.astype(xp.float16, copy=False)
        w = w.astype(xp.float16, copy=False)
        return cuda_gemm.gemm("f16", x, w, w.shape[0], w.shape[1], bias=bias,
                              out_f32=out_dtype == np.float32, cublas=cublas)
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"fp16_gemm: K mismatch, x {x.shape} w {w.shape}")
    acc = x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
    if out_dtype == np.float32:
        out = acc.astype(np.float32)
        if bias is not None:
            out = out + np.asarray(bias).astype(np.float16).astype(np.float32)[None, :]
        return out
    out = acc.astype(np.float32).astype(np.float16)
    if bias is not None:
        out = (out.astype(np.float32) + np.asarray(bias).astype(np.float16).astype(np.float32)[None, :])
        out = out.astype(np.float16)
    return out
