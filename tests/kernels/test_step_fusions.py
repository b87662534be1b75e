"""The decode-step fusions (issue 16) on the CPU: the argmax spec, the gathered RMSNorm's twin, the launch
geometry of the argmax and of the RoPE / KV writer, and the switch that selects the unfused path. The kernels
themselves are checked against these twins in test_step_fusions_gpu.py (pytest -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.kernels.argmax import argmax_rows
from qserve_lite.kernels.cuda.argmax import MIN_PER_THREAD, THREADS, argmax_splits
from qserve_lite.kernels.cuda.kv_writer import NARROW_WARPS, writer_warps
from qserve_lite.kernels.fusions import ATTN_QUANT_ENV, FUSIONS_ENV, attention_quant_fusion, step_fusions
from qserve_lite.kernels.norm_quant import rms_norm, rms_norm_quant

INF, NAN = np.inf, np.nan


def test_argmax_spec():
    x = np.array([
        [1.0, 3.0, 3.0, -2.0],  # a tie: the lowest index
        [-INF, -INF, -INF, -INF],  # all -inf: the first
        [-1.0, -0.0, 0.0, -3.0],  # -0 == +0: the first zero
        [5.0, NAN, 7.0, NAN],  # NaN beats every number: the first NaN
        [-INF, -5.0, INF, INF],
    ], dtype=np.float32)
    got = argmax_rows(x)
    assert got.dtype == np.int32
    assert got.tolist() == [1, 0, 1, 1, 2]


def test_argmax_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        argmax_rows(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="at least one column"):
        argmax_rows(np.zeros((3, 0), np.float32))


@pytest.mark.parametrize("rows,n", [(256, 128256), (1, 128256), (7, 32000), (1, 5), (132, 4096), (3, 1001)])
def test_argmax_splits_cover_each_row_once(rows, n):
    splits, chunk = argmax_splits(rows, n, sms=132)
    assert chunk % 4 == 0 and splits >= 1
    assert (splits - 1) * chunk < n <= splits * chunk  # every column in exactly one slice, none empty
    if splits > 1:
        assert chunk >= THREADS * MIN_PER_THREAD - 4  # a split only when each thread keeps enough work
        assert rows * splits <= 132 + rows  # about one block per SM, not more


def test_argmax_splits_fill_the_gpu_for_one_row_and_not_for_many():
    assert argmax_splits(256, 128256, 132)[0] == 1
    assert argmax_splits(1, 128256, 132)[0] > 8


@pytest.mark.parametrize("tokens,heads,want", [
    (256, 48, 24),  # Llama-3-8B decode: 32 q + 8 k + 8 v heads, two per warp
    (256, 96, 32),  # MHA (Llama-2-7B): three per warp
    (256, 80, 27),  # Llama-2-70B: 64 + 8 + 8
    (1, 8, 8),  # a small model: one head per warp
    (8192, 48, NARROW_WARPS),  # prefill: enough blocks already
])
def test_writer_warps(tokens, heads, want):
    warps = writer_warps(tokens, heads, sms=132)
    assert warps == want
    assert warps <= 32
    turns = -(-heads // warps)
    assert turns == -(-heads // 32) or warps == NARROW_WARPS  # the fewest turns a 32-warp block allows


def test_writer_warps_unfused_is_the_old_block():
    assert writer_warps(256, 48, sms=132, wide=False) == NARROW_WARPS


def test_step_fusions_switch(monkeypatch):
    monkeypatch.delenv(FUSIONS_ENV, raising=False)
    assert step_fusions()
    monkeypatch.setenv(FUSIONS_ENV, "0")
    assert not step_fusions()
    monkeypatch.setenv(FUSIONS_ENV, "1")
    assert step_fusions()


@pytest.mark.parametrize("with_residual", [False, True])
def test_gathered_norm_is_the_norm_of_the_gathered_rows(with_residual):
    r = np.random.default_rng(0)
    table = (r.standard_normal((50, 64)) * 2).astype(np.float16)
    ids = np.array([3, 3, 49, 0, 17], dtype=np.int32)
    gamma = (1 + 0.1 * r.standard_normal(64)).astype(np.float16)
    residual = r.standard_normal((5, 64)).astype(np.float16) if with_residual else None
    qa, res = rms_norm_quant(table, gamma, 1e-5, residual, gather=ids)
    ref_qa, ref_res = rms_norm_quant(table[ids], gamma, 1e-5, residual)
    for a, b in zip((*qa, res), (*ref_qa, ref_res), strict=True):
        np.testing.assert_array_equal(a, b)
    y, res2 = rms_norm(table, gamma, 1e-5, residual, gather=ids)
    ref_y, _ = rms_norm(table[ids], gamma, 1e-5, residual)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(res2, ref_res)
    assert qa.q.shape == (5, 64) and not np.array_equal(qa.q[2], qa.q[3])


def test_attention_quant_fusion_is_opt_in(monkeypatch):
    """Off by default (not yet run on a GPU); on only with the step fusions on and the opt-in set."""
    monkeypatch.delenv(FUSIONS_ENV, raising=False)
    monkeypatch.delenv(ATTN_QUANT_ENV, raising=False)
    assert not attention_quant_fusion()
    monkeypatch.setenv(ATTN_QUANT_ENV, "1")
    assert attention_quant_fusion()
    monkeypatch.setenv(FUSIONS_ENV, "0")
    assert not attention_quant_fusion()
