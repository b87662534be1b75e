"""Dynamic per-token symmetric INT8 activation quantization (QoQ/QServe "A8").

This numpy function is the specification the CUDA kernel (fused into RMSNorm / SiLU-mul on the GPU) must
match bit for bit. Every step is one IEEE-754 operation with round-to-nearest-even:

    x16[t, j]  = fp16(x[t, j])                       the GPU holds activations in fp16
    amax[t]    = max_j |x16[t, j]|                   exact
    scale[t]   = fp16(fp32(amax[t]) / 127)           fp32 division, then fp16 rounding; 0 -> 1
    q[t, j]    = clip(rint(fp32(x16[t, j]) / fp32(scale[t])), -127, 127)     int8
    xsum[t]    = fp32(sum_j x16[t, j])               the exact sum, rounded once to fp32

Notes for the kernel writer:
- Divide with true IEEE division (`__fdiv_rn`), not fast-math division or a multiply by 127/amax.
  Rounding fp32(amax)/127 to fp32 and then to fp16 equals rounding the exact quotient straight to fp16
  (fp32 carries more than 2*11+2 bits), so `scale` is simply RN16(amax / 127).
- Because scale is within half an fp16 ulp of amax/127, the largest |x| of a token always maps to
  +-127 (unless scale is subnormal, i.e. amax < 127 * 2^-14; then it may land a few codes lower).
- xsum feeds only the per-channel W4A8 epilogue (the zero-point term; QServe's Σx is this sum of the
  fp16 pre-quantization activation, not sx * Σq). Every fp16 value is a multiple of 2^-24, so the
  float64 sum below is exact (hence independent of summation order) while partial sums stay under 2^29
  in magnitude, i.e. always for real activations. The kernel should accumulate in fp64 or in int64
  fixed point (x16 * 2^24) and round once; an fp32 tree reduction is off by a few fp32 ulps.
  QServe itself stores this sum as fp16; we keep fp32 (more accurate, same cost).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

QMAX = 127


class QuantizedActivation(NamedTuple):
    q: np.ndarray  # int8 [..., k], values in [-127, 127]
    scales: np.ndarray  # float16 [...], per-token scale sx
    sums: np.ndarray  # float32 [...], per-token sum of the fp16 activation (for the W4A8 zero term)


def round_to_fp16(x, xp=np):
    """x rounded to fp16 and returned as float32 (what the GPU would hold)."""
    return xp.asarray(x).astype(xp.float16).astype(xp.float32)


def quantize_per_token(x, xp=np) -> QuantizedActivation:
    """Quantize x [..., k] (float32 or float16) per token (last axis) to int8; see the module docstring."""
    x32 = round_to_fp16(x, xp)
    amax = xp.abs(x32).max(axis=-1)
    scales = (amax / xp.float32(QMAX)).astype(xp.float16)
    scales = xp.where(scales == 0, xp.float16(1), scales)
    q = xp.rint(x32 / scales.astype(xp.float32)[..., None])
    q = xp.clip(q, -QMAX, QMAX).astype(xp.int8)
    sums = x32.astype(xp.float64).sum(axis=-1).astype(xp.float32)
    return QuantizedActivation(q, scales, sums)


def dequantize_per_token(qa: QuantizedActivation, xp=np):
    """float64 q * sx, the activation the integer GEMM effectively multiplies (for references and tests)."""
    return qa.q.astype(xp.float64) * qa.scales.astype(xp.float64)[..., None]
