"""GPTQ with fixed quantization parameters (deepcompressor's kernel GPTQ as QoQ uses it).

Scales and zeros are chosen before GPTQ (RTN ranges, clipping) from the whole weight and stay fixed;
GPTQ only chooses the codes, column by column, feeding each column's rounding error forward through the
upper Cholesky factor of H^-1 (H = 2/N sum x^T x of the layer's float inputs), with act-order (columns by
descending diag H), 1 % damping, blocks of 128 columns and lazy batch updates.

The per-column quantizer is a callable (original column index, column values [n]) -> dequantized
column; `per_channel_w4_column`, `progressive_column` and `w8_column` build it for the three formats, and
`gptq_w4_per_channel`, `gptq_w4_group`, `gptq_w8` return the integer formats built from the final codes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qserve_lite.core.backend import array_module, is_cupy, to_host
from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.kernels.gptq import KERNEL_MAX_NB, ColumnParams, gptq_block, gptq_kernel_enabled
from qserve_lite.quant.quantizers import (
    PROTECTIVE_RANGE,
    pad_columns,
    progressive_codes,
    progressive_group_params,
    progressive_s1,
    quantize_w8_per_channel,
    to_level1,
    w4_per_channel_codes,
    w4_per_channel_params,
)

ColumnQuantizer = Callable[[int, np.ndarray], np.ndarray]


def _inverse_cholesky_upper(h, damp: float, max_tries: int = 250, xp=None):
    """Upper U with U^T U = (H + damping I)^-1; damping starts at damp * mean(diag H) and grows by
    0.1 % of the mean diagonal per failed Cholesky. Runs on xp (default: H's array module; cupy factors on
    the GPU with float64 cuSOLVER) and returns an xp array; numpy gives the reference result.

    With J the order reversal: J H J = L L^T gives H = (J L J)(J L J)^T with J L J upper, hence
    H^-1 = U^T U for the upper U = (J L J)^-1 = J L^-1 J: one Cholesky and one triangular inverse.
    """
    xp = xp or array_module(h)
    h = xp.asarray(h, dtype=np.float64)
    mean_diag = float(xp.mean(xp.diag(h)))
    flipped = xp.ascontiguousarray(h[::-1, ::-1])
    eye = xp.eye(h.shape[0])
    for t in range(max_tries):
        low = _cholesky(xp, flipped + (damp + 0.001 * t) * mean_diag * eye)
        if low is None:
            continue
        return xp.ascontiguousarray(xp.linalg.inv(low)[::-1, ::-1])
    raise np.linalg.LinAlgError(f"GPTQ: the Hessian stayed singular after {max_tries} damping increases")


def _cholesky(xp, a):
    """Lower Cholesky factor of a, or None when a is not positive definite (numpy raises; cuSOLVER is made
    to raise too, and a non-finite factor also counts as a failure)."""
    if xp is np:
        try:
            return np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            return None
    import cupyx

    try:
        with cupyx.errstate(linalg="raise"):
            low = xp.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return None
    return low if bool(xp.isfinite(low).all()) else None


def _gptq_block(wt, qt, hinv, perm: np.ndarray, b0: int, b1: int, quantize_column, inner: int = 16) -> None:
    """GPTQ over columns b0..b1 (rows of wt [k, n], in place into qt), then the lazy batch update of the
    columns after the block. Inside the block the error feedback is itself batched per `inner` columns; on the
    GPU (unless $QSERVE_LITE_GPTQ_KERNEL=0), cuda/gptq.cu runs the block's column loop in one launch instead
    (kernels/gptq.py: the sequential update, the same arithmetic in another summation order)."""
    if (is_cupy(wt) and gptq_kernel_enabled() and isinstance(quantize_column, ColumnParams)
            and b1 - b0 <= KERNEL_MAX_NB):
        qt[b0:b1], err = gptq_block(wt[b0:b1], hinv[b0:b1, b0:b1], quantize_column, perm[b0:b1])
        if b1 < wt.shape[0]:
            wt[b1:] -= hinv[b0:b1, b1:].T @ err
        return
    block = wt[b0:b1].copy()
    err = array_module(wt).empty_like(block)
    hb = hinv[b0:b1, b0:b1]
    nb = b1 - b0
    for s0 in range(0, nb, inner):
        s1 = min(s0 + inner, nb)
        for i in range(s0, s1):
            col = block[i]
            q = quantize_column(int(perm[b0 + i]), col)
            qt[b0 + i] = q
            e = (col - q) / hb[i, i]
            if i + 1 < s1:
                block[i + 1:s1] -= hb[i, i + 1:s1, None] * e[None, :]
            err[i] = e
        if s1 < nb:
            block[s1:] -= hb[s0:s1, s1:].T @ err[s0:s1]
    if b1 < wt.shape[0]:
        wt[b1:] -= hinv[b0:b1, b1:].T @ err


def gptq(w, hessian, quantize_column: ColumnQuantizer, block_size: int = 128, damp: float = 0.01,
         act_order: bool = True, xp=None):
    """Dequantized GPTQ weight [n, k] (float64) of w [n, k] given H [k, k], on xp (default: w's array
    module; cupy runs everything on the GPU: the factorization, the column loop and the lazy batch updates,
    and returns a cupy array).

    Dead input channels (H_jj == 0) get H_jj = 1 and a zeroed weight column before quantization.
    Inside each block of `block_size` columns the error feedback is itself batched per 16 columns
    (the same arithmetic, fewer large temporaries).
    """
    xp = xp or array_module(w)
    w = xp.array(w, dtype=np.float64)
    h = xp.array(hessian, dtype=np.float64)
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match the weight's {k} input channels")
    diag = np.array(to_host(xp.diag(h)))
    dead = np.flatnonzero(diag == 0)
    if len(dead):
        dead_x = xp.asarray(dead)
        h[dead_x, dead_x] = 1.0
        w[:, dead_x] = 0.0
        diag[dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    perm_x = xp.asarray(perm)
    h = h[perm_x][:, perm_x]
    hinv = _inverse_cholesky_upper(h, damp, xp=xp)
    del h
    wt = xp.ascontiguousarray(w[:, perm_x].T)  # [k, n]: column j of W is row j here (contiguous)
    qt = xp.empty_like(wt)
    for b0 in range(0, k, block_size):
        _gptq_block(wt, qt, hinv, perm, b0, min(b0 + block_size, k), quantize_column)
    out = xp.empty((n, k))
    out[:, perm_x] = qt.T
    return out


# ---- per-column quantizers with fixed parameters (on the array module of their parameters) ----

def per_channel_w4_column(scales, szeros) -> ColumnQuantizer:
    return ColumnParams("w4_per_channel", scales.astype(np.float64), szeros.astype(np.float64))


def progressive_column(s1, s2, zeros, group_size: int, protect: int = PROTECTIVE_RANGE) -> ColumnQuantizer:
    """Works in the level-1 domain U = W / s1 (clamped to +-protect); a column's group is its original
    index's group (the parameters came from the whole group before GPTQ)."""
    return ColumnParams("w4_progressive", s1.astype(np.float64), s2.astype(np.float64),
                        zeros.astype(np.float64), group_size, float(protect))


def w8_column(scales) -> ColumnQuantizer:
    return ColumnParams("w8", scales.astype(np.float64))


# ---- whole-format GPTQ (on the array module of `xp`, else of w; the formats come back on the host) ----

def _on_xp(w, kw: dict):
    xp = kw.get("xp") or array_module(w)
    kw["xp"] = xp
    return xp.asarray(w, dtype=np.float64), xp


def gptq_w4_per_channel(w, hessian, clip_ratio=1.0, **kw) -> W4PerChannel:
    """Per-channel W4 with scales/zeros from w4_per_channel_params(w, clip_ratio), codes by GPTQ."""
    w, xp = _on_xp(w, kw)
    scales, szeros = w4_per_channel_params(w, clip_ratio)
    q = gptq(w, hessian, per_channel_w4_column(scales, szeros), **kw)
    return W4PerChannel(to_host(w4_per_channel_codes(q, scales, szeros)), to_host(scales), to_host(szeros),
                        in_features=w.shape[1])


def progressive_params(w, group_size: int = 128, protect: int = PROTECTIVE_RANGE, group_ratio=None):
    """(padded level-1 U, s1, s2, zeros) as quantize_w4_group computes them; group_ratio [n, G] shrinks
    each group's range first (level-2 clipping). On w's array module."""
    xp = array_module(w)
    wp = pad_columns(w, group_size)
    s1 = progressive_s1(wp, protect)
    u = to_level1(wp, s1, protect)
    scaled = u if group_ratio is None else u * xp.repeat(xp.asarray(group_ratio), group_size, axis=1)
    s2, zeros = progressive_group_params(scaled, group_size)
    return u, s1, s2, zeros


def _w4_group(u, s1, s2, zeros, group_size: int, k: int) -> W4Group:
    xp = array_module(u)
    codes = progressive_codes(u, xp.repeat(s2, group_size, axis=1), xp.repeat(zeros, group_size, axis=1))
    return W4Group(to_host(codes), to_host(s1), to_host(s2), to_host(zeros), group_size, in_features=k)


def rtn_w4_group(w, group_size: int = 128, protect: int = PROTECTIVE_RANGE, group_ratio=None) -> W4Group:
    """quantize_w4_group with optional level-2 clip ratios."""
    w, _ = _on_xp(w, {})
    u, s1, s2, zeros = progressive_params(w, group_size, protect, group_ratio)
    return _w4_group(u, s1, s2, zeros, group_size, w.shape[1])


def gptq_w4_group(w, hessian, group_size: int = 128, protect: int = PROTECTIVE_RANGE, group_ratio=None,
                  **kw) -> W4Group:
    """Progressive group W4 (g128): s1, s2, z as quantize_w4_group computes them (with optional level-2
    clip ratios), codes by GPTQ."""
    w, _ = _on_xp(w, kw)
    _, s1, s2, zeros = progressive_params(w, group_size, protect, group_ratio)
    q = gptq(w, hessian, progressive_column(s1, s2, zeros, group_size, protect), **kw)
    u = pad_columns(q / s1.astype(np.float64)[:, None], group_size)  # q * s2 - z: integers up to rounding
    return _w4_group(u, s1, s2, zeros, group_size, w.shape[1])


def gptq_w8(w, hessian, **kw) -> W8PerChannel:
    """Per-channel symmetric int8 with RTN scales, codes by GPTQ."""
    w, xp = _on_xp(w, kw)
    scales = xp.asarray(quantize_w8_per_channel(w).scales)
    q = gptq(w, hessian, w8_column(scales), **kw)
    codes = xp.clip(xp.rint(q / scales.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
    return W8PerChannel(to_host(codes), to_host(scales), in_features=w.shape[1])
