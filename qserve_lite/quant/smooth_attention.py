"""SmoothAttention (QoQ): move key outliers into the (unquantized) queries before KV4.

    lambda = max|K|^alpha / max|Q|^beta        (per kv-head channel, post-RoPE statistics)
    q_proj rows * lambda,  k_proj rows / lambda   (and their biases)

Q K^T is unchanged. RoPE rotates channel i together with i + d/2, so the two share one scale (the max of
their spans); then scaling commutes with RoPE and can be folded into the projections before it. With GQA
the key span is per kv head and the query span is max-reduced over the query heads that share it; every
one of those query heads gets the kv head's scale.
"""

from __future__ import annotations

import numpy as np

from ..model.weights import LayerWeights


def tie_rope_halves(span: np.ndarray) -> np.ndarray:
    """[..., D] -> [..., D] with channels i and i + D/2 both set to their max."""
    d = span.shape[-1]
    half = np.maximum(span[..., : d // 2], span[..., d // 2:])
    return np.concatenate([half, half], axis=-1)


def smooth_attention_scales(k_absmax: np.ndarray, q_absmax: np.ndarray | None = None, alpha: float = 0.5,
                            beta: float = 0.0) -> np.ndarray:
    """Scales lambda [KVH, D] from post-RoPE abs-max of keys [KVH, D] and queries [H, D].

    Zeros become 1; a NaN or Inf anywhere leaves every scale at 1 (no smoothing).
    """
    k_span = tie_rope_halves(np.asarray(k_absmax, dtype=np.float64))
    kvh, d = k_span.shape
    scale = k_span ** alpha
    if beta != 0:
        if q_absmax is None:
            raise ValueError("beta != 0 needs the query abs-max")
        q_span = np.asarray(q_absmax, dtype=np.float64).reshape(kvh, -1, d).max(axis=1)
        scale = scale / tie_rope_halves(q_span) ** beta
    scale[scale == 0] = 1.0
    if not np.all(np.isfinite(scale)):
        return np.ones_like(scale)
    return scale


def apply_smooth_attention(lw: LayerWeights, scales: np.ndarray, num_heads: int) -> None:
    """Fold scales [KVH, D] into lw (in place): q_proj rows * lambda, k_proj rows / lambda."""
    kvh, d = scales.shape
    group = num_heads // kvh
    q_scale = np.repeat(scales, group, axis=0).reshape(-1)  # query head h uses kv head h // group
    k_scale = scales.reshape(-1)
    q, k = lw.q_proj, lw.k_proj
    q.weight = (q.weight * q_scale[:, None]).astype(q.weight.dtype, copy=False)
    k.weight = (k.weight / k_scale[:, None]).astype(k.weight.dtype, copy=False)
    if q.bias is not None:
        q.bias = (q.bias * q_scale).astype(q.bias.dtype, copy=False)
    if k.bias is not None:
        k.bias = (k.bias / k_scale).astype(k.bias.dtype, copy=False)


def smooth_attention(lw: LayerWeights, k_absmax: np.ndarray, q_absmax: np.ndarray | None, num_heads: int,
                     alpha: float = 0.5, beta: float = 0.0) -> np.ndarray:
    """Compute and fold SmoothAttention scales into one layer; returns lambda [KVH, D]."""
    scales = smooth_attention_scales(k_absmax, q_absmax, alpha, beta)
    apply_smooth_attention(lw, scales, num_heads)
    return scales
