"""The filtered-sampling spec (kernels/sample.py) on the CPU, and a numpy model of the radix select that
cuda/sample.cu runs, checked against the spec's sort."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.kernels.sample import (
    EXP_FLOOR,
    WEIGHT_BITS,
    fixed_weights,
    row_params,
    sample_rows,
    top_k_top_p_threshold,
)

ONE = 1 << WEIGHT_BITS


def test_fixed_weights_track_exp():
    d = np.linspace(-22.0, 0.0, 200_001).astype(np.float32)
    q = fixed_weights(d).astype(np.int64)
    exact = np.exp(d.astype(np.float64)) * ONE
    assert q[-1] == ONE and q.dtype == np.int64
    assert np.all(np.abs(q - exact) <= 3e-7 * exact + 1)  # fp32 rounding, then the truncation
    assert np.all(q[d < EXP_FLOOR] == 0)
    assert np.all(np.diff(q) >= 0)  # monotone on this grid
    assert fixed_weights(np.array([-np.inf, np.nan], dtype=np.float32)).tolist() == [0, 0]


def test_row_params_normalize_the_off_values():
    got = row_params(100, [1.0, 0.5], [0, 150], [1.0, 0.25], [0.0, 0.5], [1.0, 0.5])
    assert got["k"].tolist() == [100, 100]
    assert got["p"].tolist() == [1.0, 0.25]
    assert got["log_min_p"][0] == -np.inf and got["log_min_p"][1] == np.float32(np.log(0.5))


def draw_one(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> int:
    x = np.asarray([logits], dtype=np.float32)
    return int(sample_rows(x, [0], [temperature], [top_k], [top_p], [min_p], [u])[0])


def support(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """The tokens drawn over a fine grid of u (one row, repeated)."""
    n = 2001
    x = np.asarray([logits], dtype=np.float32)
    tok = sample_rows(x, [0] * n, [temperature] * n, [top_k] * n, [top_p] * n, [min_p] * n,
                      np.linspace(1e-6, 1.0, n))
    return set(tok.tolist())


def test_filters_restrict_support():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert support(logits) == {0, 1, 2, 3}
    assert support(logits, min_p=0.35) == {0, 1}  # p >= 0.175
    assert support(logits, min_p=0.2) == {0, 1, 2}
    assert support(logits, top_k=2) == {0, 1}
    assert support(logits, top_p=0.6) == {0, 1}
    assert support(logits, top_p=0.5) in ({0}, {0, 1})  # the boundary mass 0.5: rounding decides
    assert support(logits, top_k=3, top_p=0.95) == {0, 1, 2}
    assert support(logits, top_k=1) == {0}
    assert support(logits, top_p=1e-9) == {0}


def test_ties_at_a_threshold_are_kept():
    flat = np.zeros(6)
    assert support(flat, top_k=2) == set(range(6))  # six equal values: the 2nd largest ties with all
    assert support(flat, top_p=0.1) == set(range(6))  # nothing above 0: G(0) = 0 < cut
    assert support([3.0, 1.0, 1.0, 1.0, -2.0], top_k=2) == {0, 1, 2, 3}
    # -0.0 and +0.0 are one value
    assert support([1.0, -0.0, 0.0, -5.0], top_k=2) == {0, 1, 2}


def test_top_p_is_over_the_top_k_distribution():
    logits = np.log([0.4, 0.3, 0.2, 0.1])
    # over the top 2 (0.4, 0.3 -> 0.571, 0.429): top_p 0.6 needs both; over all 4 token 0 alone reaches
    # 0.4 < 0.6 so both are kept either way, but top_p 0.5 separates them: 0.571 >= 0.5
    assert support(logits, top_k=2, top_p=0.5) == {0}
    assert support(logits, top_p=0.5) == {0, 1}


def test_draw_walks_token_order():
    logits = np.log([0.25, 0.25, 0.25, 0.25])
    assert [draw_one(logits, u) for u in (1e-9, 0.25, 0.2500001, 0.5, 0.74, 1.0)] == [0, 0, 1, 1, 2, 3]
    masked = [0.0, -np.inf, 0.0, -np.inf]
    assert [draw_one(masked, u) for u in (1e-9, 0.5, 0.51, 1.0)] == [0, 0, 2, 2]


def test_degenerate_rows_take_the_first_max():
    assert draw_one([-np.inf] * 5, 0.7, top_p=0.5) == 0
    with np.errstate(invalid="ignore"):
        assert draw_one([1.0, np.inf, 2.0, np.inf], 0.7, top_k=2) == 1


def test_temperature_divides_in_fp32():
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    a = [draw_one(logits, u, temperature=0.5) for u in np.linspace(0.01, 1, 50)]
    b = [draw_one(logits / np.float32(0.5), u) for u in np.linspace(0.01, 1, 50)]
    assert a == b and len(set(a)) > 1


def float64_reference(x, k, p, min_p, u) -> int:
    """The same filters in float64 math (probabilities, a stable sort), as the earlier sampler meant them."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x - x.max())
    thr = -np.inf
    if 0 < k < x.size:
        thr = x[order[k - 1]]
    if p < 1:
        top = probs[order[: k if 0 < k < x.size else x.size]]
        cum = np.cumsum(top) / top.sum()
        last = int(np.sum(cum - top / top.sum() < p)) - 1
        thr = max(thr, x[order[last]])
    if min_p > 0:
        thr = max(thr, x.max() + np.log(min_p))
    w = np.where(x >= thr, probs, 0.0)
    return int(np.searchsorted(np.cumsum(w) / w.sum(), u))


def test_agrees_with_float64_math_away_from_boundaries():
    rng = np.random.default_rng(3)
    agree = 0
    for _ in range(300):
        V = int(rng.integers(2, 400))
        x = (rng.standard_normal(V) * rng.uniform(0.5, 4)).astype(np.float32)
        k = int(rng.choice([0, 1, 5, 50]))
        p = float(rng.choice([1.0, 0.9, 0.5]))
        min_p = float(rng.choice([0.0, 0.05]))
        u = float(np.float32(rng.uniform(1e-6, 1)))
        agree += draw_one(x, u, top_k=k, top_p=p, min_p=min_p) == float64_reference(x, k, p, min_p, u)
    assert agree >= 297, agree  # only a u within rounding of a CDF step may differ


def test_seeded_draws_follow_the_distribution():
    rng = np.random.default_rng(0)
    x = np.repeat(np.log([[0.6, 0.3, 0.1]]).astype(np.float32), 6000, axis=0)
    u = (1.0 - rng.random(6000)).astype(np.float32)
    tok = sample_rows(x, np.arange(6000), [1.0] * 6000, [0] * 6000, [1.0] * 6000, [0.0] * 6000, u)
    assert abs(np.mean(tok == 0) - 0.6) < 0.03 and abs(np.mean(tok == 2) - 0.1) < 0.02


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        sample_rows(np.zeros(3, np.float32), [0], [1.0], [0], [1.0], [0.0], [0.5])


# ---- the kernel's radix select, modelled in numpy ----

LEVELS = ((21, 11), (10, 11), (0, 10))  # (shift, width) of the three digits of a key, high first


def keys(x):
    """Order-preserving u32 keys of fp32 values, -0.0 as +0.0 (cuda/sample.cu fkey)."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).copy()
    b[(b << np.uint32(1)) == 0] = 0
    neg = (b >> np.uint32(31)).astype(bool)
    return np.where(neg, ~b, b | np.uint32(0x80000000)).astype(np.uint32)


def key_value(k) -> np.float32:
    k = np.uint32(k)
    bits = k ^ np.uint32(0x80000000) if k & np.uint32(0x80000000) else ~k
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def histogram(kx, q, level, prefix):
    shift, width = LEVELS[level]
    under = np.ones(kx.shape, bool) if level == 0 else (kx >> np.uint32(shift + width)) == prefix
    b = ((kx[under] >> np.uint32(shift)) & np.uint32((1 << width) - 1)).astype(np.int64)
    return np.bincount(b, minlength=2048), np.bincount(b, weights=q[under].astype(np.float64), minlength=2048)


def descend(kx, q, pick):
    """Three levels: pick(count, mass, count above, mass above, count above + the level's count) -> the
    index of the bin (top bin first); counts and masses above include the levels before."""
    key, c_above, m_above = 0, 0, 0
    for level, (_, width) in enumerate(LEVELS):
        cnt, mass = histogram(kx, q, level, key)
        cnt, mass = cnt.astype(np.int64)[::-1], mass.astype(np.int64)[::-1]  # descending bins
        ac = np.cumsum(cnt) - cnt
        am = np.cumsum(mass) - mass
        j = pick(cnt, mass, c_above + ac, m_above + am, c_above + cnt.sum())
        b = 2047 - j
        key = (key << width) | b if level else b
        c_above += int(ac[j])
        m_above += int(am[j])
    return key, c_above, m_above


def radix_thresholds(x, k, p):
    """(t_k or None, t_p or None) of one row by the kernel's algorithm (padded to a multiple of 4)."""
    pad = (-x.size) % 4
    xp_ = np.concatenate([x, np.full(pad, -np.inf, np.float32)])
    m = xp_.max()
    q = fixed_weights(xp_ - m).astype(np.int64)
    kx = keys(xp_)
    t_k = t_p = None
    total = int(q.sum())
    if k < x.size:
        key, c_above, m_above = descend(kx, q, lambda cnt, mass, ac, am, n: int(
            np.nonzero((ac < k) & (ac + cnt >= k))[0][0]))
        t_k = key_value(key)
        total = m_above + (k - c_above) * int(fixed_weights(np.float32(t_k) - m))
    if p < 1:
        cut = float(np.float32(p)) * float(total)

        def pick_p(cnt, mass, ac, am, n):
            ok = (cnt > 0) & (am.astype(np.float64) < cut) & (
                ((am + mass).astype(np.float64) >= cut) | (ac + cnt == n))
            (hits,) = np.nonzero(ok)
            assert len(hits) == 1
            return int(hits[0])

        t_p = key_value(descend(kx, q, pick_p)[0])
    return t_k, t_p


def random_rows(rng, n):
    for i in range(n):
        V = int(rng.integers(1, 3000))
        kind = i % 4
        if kind == 0:
            x = rng.standard_normal(V) * 3
        elif kind == 1:  # heavy ties
            x = rng.integers(-3, 4, V).astype(np.float64)
        elif kind == 2:  # -inf holes and signed zeros
            x = rng.standard_normal(V)
            x[rng.random(V) < 0.3] = -np.inf
            x[rng.random(V) < 0.1] = 0.0
            x[rng.random(V) < 0.1] = -0.0
            x[rng.integers(V)] = 1.0
        else:  # one peak and a flat tail
            x = np.full(V, -30.0)
            x[rng.integers(V)] = 0.0
        yield x.astype(np.float32)


def test_radix_select_matches_the_sort():
    rng = np.random.default_rng(7)
    for x in random_rows(rng, 160):
        V = x.size
        k = int(rng.choice([1, 2, max(1, V // 3), max(1, V - 1)]))
        p = float(rng.choice([1e-6, 0.3, 0.9, 0.999]))
        t_k, t_p = radix_thresholds(x, k, p)
        m = x.max(keepdims=True)
        want = top_k_top_p_threshold(x[None], m, np.array([k]), np.array([p], np.float32))[0]
        if k < V:
            assert t_k == top_k_top_p_threshold(x[None], m, np.array([k]), np.array([1.0], np.float32))[0]
        got = max(v for v in (t_k, t_p) if v is not None) if k < V or p < 1 else None
        if got is not None:
            assert got == want, (V, k, p)
