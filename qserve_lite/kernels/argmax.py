"""Greedy token choice: the index of each row's largest logit, as int32.

This is numpy.argmax over the last axis, and the numpy function below is the specification of
cuda/argmax.cu, exactly:
    - ties go to the lowest index;
    - -0.0 and +0.0 are equal;
    - NaN is larger than every number: a row holding NaN gives the index of its first NaN;
    - a row of -inf gives 0.
On the GPU one pass reads each fp32 row once (a row is split over several blocks, then one small pass
combines their candidates, when there are too few rows to fill the GPU). Other dtypes and shapes, and the
unfused path (kernels/fusions.py), use the array module's own argmax.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import is_cupy
from qserve_lite.kernels.cuda import argmax as cuda_argmax
from qserve_lite.kernels.fusions import step_fusions


def argmax_rows(x, xp=np):
    """int32 [rows]: argmax of each row of x [rows, n] (n >= 1); see the module docstring."""
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"argmax_rows: expected a 2-D array with at least one column, got {x.shape}")
    if is_cupy(xp) and x.dtype == xp.float32 and step_fusions():
        return cuda_argmax.argmax_rows(x)
    return xp.argmax(x, axis=-1).astype(xp.int32)
