"""Output-module smoothing of down_proj (QoQ / deepcompressor: down_proj only).

    lambda_j = mX_j^alpha / mW_j^beta,   mX_j = max_t |x_tj| (down_proj input),  mW_j = max_r |W_down[r, j]|
    down_proj columns * lambda,  up_proj rows / lambda

silu(gate) * (up / lambda) = (silu(gate) * up) / lambda, so the float output is unchanged. alpha near 0
makes lambda equalize the weight columns (the weights are 4-bit, the activations 8-bit).
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import array_module, to_host
from qserve_lite.model.weights import LayerWeights

DEFAULT_ALPHA_BETA = {128: (0.3, 0.7), -1: (0.1, 0.9)}  # keyed by group size (deepcompressor's QoQ configs)


def smooth_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """lambda = x^alpha / w^beta per channel; zeros -> 1; any NaN/Inf -> all ones."""
    x = np.asarray(x_absmax, dtype=np.float64)
    w = np.asarray(w_absmax, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (x ** alpha if alpha > 0 else np.ones_like(x)) / (w ** beta if beta > 0 else 1.0)
    scale[scale == 0] = 1.0
    if not np.all(np.isfinite(scale)):
        return np.ones_like(scale)
    return scale


def apply_smooth_proj(lw: LayerWeights, scales: np.ndarray) -> None:
    """Fold lambda [intermediate] (in place): down_proj columns * lambda, up_proj rows (and bias) / lambda."""
    down, up = lw.down_proj, lw.up_proj
    scales = array_module(down.weight).asarray(scales)  # onto the weights' device
    down.weight = (down.weight * scales[None, :]).astype(down.weight.dtype, copy=False)
    up.weight = (up.weight / scales[:, None]).astype(up.weight.dtype, copy=False)
    if up.bias is not None:
        up.bias = (up.bias / scales).astype(up.bias.dtype, copy=False)


def smooth_proj(lw: LayerWeights, down_in_absmax: np.ndarray, alpha: float = 0.3,
                beta: float = 0.7) -> np.ndarray:
    """Compute and fold down_proj smoothing into one layer; returns lambda [intermediate].

    down_in_absmax: max |x| per channel of down_proj's input, in the layer's current channel order.
    """
    w = lw.down_proj.weight
    w_absmax = to_host(array_module(w).abs(w.astype(np.float64)).max(axis=0))
    scales = smooth_scales(down_in_absmax, w_absmax, alpha, beta)
    apply_smooth_proj(lw, scales)
    return scales
