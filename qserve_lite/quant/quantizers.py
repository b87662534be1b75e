"""Round-to-nearest weight quantizers (the formats of formats.py), each split into "choose parameters"
and "quantize with fixed parameters" so GPTQ and clipping search can reuse the second half.

Rounding is numpy's rint (round half to even, as torch.round). All math in float64 on fp16-rounded
parameters, so a code is exactly what the stored fp16 scale produces. Every function runs on the array
module of its input (numpy, or cupy on the GPU: the same elementwise arithmetic, the same results).
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import array_module, to_host
from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel

PROTECTIVE_RANGE = 119  # QoQ: level-1 int8 range kept inside +-119 so 4-bit requantization stays in int8


def _f64(x):
    """x as float64 on its own array module (numpy or cupy)."""
    return array_module(x).asarray(x, dtype=np.float64)


def _f16(x):
    return _f64(x).astype(np.float16)


# ---- per-channel asymmetric 4-bit (QoQ "gchn"; deepcompressor post-scale zero) ----

def w4_per_channel_params(w: np.ndarray, clip_ratio=1.0) -> tuple[np.ndarray, np.ndarray]:
    """fp16 scales and scaled zeros [n] for rows of w [n, k]; clip_ratio (scalar or [n]) shrinks the range."""
    w = _f64(w)
    ratio = array_module(w).asarray(clip_ratio, dtype=np.float64)
    vmax = w.max(axis=1) * ratio
    vmin = w.min(axis=1) * ratio
    scales = _f16((vmax - vmin) / 15.0)
    scales[scales == 0] = 1.0
    szeros = _f16(-vmin)
    return scales, szeros


def w4_per_channel_codes(w: np.ndarray, scales: np.ndarray, szeros: np.ndarray) -> np.ndarray:
    """uint8 codes in 0..15 of w [n, ...] (rows) with fixed per-row scales/szeros [n]."""
    w = _f64(w)
    xp = array_module(w)
    shape = (-1,) + (1,) * (w.ndim - 1)
    s = xp.asarray(scales, dtype=np.float64).reshape(shape)
    z = xp.asarray(szeros, dtype=np.float64).reshape(shape)
    return xp.clip(xp.rint((w + z) / s), 0, 15).astype(np.uint8)


def quantize_w4_per_channel(w: np.ndarray, clip_ratio=1.0) -> W4PerChannel:
    scales, szeros = w4_per_channel_params(w, clip_ratio)
    return W4PerChannel(to_host(w4_per_channel_codes(w, scales, szeros)), to_host(scales), to_host(szeros),
                        in_features=w.shape[1])


# ---- progressive group quantization (QoQ g128): int8 per-channel level 1, uint4 per-group level 2 ----

def pad_columns(w: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad the input-feature axis to a multiple (exact: padded columns meet zero activations)."""
    k = w.shape[1]
    k_pad = -(-k // multiple) * multiple
    if k_pad == k:
        return _f64(w)
    out = array_module(w).zeros((w.shape[0], k_pad), dtype=np.float64)
    out[:, :k] = w
    return out


def progressive_s1(w: np.ndarray, protect: int = PROTECTIVE_RANGE) -> np.ndarray:
    """Level-1 fp16 per-row scales: max|W| / protect."""
    s1 = _f16(array_module(w).abs(_f64(w)).max(axis=1) / protect)
    s1[s1 == 0] = 1.0
    return s1


def to_level1(w: np.ndarray, s1: np.ndarray, protect: int = PROTECTIVE_RANGE) -> np.ndarray:
    """U = clip(W / s1, -protect, protect), unrounded (rounding happens at level 2)."""
    xp = array_module(w)
    return xp.clip(_f64(w) / xp.asarray(s1, dtype=np.float64)[:, None], -protect, protect)


def progressive_group_params(u: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer group scales s2 (uint8, 1..127) and scaled zeros z (int16, -128..127) of level-1 U [n, k]."""
    xp = array_module(u)
    n, k = u.shape
    g = u.reshape(n, k // group_size, group_size)
    umax, umin = g.max(axis=2), g.min(axis=2)
    s2 = xp.clip(xp.rint((umax - umin) / 15.0), 1, 127).astype(np.uint8)
    zeros = xp.clip(xp.rint(-umin), -128, 127).astype(np.int16)
    return s2, zeros


def progressive_codes(u: np.ndarray, s2: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """uint8 codes of level-1 values u with fixed s2/zeros of the same (broadcast) shape."""
    xp = array_module(u)
    return xp.clip(xp.rint((u + zeros.astype(np.float64)) / s2.astype(np.float64)), 0, 15).astype(np.uint8)


def quantize_w4_group(w: np.ndarray, group_size: int = 128, protect: int = PROTECTIVE_RANGE) -> W4Group:
    k = w.shape[1]
    wp = pad_columns(w, group_size)
    s1 = progressive_s1(wp, protect)
    u = to_level1(wp, s1, protect)
    s2, zeros = progressive_group_params(u, group_size)
    xp = array_module(u)
    codes = progressive_codes(u, xp.repeat(s2, group_size, axis=1), xp.repeat(zeros, group_size, axis=1))
    return W4Group(to_host(codes), to_host(s1), to_host(s2), to_host(zeros), group_size, in_features=k)


# ---- per-channel symmetric int8 (W8A8) ----

def quantize_w8_per_channel(w: np.ndarray) -> W8PerChannel:
    w = _f64(w)
    xp = array_module(w)
    scales = _f16(xp.abs(w).max(axis=1) / 127.0)
    scales[scales == 0] = 1.0
    codes = xp.clip(xp.rint(w / scales.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
    return W8PerChannel(to_host(codes), to_host(scales), in_features=w.shape[1])
