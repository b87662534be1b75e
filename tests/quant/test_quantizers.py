"""Round-to-nearest weight quantizers: invariants of each format."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.quant.quantizers import (
    PROTECTIVE_RANGE,
    quantize_w4_group,
    quantize_w4_per_channel,
    quantize_w8_per_channel,
)


@pytest.mark.parametrize("k", [128, 576, 200])
def test_progressive_invariants(k):
    rng = np.random.default_rng(k)
    w = rng.standard_normal((96, k)) * rng.uniform(0.01, 3, (96, 1))
    w[3, 5] = 40.0  # an outlier row
    q = quantize_w4_group(w, 128)
    assert q.codes.shape == (96, -(-k // 128) * 128) and q.in_features == k
    assert q.codes.max() <= 15
    u8 = q.level1()
    assert u8.min() >= -128 and u8.max() <= 127  # the kernel's byte arithmetic never overflows
    u8 = q.s2.astype(int)[..., None] * q.codes.reshape(96, -1, 128) - q.zeros[..., None]
    assert np.all(np.abs(u8) <= 128)
    assert q.s2.min() >= 1
    err = np.abs(q.dequantize() - w)
    # level-1 error: half a group step inside the range; rounding s2 and z can clip the ends by < 8 more
    s1 = q.s1.astype(np.float64)[:, None]
    step = q.s2.astype(np.float64).repeat(128, axis=1)[:, :k] * s1
    assert np.all(err <= 0.5 * step + 8 * s1)
    assert np.mean(err <= 0.5 * step + 1e-9) > 0.97
    # the outlier keeps its size (level 1 never clips it: |w| <= 119 * s1 by construction)
    assert abs(q.dequantize()[3, 5] - 40.0) < 0.1 * 40.0
    assert np.abs(w).max(axis=1).max() / q.s1.astype(np.float64).max() <= PROTECTIVE_RANGE + 0.1


def test_per_channel_w4_error_bound():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 300))
    q = quantize_w4_per_channel(w)
    assert q.codes.max() <= 15
    step = q.scales.astype(np.float64)[:, None]
    assert np.all(np.abs(q.dequantize() - w) <= 0.5 * step * 1.01)
    clipped = quantize_w4_per_channel(w, clip_ratio=0.5)
    assert np.all(clipped.scales <= q.scales)


def test_w8_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 77))
    q = quantize_w8_per_channel(w)
    assert q.codes.dtype == np.int8 and np.abs(q.codes).max() == 127
    assert np.all(np.abs(q.dequantize() - w) <= 0.5 * q.scales.astype(np.float64)[:, None] * 1.01)


def test_zero_rows_do_not_divide_by_zero():
    w = np.zeros((32, 128))
    for q in (quantize_w4_group(w), quantize_w4_per_channel(w), quantize_w8_per_channel(w)):
        np.testing.assert_array_equal(q.dequantize(), 0.0)
