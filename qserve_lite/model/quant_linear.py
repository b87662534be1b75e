"""Quantized linears with the Linear call signature: W4A8 (per-channel or progressive g128) and W8A8.

Owned by the emulation work: __call__ runs the exact integer emulation of QServe's GEMMs (ops/)."""

from __future__ import annotations

from ..quant.formats import W4Group, W4PerChannel, W8PerChannel


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
        raise NotImplementedError("W4A8 emulation is being written (ops/w4a8_gemm.py)")


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
        raise NotImplementedError("W8A8 emulation is being written (ops/w8a8_gemm.py)")
