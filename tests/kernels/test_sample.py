"""kernels/sample.py: filtered sampling on integer masses (the spec of cuda/sample.cu), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.kernels.sample import MASS_TABLE, masses, min_p_log, sample_row, sample_rows, top_p_threshold


def logits_row(seed: int, V: int = 3000, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(V).astype(np.float32) * 3
    if ties:
        x = np.round(x).astype(np.float32)
    return x


def draws(x, n=4000, **kw):
    """Tokens for the uniforms (j + 0.5) / n: the inverse CDF on a grid."""
    p = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
    return np.array([sample_row(x, p["temperature"], p["top_k"], p["top_p"], p["min_p"], (j + 0.5) / n)
                     for j in range(n)])


def test_masses_follow_exp_within_the_table_step():
    x = np.linspace(-20, 0, 5001).astype(np.float32)
    m = masses(x, np.float32(0)).astype(np.float64)
    ref = 2.0**31 * np.exp(x.astype(np.float64))
    assert np.all(np.abs(m - ref) <= ref * (2 ** (1 / 256) - 1) + 1)  # the table step, then the shift's floor
    assert masses(np.array([-np.inf, -100, 0], np.float32), np.float32(0)).tolist() == [0, 0, 2**31]
    assert MASS_TABLE[0] == 2**31 and np.all(np.diff(MASS_TABLE.astype(np.int64)) < 0)


@pytest.mark.parametrize("ties", [False, True])
def test_top_p_threshold_is_the_brute_force_one(ties):
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = logits_row(int(rng.integers(1000)), 400, ties)
        m = masses(x, x.max())
        p = float(rng.uniform(0.05, 0.99))
        best = max(int(t) for t in np.unique(m[m > 0]) if float(m[m >= t].sum()) >= p * float(m.sum()))
        assert top_p_threshold(m, p) == best


def test_draws_follow_the_masses():
    x = logits_row(1, 50)
    n = 20000
    tokens = draws(x, n)
    m = masses(x, x.max()).astype(np.float64)
    freq = np.bincount(tokens, minlength=len(x)) / n
    assert np.abs(freq - m / m.sum()).max() <= 1.0 / n + 1e-12  # the inverse CDF on a grid of n points


@pytest.mark.parametrize("ties", [False, True])
def test_filters_bound_what_is_drawn(ties):
    x = logits_row(2, 3000, ties)
    kth = np.sort(x)[::-1][49]
    assert np.all(x[draws(x, 500, top_k=50)] >= kth)
    assert set(draws(x, 300, top_k=1)) == {int(np.argmax(x))}
    thr = np.float32(x.max() + min_p_log(0.2)[()])
    got = draws(x, 500, min_p=0.2)
    assert np.all(x[got] >= thr)
    m = masses(x, x.max())
    tau = top_p_threshold(m, 0.5)
    got = draws(x, 500, top_p=0.5)
    assert np.all(m[got] >= tau) and len(set(got)) > 1
    # the kept set is the top-p set: every token at or above tau is drawn for some uniform
    assert set(got) == set(np.flatnonzero(m >= tau).tolist())


def test_temperature_and_degenerate_rows():
    x = logits_row(4, 100)
    cold, hot = draws(x, 2000, temperature=0.3), draws(x, 2000, temperature=3.0)
    assert len(set(cold)) < len(set(hot))
    assert sample_row(np.full(10, -np.inf, np.float32), 1.0, 0, 1.0, 0.0, 0.5) == 0
    one = np.full(10, -np.inf, np.float32)
    one[7] = 1.0
    assert sample_row(one, 1.0, 0, 0.9, 0.1, 1.0) == 7


def test_rows_are_independent_and_agree_with_the_sorting_sampler_mostly():
    """sample_rows over a batch = sample_row per row; against engine/sampler.py's float path (another
    approximation of the same distribution) the same uniform mostly gives the same token."""
    from qserve_lite.engine.sampler import filter_logits

    rng = np.random.default_rng(5)
    R, V = 64, 2000
    logits = rng.standard_normal((R, V)).astype(np.float32) * 4
    temps, top_k = rng.uniform(0.5, 1.5, R).astype(np.float32), rng.choice([0, 20, 200], R)
    top_p, min_p = rng.choice([1.0, 0.9, 0.6], R), rng.choice([0.0, 0.05], R)
    u = 1.0 - rng.random(R)
    got = sample_rows(logits, temps, top_k, top_p, min_p, u)
    assert got.dtype == np.int32
    assert got.tolist() == [sample_row(logits[r], temps[r], top_k[r], top_p[r], min_p[r], u[r])
                            for r in range(R)]
    x = filter_logits(logits / temps[:, None], top_k, top_p, min_p, np)
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    ref = np.minimum((cdf < u[:, None] * cdf[:, -1:]).sum(axis=-1), V - 1)
    assert (got == ref).mean() >= 0.9
