"""GPTQ's column loop over one block of columns: the specification of cuda/gptq.cu, and the dispatch to it.

For the block's columns j = 0 .. nb-1 in order (rows of w [nb, n]; every output channel at once):
    v   = w[j] - hb[0, j] * e[0] - hb[1, j] * e[1] - ... - hb[j-1, j] * e[j-1]   (left to right)
    q   = the column's quantizer (ColumnParams) applied to v
    e[j] = (v - q) / hb[j, j]
giving the dequantized columns qt [nb, n] and the scaled errors e [nb, n] (for the lazy batch update of the
columns after the block). Each step is one float64 operation rounded to nearest, so `gptq_block_reference`
(numpy) and the kernel compute the same bits. This is the sequential GPTQ update: mathematically the same as
quant/gptq.py's CPU path, which batches the updates inside a block into small matrix products (another
summation order).

On the GPU the loop otherwise costs about 20 array launches per column (~39,000 columns per Llama-3-8B
layer); the kernel does a block of 128 columns in one launch. On by default (QSERVE_LITE_GPTQ_KERNEL=0 turns
it off): on an H200 (2026-12-03) it is bit-exact against the spec (`pytest -m gpu`), and the Llama-3-8B-shaped
quantize spent 22 s in GPTQ instead of 284 s (end to end 174 s instead of 435 s, g128).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from qserve_lite.core.backend import array_module, is_cupy
from qserve_lite.kernels.cuda import gptq as cuda_gptq

GPTQ_KERNEL_ENV = "QSERVE_LITE_GPTQ_KERNEL"
KERNEL_MAX_NB = cuda_gptq.MAX_NB  # columns per kernel launch


def gptq_kernel_enabled() -> bool:
    """$QSERVE_LITE_GPTQ_KERNEL is not "0" (the GPU column loop runs cuda/gptq.cu; the default)."""
    return os.environ.get(GPTQ_KERNEL_ENV, "1") != "0"


@dataclass(frozen=True)
class ColumnParams:
    """A column quantizer with fixed parameters (float64, on one array module), callable as
    (original column index j, column [n]) -> dequantized column:
      w4_per_channel: clip(rint((v + p1) / p0), 0, 15) * p0 - p1            (p0 scales, p1 scaled zeros [n])
      w4_progressive: u = clip(v / p0, -protect, protect); g = j // group_size;
                      q = clip(rint((u + p2[:, g]) / p1[:, g]), 0, 15); (q * p1[:, g] - p2[:, g]) * p0
                      (p0 level-1 scales [n], p1 level-2 scales and p2 zeros [n, groups])
      w8:             clip(rint(v / p0), -127, 127) * p0                    (p0 scales [n])"""

    kind: str
    p0: object
    p1: object = None
    p2: object = None
    group_size: int = 0
    protect: float = 0.0

    def __call__(self, j: int, col):
        xp = array_module(self.p0)
        if self.kind == "w4_per_channel":
            return xp.clip(xp.rint((col + self.p1) / self.p0), 0, 15) * self.p0 - self.p1
        if self.kind == "w4_progressive":
            g = j // self.group_size
            u = xp.clip(col / self.p0, -self.protect, self.protect)
            q = xp.clip(xp.rint((u + self.p2[:, g]) / self.p1[:, g]), 0, 15)
            return (q * self.p1[:, g] - self.p2[:, g]) * self.p0
        return xp.clip(xp.rint(col / self.p0), -127, 127) * self.p0

    def group_indices(self, columns: np.ndarray) -> np.ndarray:
        """int32 group of each original column index (0 for the per-channel kinds)."""
        if self.kind != "w4_progressive":
            return np.zeros(len(columns), np.int32)
        return (np.asarray(columns) // self.group_size).astype(np.int32)


def gptq_block_reference(w: np.ndarray, hb: np.ndarray, params: ColumnParams, columns: np.ndarray):
    """(qt, e) [nb, n] of the module docstring, in numpy; `columns` [nb]: each column's original index."""
    nb, n = w.shape
    qt = np.empty((nb, n))
    e = np.empty((nb, n))
    for j in range(nb):
        v = w[j].copy()
        for i in range(j):
            v -= hb[i, j] * e[i]
        q = params(int(columns[j]), v)
        qt[j] = q
        e[j] = (v - q) / hb[j, j]
    return qt, e


def gptq_block(w, hb, params: ColumnParams, columns: np.ndarray):
    """(qt, e) of one block, on w's array module: the kernel for a cupy block of at most 128 columns (the
    caller checks gptq_kernel_enabled), else the numpy spec."""
    if is_cupy(w):
        return cuda_gptq.gptq_block(w, hb, params, params.group_indices(columns))
    return gptq_block_reference(w, hb, params, columns)
