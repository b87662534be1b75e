"""One device linear: the GEMM dispatch the engine calls for every quantized or fp16 linear of a model.

`linear(mode, act, weight, n, k_w, ...)` multiplies the activation of M tokens by one (possibly fused)
weight in its GEMM kernel's layout (model/gpu_model.DeviceLinear holds the same fields):

    mode              weight                         parameters                        act
    "w4_g128"         packed int8 [n, k_w / 2]       scales (s1) fp16 [n],             QuantizedActivation
                      (core/pack.py, k_w = K_pad)    s2_scales / s2_zeros int8
                                                     [k_w / 128, n] (QServe order)
    "w4_per_channel"  packed int8 [n, k_w / 2]       scales (s1), szeros fp16 [n]      QuantizedActivation
    "w8"              int8 [n, k_w]                  scales (dequant scale) fp16 [n]   QuantizedActivation
    "f16"             fp16 [n, k_w]                  -                                 fp16 [M, K]

The activation's K may be shorter than k_w (the weight's padded K; the rest multiplies zeros); bias is fp16
[n]; the result is fp16 [M, n], written into `out` when given (contiguous rows) and returned.

Dispatch: a numpy weight runs the numpy twins (kernels/fp16_gemm.py, kernels/w8a8_gemm.py,
kernels/w4a8_gemm.py; bit-exact specs of the kernels except fp16's fp32 accumulation order); any other
(CuPy) weight runs the CUDA launcher kernels/cuda/gemm.gemm (cuda/gemm.cu, or cuda/gemm_skinny.cu for W4
with M <= 16).
"""

from __future__ import annotations

import numpy as np

from qserve_lite.kernels.cuda import gemm as cuda_gemm
from qserve_lite.kernels.fp16_gemm import fp16_gemm
from qserve_lite.kernels.w4a8_gemm import w4a8_group_gemm_packed, w4a8_per_channel_gemm_packed
from qserve_lite.kernels.w8a8_gemm import w8a8_gemm

LINEAR_MODES = ("w4_g128", "w4_per_channel", "w8", "f16")


def linear(mode: str, act, weight, n: int, k_w: int, *, scales=None, szeros=None, s2_scales=None,
           s2_zeros=None, bias=None, out=None):
    """fp16 [M, n] = act . weight^T with `mode`'s epilogue (+ bias); see the module docstring.

    act: a QuantizedActivation (kernels/act_quant.py: q int8 [M, K], scales fp16 [M], sums fp32 [M], the
    sums needed by "w4_per_channel" only) for the int8 modes, or fp16 [M, K] for "f16"."""
    if mode not in LINEAR_MODES:
        raise ValueError(f"linear: mode must be one of {', '.join(LINEAR_MODES)}, got {mode!r}")
    if isinstance(weight, np.ndarray):
        return _linear_twin(mode, act, weight, scales, szeros, s2_scales, s2_zeros, bias, out)
    if mode == "f16":
        return cuda_gemm.gemm("f16", act, weight, n, k_w, bias=bias, out=out)
    return cuda_gemm.gemm(
        mode,
        act.q,
        weight,
        n,
        k_w,
        x_scales=act.scales,
        x_sums=act.sums,
        w_scales=scales,
        w_szeros=szeros,
        s2_scales=s2_scales,
        s2_zeros=s2_zeros,
        bias=bias,
        out=out,
    )


def _linear_twin(mode, act, weight, scales, szeros, s2_scales, s2_zeros, bias, out):
    """The numpy twins on the same arguments (for checks on the CPU)."""
    if mode == "f16":
        res = fp16_gemm(act, weight, bias, xp=np)
    elif mode == "w8":
        res = w8a8_gemm(act.q, act.scales, weight, scales, bias, np)
    elif mode == "w4_g128":
        res = w4a8_group_gemm_packed(act.q, act.scales, weight, scales, s2_scales, s2_zeros, bias, xp=np)
    else:
        res = w4a8_per_channel_gemm_packed(act.q, act.scales, act.sums, weight, scales, szeros, bias, xp=np)
    if out is None:
        return res
    out[...] = res
    return out
