"""Next-token choice from a logits row: greedy, or temperature + top-k + top-p sampling (numpy)."""

from __future__ import annotations

import numpy as np

from ..sampling_params import SamplingParams


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits [vocab] (any float dtype) -> token id."""
    logits = np.asarray(logits, dtype=np.float64)
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = cum - probs[order] < params.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
