"""cuda/sample.cu against its spec (kernels/sample.py on numpy, and on CuPy with the fusions off): the same
token for every row, bit for bit. Run with `pytest -m gpu tests/kernels/test_sample_gpu.py`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cupy_or_skip

from qserve_lite.engine.sampler import Sampler
from qserve_lite.engine.sequence import Sequence
from qserve_lite.kernels.fusions import FUSIONS_ENV
from qserve_lite.kernels.sample import sample_rows
from qserve_lite.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
cp = cupy_or_skip()


def mixed_params(rng, R: int, V: int):
    """Per-row temperature, top_k, top_p, min_p, u: each row with no filter, or any mix of the three."""
    kind = rng.integers(0, 8, R)
    temps = rng.choice([0.3, 0.7, 1.0, 1.3], R)
    k = np.where(kind & 1, rng.choice([1, 2, 5, 50, 1000, max(1, V - 1)], R), rng.choice([0, V + 5], R))
    p = np.where(kind & 2, rng.choice([1e-6, 0.1, 0.5, 0.9, 0.95, 0.99999], R), 1.0)
    min_p = np.where(kind & 4, rng.choice([0.001, 0.05, 0.3, 1.0], R), 0.0)
    u = (1.0 - rng.random(R)).astype(np.float32)
    u[:3] = [1.0, np.float32(2.0**-40), 0.5][: min(3, R)]
    return temps, k, p, min_p, u


def logits_rows(rng, R: int, V: int, kind: str):
    if kind == "normal":
        x = rng.standard_normal((R, V)) * rng.uniform(1, 6, (R, 1))
    elif kind == "ties":  # few distinct values: ties at every threshold, signed zeros
        x = rng.integers(-4, 5, (R, V)).astype(np.float64) * 0.5
        x[rng.random((R, V)) < 0.05] = -0.0
    elif kind == "holes":  # -inf entries (masked tokens), one row all -inf but one token
        x = rng.standard_normal((R, V)) * 3
        x[rng.random((R, V)) < 0.5] = -np.inf
        x[0] = -np.inf
        x[0, V // 2] = 0.0
    else:  # "peaked": one large logit and a flat tail far below (weights truncated to 0)
        x = np.full((R, V), -40.0) + rng.standard_normal((R, V)) * 1e-3
        x[np.arange(R), rng.integers(0, V, R)] = 5.0
    return x.astype(np.float32)


def kernel_and_spec(logits, rows, params):
    got = cp.asnumpy(sample_rows(cp.asarray(logits), rows, *params, xp=cp))
    want = sample_rows(logits, rows, *params, xp=np)
    return got, want


@pytest.mark.parametrize("kind", ["normal", "ties", "holes", "peaked"])
@pytest.mark.parametrize("V", [128256, 50257, 1000, 3])
def test_kernel_matches_the_spec(kind, V):
    rng = np.random.default_rng(V + len(kind))
    B = 48 if V > 100_000 else 96
    logits = logits_rows(rng, B, V, kind)
    rows = rng.permutation(B)[: B - 5]  # a subset, out of order
    params = mixed_params(rng, len(rows), V)
    got, want = kernel_and_spec(logits, rows, params)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, f"{bad.size} rows differ, e.g. row {rows[bad[0]]}: kernel {got[bad[0]]} spec " \
                          f"{want[bad[0]]} params {[np.asarray(a)[bad[0]] for a in params]}"


def test_strided_logits_and_the_unfused_cupy_path(monkeypatch):
    rng = np.random.default_rng(1)
    wide = rng.standard_normal((40, 5000)).astype(np.float32) * 4
    logits = cp.asarray(wide)[:, :4093]  # row stride 5000, odd width
    rows = np.arange(40)
    params = mixed_params(rng, 40, 4093)
    got = cp.asnumpy(sample_rows(logits, rows, *params, xp=cp))
    want = sample_rows(wide[:, :4093].copy(), rows, *params, xp=np)
    monkeypatch.setenv(FUSIONS_ENV, "0")  # the spec on CuPy (sort)
    unfused = cp.asnumpy(sample_rows(logits, rows, *params, xp=cp))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(unfused, want)


def test_sampler_choose_on_device_matches_numpy():
    """Greedy, top-k, top-p and min-p rows in one batch through Sampler.choose, device vs host."""
    rng = np.random.default_rng(2)
    V = 128256
    logits = (rng.standard_normal((64, V)) * 3).astype(np.float32)
    kinds = [SamplingParams(), SamplingParams(temperature=0.8, top_k=50, seed=1),
             SamplingParams(temperature=1.0, top_p=0.9, seed=2), SamplingParams(temperature=0.7, min_p=0.05),
             SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.01, seed=3),
             SamplingParams(temperature=1.2)]

    def seqs():
        return [Sequence(i, str(i), [1, 2], kinds[i % len(kinds)], np.random.default_rng(100 + i))
                for i in range(64)]

    got = cp.asnumpy(Sampler(cp).choose(cp.asarray(logits), seqs()))
    want = Sampler(np).choose(logits, seqs())
    np.testing.assert_array_equal(got, want)
