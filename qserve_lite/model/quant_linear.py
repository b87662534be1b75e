"""Quantized linears with the Linear call signature: W4A8 (per-channel or progressive g128) and W8A8.

Owned by the emulation work: __call__ runs the exact integer emulation of QServe's GEMMs (kernels/):
x [..., k] float32 -> per-token int8 quantization -> integer GEMM -> fp32 epilogue -> fp16 output,
returned as float32 holding fp16-rounded values (what the GPU's fp16 output would be)."""

from __future__ import annotations

from qserve_lite.core.backend import array_module
from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.kernels.act_quant import quantize_per_token
from qserve_lite.kernels.w4a8_gemm import group_level1, w4a8_group_gemm, w4a8_per_channel_gemm
from qserve_lite.kernels.w8a8_gemm import w8a8_gemm


def _exact_weight(qlinear, xp):
    """The integer weight matrix as float64, built once per linear (exact_int_matmul's BLAS operand).

    Costs 8 bytes per weight; it saves re-converting the weights on every call (decode is call-bound)."""
    cached = getattr(qlinear, "_exact_w", None)
    if cached is None:
        qw = qlinear.qweight
        if isinstance(qw, W4Group):
            w = group_level1(qw.codes, qw.s2, qw.zeros, qw.group_size, xp)
        else:
            w = qw.codes
        cached = xp.asarray(w).astype(xp.float64)
        qlinear._exact_w = cached
    return cached


class W4A8Linear:
    def __init__(self, qweight: W4PerChannel | W4Group, bias=None):
        self.qweight = qweight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.qweight.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    def __call__(self, x):
        xp = array_module(x)
        qw = self.qweight
        qa = quantize_per_token(x.reshape(-1, x.shape[-1]), xp)
        w = _exact_weight(self, xp)
        if isinstance(qw, W4Group):
            y = w4a8_group_gemm(qa.q, qa.scales, w, qw.s1, self.bias, xp)
        else:
            y = w4a8_per_channel_gemm(qa.q, qa.scales, qa.sums, w, qw.scales, qw.szeros, self.bias, xp)
        return y.astype(xp.float32).reshape(*x.shape[:-1], y.shape[-1])


class W8A8Linear:
    def __init__(self, qweight: W8PerChannel, bias=None):
        self.qweight = qweight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.qweight.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    def __call__(self, x):
        xp = array_module(x)
        qa = quantize_per_token(x.reshape(-1, x.shape[-1]), xp)
        y = w8a8_gemm(qa.q, qa.scales, _exact_weight(self, xp), self.qweight.scales, self.bias, xp)
        return y.astype(xp.float32).reshape(*x.shape[:-1], y.shape[-1])
