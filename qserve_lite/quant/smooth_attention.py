"""SmoothAttention (QoQ): move key outliers into the (unquantized) queries before KV4.

    lambda = max|K|^alpha / max|Q|^beta        (per kv-head channel, post-RoPE statistics)
    q_proj rows * lambda,  k_proj rows / lambda   (and their biases)

Q K^T is unchanged in float (only the KV-quantization error of K changes). RoPE rotates channel i
together with i + d/2, so the two share one scale (the max of their spans); then scaling commutes with
RoPE and can be folded into the projections before it. With GQA the key span is per kv head and the query
span is max-reduced over the query heads that share it; every one of those query heads gets the kv head's
scale.

(alpha, beta) is either fixed (deepcompressor's g128 default 0.5, 0) or searched per layer
(`search_smooth_attention`, deepcompressor's gchn GridSearch): the candidates (0, 0), (a, 0), (a, 1 - a)
for a = 1/grid ... 1 - 1/grid, scored by the error of the attention block's output (through o_proj) with
the keys KV-quantized.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import array_module
from qserve_lite.core.hadamard import hadamard
from qserve_lite.kernels.kv_quant import kv_fake_quant
from qserve_lite.model.weights import LayerWeights
from qserve_lite.quant.clip import causal_bias, gqa_attention, query_positions


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
    q, k = lw.q_proj, lw.k_proj
    xp = array_module(q.weight)  # the weights' device (the scales come from host statistics)
    q_scale = xp.asarray(np.repeat(scales, group, axis=0).reshape(-1))  # query head h uses kv head h // group
    k_scale = xp.asarray(scales.reshape(-1))
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


def alpha_beta_candidates(grid: int = 20) -> list[tuple[float, float]]:
    """(0, 0), then (a, 0) and (a, 1 - a) for a = 1/grid, ..., (grid-1)/grid (deepcompressor's set)."""
    alphas = [round(i / grid, 6) for i in range(1, grid)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in alphas] + [(a, round(1.0 - a, 6)) for a in alphas]


def search_smooth_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, o_weight: np.ndarray,
                            k_absmax: np.ndarray, q_absmax: np.ndarray, kv_bits: int, grid: int = 20,
                            query_stride: int = 4,
                            k_hadamard: bool = False) -> tuple[float, float, float, float]:
    """Best (alpha, beta) for one layer by the attention block's output error with K quantized.

    q [S, T, H, D], k and v [S, T, KVH, D]: post-RoPE queries/keys and values of a few whole calibration
    samples; o_weight [hidden, H*D]; k_absmax/q_absmax: spans over all calibration tokens. Only every
    query_stride-th query is scored. With lambda folded, scores are (q lambda) . deq(k / lambda), i.e. q
    against k_hat = lambda * deq(k / lambda), which is what each candidate evaluates. k_hadamard: the runtime
    caches k / lambda rotated by the head's Hadamard matrix H (model/llama.py), so k_hat =
    lambda * (deq((k / lambda) H) H) (H is symmetric and orthogonal).
    Returns (alpha, beta, error, error without smoothing).
    """
    q = np.asarray(q, dtype=np.float32)
    k = np.asarray(k, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    S, T, H, D = q.shape
    KVH = k.shape[2]
    q_pos = query_positions(T, query_stride)
    qs = q[:, q_pos]
    bias = causal_bias(q_pos, T, H // KVH)
    wo = np.asarray(o_weight, dtype=np.float32)
    ref = gqa_attention(qs, k, v, bias) @ wo.T
    hd = hadamard(D).astype(np.float32) if k_hadamard else None
    best = (0.0, 0.0, np.inf)
    base = np.inf
    for alpha, beta in alpha_beta_candidates(grid):
        lam = smooth_attention_scales(k_absmax, q_absmax, alpha, beta).astype(np.float32)  # [KVH, D]
        if k_hadamard:
            k_hat = (kv_fake_quant((k / lam) @ hd, kv_bits) @ hd) * lam
        else:
            k_hat = kv_fake_quant(k / lam, kv_bits) * lam
        d = gqa_attention(qs, k_hat, v, bias) @ wo.T - ref
        err = float(np.mean(d.astype(np.float64) ** 2))
        if alpha == 0 and beta == 0:
            base = err
        if err < best[2]:
            best = (alpha, beta, err)
    return best[0], best[1], best[2], base
