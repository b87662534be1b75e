"""kernels/gptq.py: the spec of cuda/gptq.cu (GPTQ's column loop over a block), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.kernels.gptq import ColumnParams, gptq_block, gptq_block_reference
from qserve_lite.quant import gptq as quant_gptq
from qserve_lite.quant.gptq import _inverse_cholesky_upper, gptq, progressive_column, progressive_params


def problem(seed: int, nb: int = 40, n: int = 23, k: int = 96):
    """A weight block [nb, n] (rows = columns of W), the block's factor rows hb, and the factor itself."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k))
    h = x.T @ x / len(x)
    hinv = _inverse_cholesky_upper(h, 0.01, xp=np)
    w = rng.standard_normal((nb, n)) * 0.05
    return w, hinv[:nb, :nb], hinv


def params(kind: str, n: int, seed: int = 0, k: int = 96) -> ColumnParams:
    """Column quantizer parameters for n output channels and k columns (groups of 64)."""
    rng = np.random.default_rng(seed + 100)
    if kind == "w4_per_channel":
        s = rng.uniform(0.01, 0.02, n)
        return ColumnParams(kind, s, 7.5 * s)
    if kind == "w4_progressive":
        groups = -(-k // 64)
        s2 = rng.integers(1, 17, (n, groups)).astype(float)
        zeros = rng.integers(0, 100, (n, groups)).astype(float)
        return ColumnParams(kind, rng.uniform(0.001, 0.002, n), s2, zeros, 64, 119.0)
    return ColumnParams(kind, rng.uniform(0.0005, 0.001, n))


def row_update_form(w, hb, p: ColumnParams, columns):
    """GPTQ's textbook order: each column's error is subtracted from every later column at once."""
    block = w.copy()
    qt, e = np.empty_like(w), np.empty_like(w)
    for i in range(len(w)):
        q = p(int(columns[i]), block[i])
        qt[i] = q
        e[i] = (block[i] - q) / hb[i, i]
        block[i + 1:] -= hb[i, i + 1:, None] * e[i][None, :]
    return qt, e


@pytest.mark.parametrize("kind", ["w4_per_channel", "w4_progressive", "w8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_is_the_sequential_update_bit_for_bit(kind, seed):
    w, hb, _ = problem(seed)
    p = params(kind, w.shape[1], seed)
    columns = np.random.default_rng(seed).permutation(96)[: len(w)]
    qt, e = gptq_block_reference(w, hb, p, columns)
    qt2, e2 = row_update_form(w, hb, p, columns)
    assert np.array_equal(qt, qt2) and np.array_equal(e, e2)
    assert np.array_equal(gptq_block(w, hb, p, columns)[0], qt)  # numpy input: the dispatcher runs the spec


def test_quantizer_outputs_lie_on_the_grid():
    w, hb, _ = problem(3)
    n, columns = w.shape[1], np.arange(len(w))
    for kind, lo, hi in (("w4_per_channel", 0, 15), ("w4_progressive", 0, 15), ("w8", -127, 127)):
        p = params(kind, n)
        qt, _ = gptq_block_reference(w, hb, p, columns)
        if kind == "w4_per_channel":
            codes = (qt + p.p1) / p.p0
        elif kind == "w8":
            codes = qt / p.p0
        else:
            g = columns // p.group_size
            codes = ((qt / p.p0).T + p.p2[:, g]) / p.p1[:, g]
        assert np.allclose(codes, np.rint(codes), atol=1e-6)
        assert codes.min() >= lo - 1e-6 and codes.max() <= hi + 1e-6


def test_blockwise_gptq_matches_the_batched_cpu_path(monkeypatch):
    """The whole GPTQ with the sequential block (what the kernel computes) against quant/gptq.py's CPU path
    (the same updates in another summation order): the dequantized weights agree up to rare rounding ties."""
    rng = np.random.default_rng(5)
    n, k = 24, 256
    x = rng.standard_normal((1024, k)) * rng.uniform(0.2, 3, k)
    h = x.T @ x / len(x)
    w = rng.standard_normal((n, k)) * 0.04
    _, s1, s2, z = progressive_params(w, 128)
    col = progressive_column(s1, s2, z, 128)
    ref = gptq(w, h, col, xp=np)

    calls = []

    def sequential(wt, qt, hinv, perm, b0, b1, quantize_column, inner=16):
        calls.append(b1 - b0)
        qt[b0:b1], err = gptq_block_reference(wt[b0:b1], hinv[b0:b1, b0:b1], quantize_column, perm[b0:b1])
        if b1 < wt.shape[0]:
            wt[b1:] -= hinv[b0:b1, b1:].T @ err

    monkeypatch.setattr(quant_gptq, "_gptq_block", sequential)
    out = gptq(w, h, col, xp=np)
    assert calls == [128, 128]
    step = (s1.astype(float)[:, None] * np.repeat(s2.astype(float), 128, axis=1)[:, :k])
    diff = np.abs(out - ref) / step
    assert (diff > 1e-6).mean() < 0.01 and diff.max() <= 1 + 1e-6  # a few codes one step apart at most


def test_kernel_is_on_by_default_and_off_with_zero(monkeypatch):
    from qserve_lite.kernels.gptq import GPTQ_KERNEL_ENV, gptq_kernel_enabled

    monkeypatch.delenv(GPTQ_KERNEL_ENV, raising=False)
    assert gptq_kernel_enabled()
    monkeypatch.setenv(GPTQ_KERNEL_ENV, "0")
    assert not gptq_kernel_enabled()
