"""Filtered sampling of one token per row: temperature, top-k, top-p, min-p, then an inverse-CDF draw.

The functions below are the specification of cuda/sample.cu, bit for bit. Per row r of logits [B, V]
(a selected row `rows[r]`), with its temperature T, top_k k (<= 0 or >= V: off), top_p p (>= 1: off),
min_p (<= 0: off) and uniform u in (0, 1]:

    x = fp32(logits) / T                      (IEEE fp32 division)
    m = max(x)
    q_i = weight(x_i - m)                     (uint32 in [0, 2^30]: 2^30 * e^d truncated, see fixed_weights;
                                               computed with fp32 operations each rounded once, so every
                                               backend gets the same integers; d < -21 gives 0)
    top-k   t_k = the k-th largest x (with multiplicity); T_k = the sum of q over the k largest
    top-p   G(v) = sum of q_i over x_i > v; t_p = the smallest value v of the row with
            float64(G(v)) < float64(fp32(p)) * float64(T_k)        (T_k: the whole row's sum without top-k)
    min-p   t_m = fp32(m + fp32(log(min_p)))  (p_i >= min_p * p_max in logit space, as before)
    keep    x_i >= max(t_k, t_p, t_m)  (ties at a threshold are kept; -0.0 == +0.0)
    draw    C = the inclusive prefix sum of q_i over kept tokens in token-id order (uint64, exact);
            token = the first i with float64(C_i) >= float64(u) * float64(C_{V-1})

All masses are exact integers, so the order in which a kernel sums them does not matter. A row whose max is
+-inf (all -inf, or a +inf) takes the first index of its max, like argmax. Logits must be NaN-free.

Against the earlier fp32 sort-and-cumsum sampler the math is the same (top-p over the top-k renormalized
distribution, min-p against the top token); only roundings differ: masses are exact, and a token more than
e^21 (2^30) times less likely than the top one has weight 0.

On the GPU (fp32 logits, kernels/fusions.py switch on) cuda/sample.cu selects the thresholds by a radix
select over the float bits (a histogram of count and mass per 11-bit digit, three passes per threshold,
no sort) and draws with one more pass; rows with no filter skip the selection. Otherwise the function below
runs on the array module: a full sort per filtered row.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import is_cupy
from qserve_lite.kernels.cuda import sample as cuda_sample
from qserve_lite.kernels.fusions import step_fusions

WEIGHT_BITS = 30  # q = floor(2^30 * e^d): a row's mass stays below 2^53 for V < 2^23 (exact in float64)
EXP_FLOOR = -21.0  # e^-21 * 2^30 < 1: every d below weighs 0
MAX_VOCAB = 1 << 23
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # 16 significant bits: n * _LN2_HI is exact for |n| < 256
_LN2_LO = np.float32(1.4286068203094173e-06)
# Taylor coefficients of e^r, r in [-ln2/2, ln2/2], highest first (error ~r^7/5040 < 1e-7)
_POLY = tuple(np.float32(c) for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0))


def fixed_weights(d, xp=np):
    """uint32 weights of fp32 differences d = x - max (<= 0, -inf or NaN allowed): trunc(2^30 * e^d).

    e^d = 2^n * poly(r), n = rint(d * log2 e), r = (d - n * ln2_hi) - n * ln2_lo, the polynomial by Horner;
    every product and sum is one fp32 operation rounded to nearest even (no FMA), the power of two exact.
    d < EXP_FLOOR, -inf and NaN give 0."""
    d = xp.asarray(d, dtype=xp.float32)
    live = d >= np.float32(EXP_FLOOR)
    d = xp.where(live, d, np.float32(0.0))
    n = xp.rint(d * _LOG2E)
    r = d - n * _LN2_HI
    r = r - n * _LN2_LO
    p = xp.full(d.shape, _POLY[0], dtype=xp.float32)
    for c in _POLY[1:]:
        p = p * r + c
    scale = ((n.astype(xp.int32) + 127) << 23).view(xp.float32)  # 2^n, n in [-31, 0]
    q = (p * scale * np.float32(1 << WEIGHT_BITS)).astype(xp.uint32)
    return xp.where(live, q, xp.uint32(0))


def row_params(V: int, temperature, top_k, top_p, min_p, u) -> dict[str, np.ndarray]:
    """Host arrays per sampled row, normalized: temps fp32, k int32 (V = off), p fp32 (1 = off), log_min_p
    fp32 (-inf = off), u fp32."""
    k = np.asarray(top_k, dtype=np.int64)
    p = np.asarray(top_p, dtype=np.float32)
    min_p = np.asarray(min_p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_min_p = np.where(min_p > 0, np.log(np.maximum(min_p, 0.0)), -np.inf).astype(np.float32)
    return {
        "temps": np.asarray(temperature, dtype=np.float32),
        "k": np.where((k <= 0) | (k >= V), V, k).astype(np.int32),
        "p": np.where(p >= 1, np.float32(1), p).astype(np.float32),
        "log_min_p": log_min_p,
        "u": np.asarray(u, dtype=np.float32),
    }


def sample_rows(logits, rows, temperature, top_k, top_p, min_p, u, xp=np):
    """int32 [len(rows)] (array of xp): the token drawn for each selected row of logits [B, V]
    (module docstring). rows, temperature (> 0), top_k, top_p, min_p and u are host sequences, one per row."""
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"sample_rows: expected 2-D logits with at least one column, got {logits.shape}")
    V = logits.shape[1]
    if V >= MAX_VOCAB:
        raise ValueError(f"sample_rows: vocabulary of {V} tokens is too large (at most {MAX_VOCAB - 1})")
    rows = np.asarray(rows, dtype=np.int64)
    params = row_params(V, temperature, top_k, top_p, min_p, u)
    if len(rows) == 0:
        return xp.empty((0,), dtype=xp.int32)
    if is_cupy(xp) and logits.dtype == xp.float32 and step_fusions():
        return cuda_sample.sample_rows(logits, rows, **params)
    x = logits[xp.asarray(rows)].astype(xp.float32) / xp.asarray(params["temps"])[:, None]
    with np.errstate(invalid="ignore"):  # inf - inf in a row whose max is +-inf (it takes the argmax)
        return draw(x, params, xp)


def draw(x, params: dict[str, np.ndarray], xp=np):
    """int32 [R]: the spec's draw for temperature-scaled fp32 logits x [R, V] and normalized row_params."""
    R, V = x.shape
    m = x.max(axis=1)
    q = fixed_weights(x - m[:, None], xp).astype(xp.uint64)
    threshold = xp.full((R,), -np.inf, dtype=xp.float32)
    k, p = params["k"], params["p"]
    sel = np.nonzero((k < V) | (p < 1))[0]
    if len(sel):
        threshold[xp.asarray(sel)] = top_k_top_p_threshold(x[xp.asarray(sel)], m[xp.asarray(sel)], k[sel],
                                                           p[sel], xp)
    threshold = xp.maximum(threshold, m + xp.asarray(params["log_min_p"]))
    kept = xp.cumsum(xp.where(x >= threshold[:, None], q, xp.uint64(0)), axis=1)
    target = xp.asarray(params["u"], dtype=xp.float64) * kept[:, -1].astype(xp.float64)
    tokens = (kept.astype(xp.float64) < target[:, None]).sum(axis=1)
    return xp.where(xp.isfinite(m), tokens, xp.argmax(x, axis=1)).astype(xp.int32)


def top_k_top_p_threshold(x, m, k: np.ndarray, p: np.ndarray, xp=np):
    """fp32 [R]: max(t_k, t_p) of rows x [R, V] with maxima m (module docstring), by a descending sort."""
    V = x.shape[1]
    ordered = -xp.sort(-x, axis=1)
    kk = xp.asarray(k, dtype=xp.int64)[:, None]
    mass = xp.cumsum(fixed_weights(ordered - m[:, None], xp).astype(xp.uint64), axis=1)  # inclusive
    t_k = xp.take_along_axis(ordered, kk - 1, axis=1)[:, 0]
    total_k = xp.take_along_axis(mass, kk - 1, axis=1)[:, 0]
    cut = xp.asarray(p, dtype=xp.float64) * total_k.astype(xp.float64)
    above = xp.concatenate([xp.zeros((len(k), 1), dtype=xp.uint64), mass[:, : V - 1]], axis=1)  # G(first)
    last = (above.astype(xp.float64) < cut[:, None]).sum(axis=1) - 1  # the prefix keeps a value's ties
    t_p = xp.take_along_axis(ordered, last[:, None], axis=1)[:, 0]
    t_p = xp.where(xp.asarray(p < 1), t_p, np.float32(-np.inf))
    return xp.maximum(t_k, t_p)
