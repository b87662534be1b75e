"""The numpy twins added with the CUDA kernels (fused norm/activation quantizers, packed-layout GEMMs, fp16
GEMM) against plain float64 math: they define the kernels' semantics, so they must mean what they say."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.core.pack import pack_w4, to_qserve_group_params
from qserve_lite.kernels.act_quant import quantize_per_token, silu_mul, silu_mul_quant
from qserve_lite.kernels.fp16_gemm import fp16_gemm
from qserve_lite.kernels.norm_quant import rms_norm, rms_norm_quant
from qserve_lite.kernels.w4a8_gemm import (
    group_level1,
    w4_to_int8,
    w4a8_group_gemm,
    w4a8_group_gemm_packed,
    w4a8_per_channel_gemm,
    w4a8_per_channel_gemm_packed,
)


def rng():
    return np.random.default_rng()


@pytest.mark.parametrize("m,k", [(1, 64), (7, 200), (33, 77)])
def test_rms_norm_twin(m, k):
    r = rng()
    x = r.standard_normal((m, k)).astype(np.float16)
    res = r.standard_normal((m, k)).astype(np.float16)
    gamma = (1 + 0.1 * r.standard_normal(k)).astype(np.float16)
    y, new_res = rms_norm(x, gamma, 1e-5, res)
    h = (x.astype(np.float64) + res).astype(np.float16).astype(np.float64)
    assert np.array_equal(new_res, h.astype(np.float16))
    ref = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-5) * gamma.astype(np.float64)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2**-10, atol=1e-7)
    qa, r2 = rms_norm_quant(x, gamma, 1e-5, res)
    same = quantize_per_token(y)
    assert np.array_equal(r2, new_res) and all(np.array_equal(a, b) for a, b in zip(qa, same, strict=True))
    y0, r0 = rms_norm(x, gamma, 1e-5)  # no residual: the stream is x itself
    assert np.array_equal(r0, x)


def test_silu_twin():
    r = rng()
    gu = (r.standard_normal((5, 2 * 96)) * 4).astype(np.float16)
    g, u = gu[:, :96].astype(np.float64), gu[:, 96:].astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    h = silu_mul(gu)
    assert h.dtype == np.float16 and h.shape == (5, 96)
    np.testing.assert_allclose(h.astype(np.float64), ref, rtol=2**-10, atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(silu_mul_quant(gu), quantize_per_token(h), strict=True))
    with pytest.raises(ValueError):
        silu_mul(gu[:, :-1])


def test_packed_twins_match_unpacked():
    r = rng()
    n, k, k_pad = 64, 200, 256
    q = r.integers(-127, 128, (3, k)).astype(np.int8)
    sx = r.uniform(1e-3, 1e-2, 3).astype(np.float16)
    xs = r.standard_normal(3).astype(np.float32)
    codes = r.integers(0, 16, (n, k_pad)).astype(np.uint8)
    s1 = r.uniform(1e-3, 1e-2, n).astype(np.float16)
    sz = (s1 * 7).astype(np.float16)
    qw = pack_w4(codes)
    assert np.array_equal(w4a8_per_channel_gemm_packed(q, sx, xs, qw, s1, sz),
                          w4a8_per_channel_gemm(q, sx, xs, codes, s1, sz))
    assert np.array_equal(w4_to_int8(qw), codes.astype(np.int8))
    s2 = r.integers(1, 17, (n, 2)).astype(np.uint8)
    zeros = np.clip(15 * s2.astype(np.int16) - 127 + r.integers(0, 50, (n, 2)), -128, 127).astype(np.int16)
    s2s, s2z = to_qserve_group_params(s2, zeros)
    level1 = group_level1(codes, s2, zeros)
    assert np.array_equal(w4_to_int8(qw, s2s, s2z), level1)
    assert np.array_equal(w4a8_group_gemm_packed(q, sx, qw, s1, s2s, s2z), w4a8_group_gemm(q, sx, level1, s1))


def test_fp16_gemm_twin():
    r = rng()
    x = r.standard_normal((4, 40)).astype(np.float16)
    w = r.standard_normal((24, 40)).astype(np.float16)
    b = r.standard_normal(24).astype(np.float16)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.array_equal(fp16_gemm(x, w), exact.astype(np.float32).astype(np.float16))
    out32 = fp16_gemm(x, w, b, np.float32)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, exact + b.astype(np.float64), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        fp16_gemm(x, w, out_dtype=np.int8)
