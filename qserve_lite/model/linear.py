"""Linear: y = x @ W^T (+ b) on whatever array module holds W.

The quantized linears (W4A8, W8A8) implement the same call so the forward never changes.
"""

from __future__ import annotations


class Linear:
    """Dense weight [out_features, in_features] in HF layout, optional bias [out_features]."""

    def __init__(self, weight, bias=None):
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x):
        y = x.reshape(-1, x.shape[-1]) @ self.weight.T  # 2-D so BLAS runs one GEMM
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
