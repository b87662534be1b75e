"""Dynamic per-token symmetric INT8 activation quantization (QoQ/QServe "A8").

This numpy function is the specification the CUDA kernels (fused into RMSNorm / SiLU-mul and into the decode
attention's last pass on the GPU; steps shared in cuda/token_quant.cuh) must match bit for bit. Every step is
one IEEE-754 operation with round-to-nearest-even:

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

from qserve_lite.core.backend import is_cupy
from qserve_lite.kernels.cuda import rows as cuda_rows

QMAX = 127


class QuantizedActivation(NamedTuple):
    q: np.ndarray  # int8 [..., k], values in [-127, 127]
    scales: np.ndarray  # float16 [...], per-token scale sx
    sums: np.ndarray  # float32 [...], per-token sum of the fp16 activation (for the W4A8 zero term)


def round_to_fp16(x, xp=np):
    """x rounded to fp16 and returned as float32 (what the GPU would hold)."""
    return xp.asarray(x).astype(xp.float16).astype(xp.float32)


def quantize_per_token(x, xp=np, with_sums: bool = True) -> QuantizedActivation:
    """Quantize x [..., k] (float32 or float16) per token (last axis) to int8; see the module docstring.

    With xp = cupy and a float16/float32 x this runs the CUDA kernel (cuda/rows.cu), bit-identical.
    with_sums=False leaves `sums` None (only per-channel W4A8 needs them; the kernel then skips them)."""
    if _gpu_input(x, xp):
        return _run_rows("quant", x, x.shape[-1], want_sum=with_sums).qa
    x32 = round_to_fp16(x, xp)
    amax = xp.abs(x32).max(axis=-1)
    scales = (amax / xp.float32(QMAX)).astype(xp.float16)
    scales = xp.where(scales == 0, xp.float16(1), scales)
    q = xp.rint(x32 / scales.astype(xp.float32)[..., None])
    q = xp.clip(q, -QMAX, QMAX).astype(xp.int8)
    sums = x32.astype(xp.float64).sum(axis=-1).astype(xp.float32) if with_sums else None
    return QuantizedActivation(q, scales, sums)


def check_quant_out(quant_out, m: int, k: int) -> tuple:
    """(codes, scales, sums or None) of output buffers for the quantization of m tokens of k channels,
    given as (codes, scales[, sums]) (e.g. a QuantizedActivation): int8 [m, k], float16 [m], float32 [m]."""
    if not isinstance(quant_out, tuple) or len(quant_out) not in (2, 3):
        raise ValueError(f"quant_out: expected (codes, scales[, sums]), got {type(quant_out).__name__}")
    codes, scales, sums = (*quant_out, None)[:3]
    for name, a, shape, dtype in (("codes", codes, (m, k), np.int8), ("scales", scales, (m,), np.float16),
                                  ("sums", sums, (m,), np.float32)):
        if a is None and name == "sums":
            continue
        if getattr(a, "shape", None) != shape or getattr(a, "dtype", None) != dtype:
            raise ValueError(f"quant_out {name}: expected {np.dtype(dtype).name} {shape}, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return codes, scales, sums


def dequantize_per_token(qa: QuantizedActivation, xp=np):
    """float64 q * sx, the activation the integer GEMM effectively multiplies (for references and tests)."""
    return qa.q.astype(xp.float64) * qa.scales.astype(xp.float64)[..., None]


# ---- SiLU(gate) * up, fused with the quantization on the GPU ----

def silu_mul(gate_up, xp=np):
    """fp16 [..., i] = fp16(silu(g) * u) for gate_up [..., 2i] = [gate | up] (QServe's fused gate_up layout).

    fp32 arithmetic on the fp16 inputs, each step rounded to nearest: silu(g) = g / (1 + exp(-g)), then the
    product, then one rounding to fp16. The kernel computes exp with CUDA's expf (within 2 fp32 ulps) and
    g * (1 / (1 + e)) with an approximate reciprocal (1 ulp), a few fp32 ulps in all, so its fp16 product
    may differ from this twin by one fp16 ulp where the product lies next to an fp16 rounding boundary
    (about one element in a thousand or fewer); the quantization that follows is exact given the kernel's own
    fp16 product (see silu_mul_quant).
    """
    if _gpu_input(gate_up, xp):
        return _run_rows("silu", gate_up, gate_up.shape[-1] // 2, want_y=True, want_q=False).y
    inter = gate_up.shape[-1] // 2
    if gate_up.shape[-1] != 2 * inter:
        raise ValueError(f"silu_mul: the last axis must be [gate | up] of even width, got {gate_up.shape}")
    g = round_to_fp16(gate_up[..., :inter], xp)
    u = round_to_fp16(gate_up[..., inter:], xp)
    with np.errstate(over="ignore"):
        silu = g / (xp.float32(1) + xp.exp(-g))
    return (silu * u).astype(xp.float16)


def silu_mul_quant(gate_up, xp=np, with_sums: bool = True) -> QuantizedActivation:
    """quantize_per_token(silu_mul(gate_up)): the down_proj input of a quantized MLP, one GPU kernel."""
    if _gpu_input(gate_up, xp):
        return _run_rows("silu", gate_up, gate_up.shape[-1] // 2, want_sum=with_sums).qa
    return quantize_per_token(silu_mul(gate_up, xp), xp, with_sums)


class _RowResult(NamedTuple):
    y: object
    qa: QuantizedActivation | None
    residual: object


def _gpu_input(x, xp) -> bool:
    return is_cupy(xp) and x.dtype in (xp.float16, xp.float32) and x.ndim >= 1


def _run_rows(op: str, x, k: int, residual=None, ids=None, **kw) -> _RowResult:
    """Runs a row kernel of cuda/rows.cu over x [..., width] (any leading shape), restoring that shape; with
    ids (int [...]), over the rows x[ids] of a table x [rows, width], in ids' shape."""
    lead = x.shape[:-1] if ids is None else ids.shape
    x2 = x.reshape(-1, x.shape[-1])
    if ids is not None:
        ids = ids.reshape(-1)
    if op != "quant":
        x2 = x2.astype("float16", copy=False)
    if residual is not None:
        residual = residual.reshape(-1, k).astype("float16", copy=False)
    y, q, scales, sums, res = cuda_rows.rows(op, x2, k, residual=residual, ids=ids, **kw)
    qa = None if q is None else QuantizedActivation(q.reshape(*lead, k), scales.reshape(lead),
                                                    sums.reshape(lead) if sums is not None else None)
    return _RowResult(None if y is None else y.reshape(*lead, k), qa,
                      None if res is None else res.reshape(*lead, k))
