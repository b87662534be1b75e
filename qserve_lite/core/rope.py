"""Rotary position embedding: frequencies (default, linear, llama3 scaling) and the half-split rotation."""

from __future__ import annotations

import math

import numpy as np

from qserve_lite.core.model_config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] in float64, with the config's rope_scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling.get("factor", 1.0))
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_ff = float(scaling.get("low_freq_factor", 1.0))
    high_ff = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_ctx / low_ff
    high_freq_wavelen = old_ctx / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(mid, blended, scaled)


def rope_cos_sin(positions, inv_freq: np.ndarray, xp, dtype=np.float32):
    """cos/sin tables [*positions.shape, head_dim/2] for integer positions (computed in float64)."""
    pos = np.asarray(positions.get() if hasattr(positions, "get") else positions, dtype=np.float64)
    angles = pos[..., None] * inv_freq
    return xp.asarray(np.cos(angles), dtype=dtype), xp.asarray(np.sin(angles), dtype=dtype)


def apply_rope(x, cos, sin):
    """Rotate x [..., T, heads, head_dim] with half-split pairing (i, i + head_dim/2), as HF Llama does.

    cos/sin have shape [..., T, head_dim/2] and broadcast over heads.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., None, :], sin[..., None, :]
    out = x.copy()
    out[..., :half] = x1 * c - x2 * s
    out[..., half:] = x2 * c + x1 * s
    return out
