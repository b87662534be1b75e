"""Activation-aware channel reordering (QoQ, g128 only): down_proj's input channels sorted by ascending
max |x|, so channels of similar salience share a 128-group.

The permutation is folded into the weights: down_proj columns, gate_proj and up_proj rows (the
intermediate channel order is internal to the MLP, so the float output is unchanged).
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import array_module, to_host
from qserve_lite.model.weights import LayerWeights


def reorder_index(x_absmax: np.ndarray) -> np.ndarray:
    """Channel order: argsort of max |x| ascending (stable, so ties keep their order)."""
    return np.argsort(np.asarray(x_absmax), kind="stable")


def apply_reorder(lw: LayerWeights, perm: np.ndarray) -> None:
    """New channel c is old channel perm[c] (in place, on the weights' device)."""
    xp = array_module(lw.down_proj.weight)
    perm = xp.asarray(perm)
    lw.down_proj.weight = xp.ascontiguousarray(lw.down_proj.weight[:, perm])
    for lin in (lw.gate_proj, lw.up_proj):
        lin.weight = xp.ascontiguousarray(lin.weight[perm])
        if lin.bias is not None:
            lin.bias = lin.bias[perm]


def reorder_down(lw: LayerWeights, down_in_absmax: np.ndarray) -> np.ndarray:
    """Compute and apply the down_proj input reordering of one layer; returns the permutation."""
    perm = reorder_index(to_host(down_in_absmax))
    apply_reorder(lw, perm)
    return perm
