"""cuda/gptq.cu against its spec (kernels/gptq.py), bit for bit, and GPTQ on the GPU with the kernel."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cupy_or_skip
from test_gptq_block import params, problem

from qserve_lite.kernels.gptq import GPTQ_KERNEL_ENV, ColumnParams, gptq_block, gptq_block_reference
from qserve_lite.quant.gptq import gptq, progressive_column, progressive_params

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()


def on_gpu(p: ColumnParams) -> ColumnParams:
    return ColumnParams(p.kind, *(None if a is None else cp.asarray(a) for a in (p.p0, p.p1, p.p2)),
                        p.group_size, p.protect)


@pytest.mark.parametrize("kind", ["w4_per_channel", "w4_progressive", "w8"])
@pytest.mark.parametrize("nb,n", [(40, 23), (128, 1000), (1, 33), (77, 64)])
def test_kernel_matches_spec_bit_for_bit(kind, nb, n):
    k = max(96, nb + 3)
    w, _, hinv = problem(nb + n, nb=nb, n=n, k=k)
    p = params(kind, n, nb, k)
    columns = np.random.default_rng(n).permutation(k)[:nb]
    qt, e = gptq_block_reference(w, hinv[:nb, :nb], p, columns)
    hinv_gpu = cp.asarray(hinv)
    qt_gpu, e_gpu = gptq_block(cp.asarray(w), hinv_gpu[:nb, :nb], on_gpu(p), columns)  # hb: a strided view
    assert np.array_equal(cp.asnumpy(qt_gpu), qt)
    assert np.array_equal(cp.asnumpy(e_gpu), e)


def test_gptq_on_gpu_with_and_without_the_kernel(monkeypatch):
    """Both GPU paths run the same GPTQ (the kernel sums in another order): codes agree up to rare ties."""
    rng = np.random.default_rng(9)
    n, k = 300, 384
    x = rng.standard_normal((2048, k)) * rng.uniform(0.2, 3, k)
    h = cp.asarray(x.T @ x / len(x))
    w = cp.asarray(rng.standard_normal((n, k)) * 0.04)
    _, s1, s2, z = progressive_params(w, 128)
    col = progressive_column(s1, s2, z, 128)
    monkeypatch.setenv(GPTQ_KERNEL_ENV, "0")
    ref = cp.asnumpy(gptq(w, h, col))
    monkeypatch.setenv(GPTQ_KERNEL_ENV, "1")
    out = cp.asnumpy(gptq(w, h, col))
    step = cp.asnumpy(s1.astype(cp.float64)[:, None] * cp.repeat(s2.astype(cp.float64), 128, axis=1)[:, :k])
    diff = np.abs(out - ref) / step
    assert (diff > 1e-6).mean() < 0.01 and diff.max() <= 1 + 1e-6
