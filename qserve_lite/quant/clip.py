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

from qserve_lite.core.backend import array_module, to_host
from qserve_lite.core.rope import apply_rope, rope_cos_sin
from qserve_lite.model.weights import LayerWeights
from qserve_lite.quant.quantizers import w4_per_channel_codes, w4_per_channel_params


def clip_ratios(grid: int = 80, min_ratio: float = 0.2) -> np.ndarray:
    """[1.0, 1 - 1/grid*(1-min_ratio), ..., min_ratio]."""
    i = np.arange(grid + 1, dtype=np.float64)
    return 1.0 - i / max(grid, 1) * (1.0 - min_ratio)


def rtn_w4_per_channel(w: np.ndarray, ratio=1.0) -> np.ndarray:
    """Dequantized per-channel W4 RTN of w [n, k] with clip ratio (scalar or [n]); float64."""
    scales, szeros = w4_per_channel_params(w, ratio)
    codes = w4_per_channel_codes(w, scales, szeros)
    return codes * scales.astype(np.float64)[:, None] - szeros.astype(np.float64)[:, None]  # on w's module


def row_output_errors(w: np.ndarray, w_hat: np.ndarray, x_rows: np.ndarray) -> np.ndarray:
    """Per output row: sum_t (x_t . (w_hat_r - w_r))^2, float64 [n] (matmul in x_rows' dtype)."""
    d = (w_hat - w).astype(x_rows.dtype, copy=False)
    e = d @ x_rows.T  # [n, m]
    return np.einsum("ij,ij->i", e, e, dtype=np.float64)


class _RowClipEvaluator:
    """Output error per row of w [n, k] RTN-quantized with per-row clip ratios, on rows x [m, k]."""

    def __init__(self, w, x_rows):
        xp = self.xp = array_module(w)  # the weight's device; the (host) rows go there
        self.w = xp.asarray(w, dtype=np.float64)
        self.wmax, self.wmin = self.w.max(axis=1), self.w.min(axis=1)
        self.w32 = self.w.astype(np.float32)
        self.x = xp.asarray(x_rows, dtype=np.float32)

    def __call__(self, ratio):
        xp = self.xp
        ratio = xp.asarray(ratio)
        # the parameters exactly as w4_per_channel_params makes them; the codes in float32 (search only)
        scales = (self.wmax * ratio - self.wmin * ratio) / 15.0
        scales = scales.astype(np.float16).astype(np.float32)
        scales[scales == 0] = 1.0
        szeros = (-self.wmin * ratio).astype(np.float16).astype(np.float32)
        s, z = scales[:, None], szeros[:, None]
        d = self.w32 + z
        d /= s
        xp.rint(d, out=d)
        xp.clip(d, 0, 15, out=d)
        d *= s
        d -= z
        d -= self.w32
        e = d @ self.x.T
        if xp is np:
            return np.einsum("ij,ij->i", e, e, dtype=np.float64)
        return (e * e).sum(axis=1, dtype=np.float64)


def search_row_clip(w: np.ndarray, x_rows: np.ndarray, ratios: np.ndarray | None = None, stride: int = 1
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best clip ratio per output row of w [n, k] for inputs x_rows [m, k].

    stride > 1 searches coarse-to-fine: every stride-th ratio first, then each row's grid neighbours
    within stride - 1 of its best (about len(ratios) / stride + 2 * (stride - 1) evaluations instead of
    len(ratios)). Returns (ratio [n], error [n] at that ratio, error [n] at ratio 1.0). Ratio 1.0 (the
    first) is always evaluated and only a strictly smaller error replaces it, so the chosen error never
    exceeds the unclipped one.
    """
    ratios = clip_ratios() if ratios is None else np.asarray(ratios, dtype=np.float64)
    evaluate = _RowClipEvaluator(w, x_rows)
    xp = evaluate.xp  # every candidate is evaluated for all rows at once, on the weight's device
    ratios_x = xp.asarray(ratios)
    n = evaluate.w.shape[0]
    best_idx = xp.zeros(n, dtype=np.int64)
    best_err = evaluate(xp.full(n, ratios[0]))
    base_err = best_err.copy()
    stride = max(1, int(stride))
    for i in range(stride, len(ratios), stride):
        err = evaluate(xp.full(n, ratios[i]))
        better = err < best_err
        best_err = xp.where(better, err, best_err)
        best_idx = xp.where(better, i, best_idx)
    if stride > 1:
        center = best_idx.copy()
        for off in [o for o in range(-(stride - 1), stride) if o != 0]:
            idx = center + off
            valid = (idx > 0) & (idx < len(ratios))
            if not bool(valid.any()):
                continue
            err = evaluate(ratios_x[xp.clip(idx, 0, len(ratios) - 1)])
            better = valid & (err < best_err)
            best_err = xp.where(better, err, best_err)
            best_idx = xp.where(better, idx, best_idx)
    return ratios[to_host(best_idx)], to_host(best_err), to_host(base_err)


# ---- q/k: attention-block output error ----

def _linear(x, w, b):
    y = x @ w.T
    return y + b if b is not None else y


def query_positions(n_tokens: int, stride: int) -> np.ndarray:
    """Every stride-th position, ending at the last one (the query subset block-output searches score)."""
    return np.arange(n_tokens - 1, -1, -stride)[::-1].copy()


def causal_bias(q_pos: np.ndarray, n_keys: int, group: int) -> np.ndarray:  # host
    """Additive mask [group * Tq, n_keys]: -inf where a key lies after its query (rows: head-major)."""
    future = np.arange(n_keys)[None, :] > np.tile(q_pos, group)[:, None]
    return np.where(future, -np.inf, 0.0).astype(np.float32)


def gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Causal GQA attention of queries q [S, Tq, H, D] over keys/values [S, T, KVH, D] with the additive
    mask `bias` of causal_bias -> [S, Tq, H*D]."""
    xp = array_module(q)
    S, Tq, H, D = q.shape
    KVH = k.shape[2]
    g = H // KVH
    qg = q.reshape(S, Tq, KVH, g, D).transpose(0, 2, 3, 1, 4).reshape(S, KVH, g * Tq, D)
    scores = qg @ k.transpose(0, 2, 3, 1)  # [S, KVH, g*Tq, T]
    scores *= 1.0 / math.sqrt(D)
    scores += bias
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
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
    xp = array_module(lw.q_proj.weight)  # the search runs on the weights' device
    x = xp.asarray(attn_in, dtype=np.float32)
    S, T, _ = x.shape
    H, KVH, D = num_heads, num_kv_heads, head_dim
    q_pos = query_positions(T, query_stride)
    cos, sin = rope_cos_sin(np.arange(T), inv_freq, xp, dtype=np.float32)
    qp = xp.asarray(q_pos)
    cos_q, sin_q = cos[qp], sin[qp]
    f32 = np.float32
    xq = x[:, qp]

    def project(xin, lin, w, heads, c, s):
        y = _linear(xin, w.astype(f32), None if lin.bias is None else lin.bias.astype(f32))
        return apply_rope(y.reshape(*xin.shape[:2], heads, D), c, s)

    wq, wk = lw.q_proj.weight.astype(np.float64), lw.k_proj.weight.astype(np.float64)
    wo = lw.o_proj.weight.astype(f32)
    q = project(xq, lw.q_proj, wq, H, cos_q, sin_q)
    k = project(x, lw.k_proj, wk, KVH, cos, sin)
    v_bias = None if lw.v_proj.bias is None else lw.v_proj.bias.astype(f32)
    v = _linear(x, lw.v_proj.weight.astype(f32), v_bias).reshape(S, T, KVH, D)
    bias = xp.asarray(causal_bias(q_pos, T, H // KVH))
    ref = gqa_attention(q, k, v, bias) @ wo.T

    def mse(qq, kk) -> float:
        d = gqa_attention(qq, kk, v, bias) @ wo.T - ref
        return float(xp.mean(d.astype(np.float64) ** 2))

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


# ---- g128: level-2 (group) range clipping ----

def search_group_clip(u: np.ndarray, h_diag: np.ndarray, group_size: int, ratios: np.ndarray | None = None,
                      xp=np) -> np.ndarray:
    """Clip ratio per (row, group) of level-1 weights u [n, k_pad] (k_pad a multiple of group_size).

    A ratio shrinks the group's [umin, umax] before the integer s2 / z are chosen; the error of a group is
    sum_j h_j (u_hat_j - u_j)^2 with h = diag(X^T X) of the layer input (zero on padded columns), which is
    separable over groups, so every (row, group) takes its own best ratio. Ratio 1.0 is first and only a
    strictly smaller error replaces it. Returns ratios [n, k_pad // group_size] (numpy). xp = cupy runs the
    search on the GPU (the same elementwise arithmetic; error sums may differ in the last bits).
    """
    ratios = clip_ratios() if ratios is None else np.asarray(ratios, dtype=np.float64)
    n, k = u.shape
    G = k // group_size
    h = np.zeros(k)
    h[: len(h_diag)] = h_diag
    hg = xp.asarray(h.reshape(G, group_size))
    ug = xp.asarray(u, dtype=np.float64).reshape(n, G, group_size)  # u may already be on the device
    # max / min of r * u are r * max / min of u exactly (rounding is monotonic), so the group ranges are
    # taken once; s2 and z then follow progressive_group_params' formulas bit for bit
    umax, umin = ug.max(axis=2), ug.min(axis=2)
    best_ratio = xp.ones((n, G))
    best_err = None
    q = xp.empty_like(ug)
    for r in ratios:
        r = float(r)
        s2 = xp.clip(xp.rint((umax * r - umin * r) / 15.0), 1, 127)[..., None]  # float64 of uint8 values
        z = xp.clip(xp.rint(-(umin * r)), -128, 127)[..., None]  # float64 of int16 values
        # progressive_codes (kept in float64: the codes 0..15 are exact) and the dequantization error
        xp.add(ug, z, out=q)
        xp.divide(q, s2, out=q)
        xp.rint(q, out=q)
        xp.clip(q, 0, 15, out=q)
        xp.multiply(q, s2, out=q)
        xp.subtract(q, z, out=q)
        xp.subtract(q, ug, out=q)
        xp.square(q, out=q)
        err = xp.einsum("ngj,gj->ng", q, hg)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = xp.where(better, err, best_err)
        best_ratio = xp.where(better, r, best_ratio)
    if xp is not np:
        best_ratio = xp.asnumpy(best_ratio)
    return best_ratio
