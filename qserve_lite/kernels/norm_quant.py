"""Fused residual-add + RMSNorm (+ per-token INT8 quantization): the input of every quantized linear.

These numpy functions are the specification of cuda/rows.cu (QS_ROW_OP 1), bit for bit. Per token, over
the hidden axis of width k, with fp16 activations:

    r       = fp16(fp32(x) + fp32(residual))       the new residual stream (r = fp16(x) without residual)
    ss      = sum_j float64(r_j)^2                 fp64 (each square is exact)
    rstd    = fp32(1 / sqrt(ss / k + eps))         fp64 division, square root, division; one final rounding
    y       = fp16((fp32(r) * rstd) * fp32(fp16(gamma)))     two fp32 multiplications, then fp16
    q, sx, xsum = quantize_per_token(y)            kernels/act_quant.py

With `gather` (int [...]), x is a table (the token embeddings) and the input is x[gather]: the same
numerics; on the GPU the row kernel reads the rows itself (no gather pass before it; kernels/fusions.py
selects the unfused path).

True RMSNorm: no mean subtraction (QServe's fused kernel subtracted the mean; issues #32/#61 there).
The fp64 sum of squares is exact for ordinary activations; where it is not (a token mixing magnitudes far
apart) its last bit can depend on the summation order, which changes rstd only if the fp64 result lies
within about 2^-29 (relative) of an fp32 rounding boundary: negligible, and tests compare exactly.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.kernels.act_quant import (
    QuantizedActivation,
    _gpu_input,
    _run_rows,
    quantize_per_token,
    round_to_fp16,
)
from qserve_lite.kernels.fusions import step_fusions


def _rms_norm_twin(x, weight, eps: float, residual, xp):
    r = round_to_fp16(x, xp)
    if residual is not None:
        r = (r + round_to_fp16(residual, xp)).astype(xp.float16).astype(xp.float32)
    ss = (r.astype(xp.float64) ** 2).sum(axis=-1)
    rstd = (1.0 / xp.sqrt(ss / r.shape[-1] + float(eps))).astype(xp.float32)
    y = (r * rstd[..., None]) * round_to_fp16(weight, xp)
    return y.astype(xp.float16), r.astype(xp.float16)


def _gathered(x, gather, xp):
    """(x, ids for the row kernel): the gather is left to the kernel on the GPU (fused path), else done."""
    if gather is None:
        return x, None
    if _gpu_input(x, xp) and x.ndim == 2 and x.dtype == xp.float16 and step_fusions():
        return x, gather
    return x[gather], None


def rms_norm(x, weight, eps: float, residual=None, xp=np, gather=None):
    """(y fp16 [..., k], new residual fp16 [..., k]) for x [..., k] (or x[gather]); see the module
    docstring."""
    x, ids = _gathered(x, gather, xp)
    if _gpu_input(x, xp):
        res = _run_rows("rmsnorm", x, x.shape[-1], residual=residual, gamma=weight, eps=eps, want_y=True,
                        want_q=False, ids=ids)
        return res.y, res.residual
    return _rms_norm_twin(x, weight, eps, residual, xp)


def rms_norm_quant(x, weight, eps: float, residual=None, xp=np, with_sums: bool = True,
                   gather=None) -> tuple[QuantizedActivation, object]:
    """(quantize_per_token(y), new residual fp16) for x [..., k] (or x[gather]): one kernel and one pass on
    the GPU. with_sums=False: no per-token sums (only per-channel W4A8 uses them)."""
    x, ids = _gathered(x, gather, xp)
    if _gpu_input(x, xp):
        res = _run_rows("rmsnorm", x, x.shape[-1], residual=residual, gamma=weight, eps=eps,
                        want_sum=with_sums, ids=ids)
        return res.qa, res.residual
    y, r = _rms_norm_twin(x, weight, eps, residual, xp)
    return quantize_per_token(y, xp, with_sums), r
