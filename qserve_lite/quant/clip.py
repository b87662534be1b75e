"""Weight clipping search for per-channel W4 (QoQ "gchn"; deepcompressor's GridSearch range calibration).

Candidate ratios 1.0, then 1 - i/grid * (1 - min_ratio) for i = 1..grid (deepcompressor: grid 80,
min_ratio 0.2, i.e. 0.99 ... 0.20); both ends of a row's range shrink by the ratio; candidates are RTN.

- Ordinary linears: the best ratio per output row r by sum_t (x_t . (w_hat_r - w_r))^2 over <= 512
  calibration rows of the layer input (the layer's output error).
- q_proj / k_proj: one ratio per layer each, chosen by the MSE of the attention block's output (through
  o_proj) with that projection RTN-quantized, on a few whole calibration samples; q first (k float), then
  k with q at its chosen ratio.
"""

from __future__ import annotations

import math

import numpy as np

from ..model.rope import apply_rope, rope_cos_sin
from ..model.weights import LayerWeights
from .quantizers import w4_per_channel_codes, w4_per_channel_params


def clip_ratios(grid: int = 80, min_ratio: float = 0.2) -> np.ndarray:
    """[1.0, 1 - 1/grid*(1-min_ratio), ..., min_ratio]."""
    i = np.arange(grid + 1, dtype=np.float64)
    return 1.0 - i / max(grid, 1) * (1.0 - min_ratio)


def rtn_w4_per_channel(w: np.ndarray, ratio=1.0) -> np.ndarray:
    """Dequantized per-channel W4 RTN of w [n, k] with clip ratio (scalar or [n]); float64."""
    scales, szeros = w4_per_channel_params(w, ratio)
    codes = w4_per_channel_codes(w, scales, szeros)
    return codes * scales.astype(np.float64)[:, None] - szeros.astype(np.float64)[:, None]


def row_output_errors(w: np.ndarray, w_hat: np.ndarray, x_rows: np.ndarray) -> np.ndarray:
    """Per output row: sum_t (x_t . (w_hat_r - w_r))^2, float64 [n] (matmul in x_rows' dtype)."""
    d = (w_hat - w).astype(x_rows.dtype, copy=False)
    e = d @ x_rows.T  # [n, m]
    return np.einsum("ij,ij->i", e, e, dtype=np.float64)


def search_row_clip(w: np.ndarray, x_rows: np.ndarray, ratios: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best clip ratio per output row of w [n, k] for inputs x_rows [m, k].

    Returns (ratio [n], error [n] at that ratio, error [n] at ratio 1.0). Ratio 1.0 is always a candidate
    and only a strictly smaller error replaces it, so the chosen error never exceeds the unclipped one.
    """
    w = np.asarray(w, dtype=np.float64)
    ratios = clip_ratios() if ratios is None else np.asarray(ratios, dtype=np.float64)
    best_ratio = np.full(w.shape[0], ratios[0])
    best_err = row_output_errors(w, rtn_w4_per_channel(w, ratios[0]), x_rows)
    base_err = best_err.copy()
    for r in ratios[1:]:
        err = row_output_errors(w, rtn_w4_per_channel(w, r), x_rows)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, r, best_ratio)
    return best_ratio, best_err, base_err


# ---- q/k: attention-block output error ----

def _linear(x: np.ndarray, w: np.ndarray, b) -> np.ndarray:
    y = x @ w.T
    return y + b if b is not None else y


def _attention(q: np.ndarray, q_pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA attention of queries q [S, Tq, H, D] at positions q_pos over keys/values [S, T, KVH, D]
    at positions 0..T-1 -> [S, Tq, H*D]."""
    S, Tq, H, D = q.shape
    KVH, T = k.shape[2], k.shape[1]
    g = H // KVH
    qg = q.reshape(S, Tq, KVH, g, D).transpose(0, 2, 3, 1, 4).reshape(S, KVH, g * Tq, D)
    scores = qg @ k.transpose(0, 2, 3, 1) / math.sqrt(D)  # [S, KVH, g*Tq, T]
    mask = np.arange(T)[None, :] > np.tile(q_pos, g)[:, None]
    scores = np.where(mask, -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ v.transpose(0, 2, 1, 3)  # [S, KVH, g*Tq, D]
    return out.reshape(S, KVH, g, Tq, D).transpose(0, 3, 1, 2, 4).reshape(S, Tq, H * D)


def search_qk_clip(lw: LayerWeights, attn_in: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int,
                   inv_freq: np.ndarray, ratios: np.ndarray | None = None, query_stride: int = 4
                   ) -> tuple[float, float]:
    """One clip ratio each for q_proj and k_proj of a layer, by the attention block's output MSE.

    attn_in [S, T, hidden]: the normed block input of a few whole calibration samples (positions 0..T-1).
    Only every `query_stride`-th query position is scored (all keys are used), which keeps the search cheap.
    """
    ratios = clip_ratios() if ratios is None else np.asarray(ratios, dtype=np.float64)
    x = np.asarray(attn_in, dtype=np.float32)
    S, T, _ = x.shape
    H, KVH, D = num_heads, num_kv_heads, head_dim
    q_pos = np.arange(T - 1, -1, -query_stride)[::-1].copy()  # always includes the last position
    cos, sin = rope_cos_sin(np.arange(T), inv_freq, np, dtype=np.float32)
    cos_q, sin_q = cos[q_pos], sin[q_pos]
    f32 = np.float32
    xq = x[:, q_pos]

    def project(xin, lin, w, heads, c, s):
        y = _linear(xin, w.astype(f32), None if lin.bias is None else lin.bias.astype(f32))
        return apply_rope(y.reshape(*xin.shape[:2], heads, D), c, s)

    wq, wk = np.asarray(lw.q_proj.weight, np.float64), np.asarray(lw.k_proj.weight, np.float64)
    wo = lw.o_proj.weight.astype(f32)
    q = project(xq, lw.q_proj, wq, H, cos_q, sin_q)
    k = project(x, lw.k_proj, wk, KVH, cos, sin)
    v_bias = None if lw.v_proj.bias is None else lw.v_proj.bias.astype(f32)
    v = _linear(x, lw.v_proj.weight.astype(f32), v_bias).reshape(S, T, KVH, D)
    ref = _attention(q, q_pos, k, v) @ wo.T

    def mse(qq, kk) -> float:
        d = _attention(qq, q_pos, kk, v) @ wo.T - ref
        return float(np.mean(d.astype(np.float64) ** 2))

    best_q, best_q_err = ratios[0], math.inf
    for r in ratios:
        err = mse(project(xq, lw.q_proj, rtn_w4_per_channel(wq, r), H, cos_q, sin_q), k)
        if err < best_q_err:
            best_q, best_q_err = r, err
    q_hat = project(xq, lw.q_proj, rtn_w4_per_channel(wq, best_q), H, cos_q, sin_q)
    best_k, best_k_err = ratios[0], math.inf
    for r in ratios:
        err = mse(q_hat, project(x, lw.k_proj, rtn_w4_per_channel(wk, r), KVH, cos, sin))
        if err < best_k_err:
            best_k, best_k_err = r, err
    return float(best_q), float(best_k)
