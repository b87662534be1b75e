"""cuda/sample.cu against its spec (kernels/sample.py), token for token, and the engine with it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cupy_or_skip

from qserve_lite.engine.sampler import Sampler
from qserve_lite.kernels.sample import SAMPLER_KERNEL_ENV, sample_rows

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()


def batch(seed: int, R: int, V: int, kind: str):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((R, V)) * rng.uniform(0.5, 8, (R, 1))).astype(np.float32)
    if kind == "ties":
        x = np.round(x).astype(np.float32)
    elif kind == "inf":
        x[rng.random((R, V)) < 0.3] = -np.inf
        x[0] = -np.inf  # a row of -inf
    elif kind == "zeros":
        x[:, ::3] = np.float32(-0.0)
        x[:, 1::3] = np.float32(0.0)
    params = (rng.uniform(0.3, 2.0, R).astype(np.float32), rng.choice([0, 1, 7, 50, V - 1, V + 5], R),
              rng.choice([1.0, 0.95, 0.5, 0.01], R), rng.choice([0.0, 0.02, 0.5], R), 1.0 - rng.random(R))
    return x, params


@pytest.mark.parametrize("V", [128256, 1000, 33, 1024, 1025])
@pytest.mark.parametrize("kind", ["plain", "ties", "inf", "zeros"])
def test_kernel_matches_spec(V, kind):
    R = 24 if V > 5000 else 64
    x, params = batch(V + len(kind), R, V, kind)
    want = sample_rows(x, *params)
    got = cp.asnumpy(sample_rows(cp.asarray(x), *params))
    assert got.tolist() == want.tolist()


def test_kernel_on_strided_rows_and_u_one():
    x, (t, k, p, mp, u) = batch(1, 16, 5000, "plain")
    u[:] = 1.0  # the last kept token
    big = cp.zeros((16, 6000), dtype=cp.float32)
    big[:, :5000] = cp.asarray(x)
    got = cp.asnumpy(sample_rows(big[:, :5000], t, k, p, mp, u))
    assert got.tolist() == sample_rows(x, t, k, p, mp, u).tolist()


def test_engine_sampler_uses_the_kernel(monkeypatch):
    """Sampler.choose with the kernel on: the spec's tokens for the requests' uniforms (seeded generators)."""

    class Seq:
        def __init__(self, params, seed):
            self.params = params
            self.generator = np.random.default_rng(seed)

    from qserve_lite.sampling_params import SamplingParams

    monkeypatch.setenv(SAMPLER_KERNEL_ENV, "1")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4096)).astype(np.float32) * 3
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01), SamplingParams(),
              SamplingParams(temperature=1.2), SamplingParams(temperature=0.7, top_p=0.8),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5)]
    seqs = [Seq(p, i) for i, p in enumerate(params)]
    got = cp.asnumpy(Sampler(cp).choose(cp.asarray(logits), seqs))
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    u = [1.0 - np.random.default_rng(i).random() for i in sampled]
    want = sample_rows(logits[sampled], [params[i].temperature for i in sampled],
                       [params[i].top_k for i in sampled], [params[i].top_p for i in sampled],
                       [params[i].min_p for i in sampled], u)
    assert got[sampled].tolist() == want.tolist()
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert got[greedy].tolist() == np.argmax(logits[greedy], axis=-1).tolist()
