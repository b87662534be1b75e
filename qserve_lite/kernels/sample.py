"""Filtered sampling of one token per row without sorting the vocabulary: the specification of
cuda/sample.cu, and the dispatch to it.

The engine's sampler (engine/sampler.py) sorts each sampled row (about 6.4 ms of a 31 ms batch-256 decode step
on an H200, 2026-12-02) and sums floats in an order the GPU does not fix. Here every decision is made on
integers, so the kernel and this numpy function choose the same token:

Per row, with x = fp32(logit / temperature) (one rounding) and xmax the largest x:
1. top-k (0 < k < V): keep the x not below the k-th largest x (ties at the threshold kept).
2. Integer masses: a = fp32(xmax - x), s = fp32(a * LOG2E) * 256, and, for s < 8192,
   m = TABLE[q % 256] >> (q // 256) with q = floor(s) and TABLE[j] = round(2^31 * 2^(-j / 256)); else 0.
   (m approximates 2^31 * exp(x - xmax) within 0.3 % + 1; tokens over ~21 nats below the best get 0.)
3. top-p (p < 1): T = the sum of the kept masses; tau = the largest mass value t with
   sum(m >= t over the kept) >= p * T (float64 compare of exact integers); keep m >= tau. This is the
   smallest prefix of the masses sorted descending whose sum reaches p * T, with ties at its last mass kept.
4. min-p (> 0): keep x >= fp32(xmax + fp32(log(min_p))) (the log in float64, rounded once).
5. Draw: with the kept masses m (0 elsewhere) and C_i their running sum in vocabulary order, the token is
   the first i with C_i >= u * C_last for the request's uniform u in (0, 1] (float64).
Logits must be finite or -inf; a row of -inf gives token 0. Rows never share anything: a seeded request
draws the same token whatever else is in the batch.

Opt-in on the GPU (QSERVE_LITE_SAMPLER_KERNEL=1). On an H200 (2026-12-03) it matches this spec token for
token (`pytest -m gpu`) and is ~4x faster than the sort at top-k 50 (batch 256: 4.3 vs 16.5 ms,
benchmarks/sampler.py) but no faster without top-k (15.5 vs 16.5 ms; 7.6 vs 1.7 ms at batch 1), so the
default stays engine/sampler.py's sort-based path until the top-p-only pass is faster.
"""

from __future__ import annotations

import os

import numpy as np

from qserve_lite.core.backend import is_cupy
from qserve_lite.kernels.cuda import sample as cuda_sample

SAMPLER_KERNEL_ENV = "QSERVE_LITE_SAMPLER_KERNEL"
LOG2E = np.float32(1.4426950408889634)
MASS_TABLE = np.round(2.0**31 * 2.0 ** (-np.arange(256) / 256.0)).astype(np.uint64)


def sampler_kernel_enabled() -> bool:
    """$QSERVE_LITE_SAMPLER_KERNEL is "1"."""
    return os.environ.get(SAMPLER_KERNEL_ENV, "0") == "1"


def min_p_log(min_p) -> np.ndarray:
    """fp32 log(min_p) per row (float64 log, rounded once), -inf where min-p is off (0): the kernel gets the
    same host-computed values as the spec."""
    m = np.asarray(min_p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(m > 0, np.log(np.where(m > 0, m, 1.0)), -np.inf).astype(np.float32)


def masses(x: np.ndarray, xmax: np.float32) -> np.ndarray:
    """uint64 integer masses of fp32 x below xmax (step 2 of the module docstring); -inf gives 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        a = (np.float32(xmax) - x.astype(np.float32)).astype(np.float32)
        s = (a * LOG2E).astype(np.float32) * np.float32(256)
    ok = np.isfinite(s) & (s < 8192)
    q = np.where(ok, np.floor(np.where(ok, s, 0)), 0).astype(np.int64)
    return np.where(ok, MASS_TABLE[q & 255] >> (q >> 8).astype(np.uint64), 0).astype(np.uint64)


def top_p_threshold(m: np.ndarray, p: float) -> int:
    """tau of step 3: the last mass of the shortest descending prefix whose sum reaches p * sum(m)."""
    order = np.sort(m[m > 0])[::-1]
    if len(order) == 0:
        return 0
    cum = np.cumsum(order)  # exact in uint64
    target = float(p) * float(cum[-1])
    j = int(np.argmax(cum.astype(np.float64) >= target))
    return int(order[j])


def sample_row(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float,
               u: float) -> int:
    """The token of one row (module docstring); logits fp32 [V]."""
    V = logits.shape[0]
    x = (logits.astype(np.float32) / np.float32(temperature)).astype(np.float32)
    xmax = np.float32(x.max())
    if not np.isfinite(xmax):
        return 0
    keep = np.ones(V, dtype=bool)
    if 0 < top_k < V:
        kth = np.partition(x, V - top_k)[V - top_k]
        keep &= x >= kth
    m = np.where(keep, masses(x, xmax), 0).astype(np.uint64)
    if top_p < 1.0:
        m = np.where(m >= top_p_threshold(m, top_p), m, 0).astype(np.uint64)
    if min_p > 0.0:
        thr = np.float32(xmax + min_p_log(min_p)[()])
        m = np.where(x >= thr, m, 0).astype(np.uint64)
    cum = np.cumsum(m)
    return int(np.argmax(cum.astype(np.float64) >= float(u) * float(cum[-1])))


def sample_rows(logits, temperature, top_k, top_p, min_p, u):
    """int32 [R]: one token per row of fp32 logits [R, V] (module docstring); the per-row parameters are host
    arrays (temperature > 0; top_k 0 = off; top_p 1 = off; min_p 0 = off; u in (0, 1])."""
    temperature, top_k, top_p, min_p, u = (np.asarray(a) for a in (temperature, top_k, top_p, min_p, u))
    if is_cupy(logits):
        return cuda_sample.sample_rows(logits, temperature, top_k, top_p, min_p_log(min_p), u, MASS_TABLE)
    return np.array([sample_row(logits[r], float(temperature[r]), int(top_k[r]), float(top_p[r]),
                                float(min_p[r]), float(u[r])) for r in range(logits.shape[0])],
                    dtype=np.int32)
