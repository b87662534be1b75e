"""The Hopper prefill attention (cuda/attention_sm90.cu) stage by stage, then whole (pytest -m gpu; skipped
without a Hopper GPU).

Stages, one block each through the kernel's debug entries, so that a failure names the broken step:
1. S = Q K^T of the first key tile, raw fp32: TMA of Q and K (128-byte swizzle), the K-major shared-memory
   descriptors of both operands, the fp32 accumulator layout; with a cached prefix, the producer's
   dequantization of pages into the swizzled layout (positions past the cached length must read as zeros).
2. O = fp16(S) V of that tile: the accumulator -> A-fragment repacking of P and the N-major (transposed)
   V descriptor, with one 128-wide or two 64-wide products (`pv_split`).
Whole kernel: packed sequences of odd lengths, cached prefixes (KV4 / KV8 / fp16 pages), head_dim 64 and 128,
GQA, every ring depth, against the numpy twin within kernels/attention.py's tolerance, and the same inputs
through the mma.sync kernel (explicit `warps`) within the same tolerance of the twin.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cupy_or_skip
from test_attention_gpu import build, close, gpu_pool, poison_pool, prefill_case, split_qkv

from qserve_lite.kernels.attention import prefill_attention
from qserve_lite.kernels.cuda import attention_sm90
from qserve_lite.kernels.cuda.args import head_rows, int32_array
from qserve_lite.kernels.cuda.device import wgmma_available

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()
if not wgmma_available():
    pytest.skip("the wgmma prefill kernel needs a Hopper (sm_90) GPU", allow_module_level=True)

LOG2E = 1.4426950408889634


def debug_run(mode, q, k, v, cu, ctx, pool, bt, variant=None):
    """One block of the debug entry (one sequence, one head, one query tile): its fp32 output."""
    g_q, g_k, g_v = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    g_cu = int32_array(cp.asarray(cu), "cu")
    g_ctx = int32_array(cp.asarray(ctx), "ctx")
    g_pool = gpu_pool(pool) if pool is not None else None
    g_bt = int32_array(cp.asarray(bt), "bt") if bt is not None else None
    bits = pool.kv_bits if pool is not None else 16
    out = cp.empty(g_q.shape, dtype=cp.float16)
    res = attention_sm90.prefill_attention_sm90(
        g_q, g_k, g_v, head_rows(g_q, "q"), head_rows(g_k, "k"), head_rows(g_v, "v"), g_cu, g_ctx, g_pool, 0,
        g_bt, 0 if bt is None else bt.shape[1], bits, 0.1 * LOG2E, int(cu[1] - cu[0]), out,
        head_rows(out, "out"), variant=variant, debug=mode)
    return cp.asnumpy(res)


def first_tile(q, k, v, nq, cached, pool, bt):
    """(Q [128, D], K [128, D], V [128, D]) fp32 of the first key tile as the kernel sees them: the tensor's
    rows 0..127 (zeros past its end), keys from the pages (fp16-rounded dequantized values, zeros from the
    cached length on) when there is a cached prefix, else the fresh rows."""
    D = q.shape[2]
    Q = np.zeros((128, D), np.float32)
    n = min(128, q.shape[0])
    Q[:n] = q[:n, 0].astype(np.float32)
    K = np.zeros((128, D), np.float32)
    V = np.zeros((128, D), np.float32)
    if cached > 0:
        kc, vc = pool.gather(0, bt[0], cached)
        c = min(128, cached)
        K[:c] = kc[0, :c].astype(np.float16).astype(np.float32)
        V[:c] = vc[0, :c].astype(np.float16).astype(np.float32)
    else:
        n = min(128, k.shape[0])
        K[:n] = k[:n, 0].astype(np.float32)
        V[:n] = v[:n, 0].astype(np.float32)
    return Q, K, V


def debug_case(r, d, bits, nq, cached):
    q = r.standard_normal((nq, 1, d)).astype(np.float16)
    k = r.standard_normal((nq, 1, d)).astype(np.float16)
    v = r.standard_normal((nq, 1, d)).astype(np.float16)
    cu = np.array([0, nq], np.int32)
    ctx = np.array([nq + cached], np.int32)
    pool = bt = None
    if cached:
        pool, bt, _ = build(r, [cached], 1, d, bits)
    return q, k, v, cu, ctx, pool, bt


def check_stage(got, want, tol, what: str, index: str) -> None:
    assert np.isfinite(got).all(), f"{what}: {int((~np.isfinite(got)).sum())} non-finite (unwritten) entries"
    bad = np.abs(got - want) > tol
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what} wrong at {int(bad.sum())} of {bad.size} entries, first {index} {first}:"
                             " "
                             f"got {got[first]:.5g} want {want[first]:.5g}; got[:2, :8]\n{got[:2, :8]}\n"
                             f"want[:2, :8]\n{want[:2, :8]}")


# (head_dim, page bits, new tokens, cached tokens): fresh tiles (partial and full, rows past the tensor are
# zeros), and a cached first tile (partial: 100 of 128 positions; full: 300 cached).
DEBUG_CASES = [(128, 16, 100, 0), (64, 16, 128, 0), (128, 16, 5, 100), (128, 4, 5, 100), (64, 8, 7, 300),
               (128, 8, 3, 300), (64, 4, 9, 64)]


@pytest.mark.parametrize("d,bits,nq,cached", DEBUG_CASES)
def test_stage1_scores(d, bits, nq, cached):
    r = np.random.default_rng(1)
    q, k, v, cu, ctx, pool, bt = debug_case(r, d, bits, nq, cached)
    got = debug_run(attention_sm90.DEBUG_S, q, k, v, cu, ctx, pool, bt)
    Q, K, _ = first_tile(q, k, v, nq, cached, pool, bt)
    want = Q @ K.T
    tol = 1e-4 * (np.abs(Q) @ np.abs(K).T) + 1e-5
    check_stage(got, want, tol, "S = Q K^T", "(row, key)")


@pytest.mark.parametrize("pv_split", [False, True])
@pytest.mark.parametrize("d,bits,nq,cached", DEBUG_CASES)
def test_stage2_pv(d, bits, nq, cached, pv_split):
    r = np.random.default_rng(2)
    q, k, v, cu, ctx, pool, bt = debug_case(r, d, bits, nq, cached)
    got = debug_run(attention_sm90.DEBUG_PV, q, k, v, cu, ctx, pool, bt, {"pv_split": pv_split})
    Q, K, V = first_tile(q, k, v, nq, cached, pool, bt)
    P = (Q @ K.T).astype(np.float16).astype(np.float32)
    want = P @ V
    tol = 2.0**-10 * (np.abs(P) @ np.abs(V)) + 1e-4
    check_stage(got, want, tol, f"O = fp16(S) V (pv_split={pv_split})", "(row, channel)")


# ---- whole kernel ----

# (new tokens, cached tokens): odd lengths, tile edges, a long sequence, chunks over cached pages.
SEQS = [(1, 0), (127, 0), (128, 0), (129, 0), (777, 0), (37, 64), (100, 965), (5, 4092), (300, 129)]


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (32, 8)])
def test_prefill_sm90_varlen_with_cache(bits, d, heads):
    args, want, vmax = prefill_case(np.random.default_rng(), SEQS, heads, d, bits)
    for warps in (None, 4):  # None: the wgmma kernel (default route on Hopper); 4: the mma.sync kernel
        poison_pool()
        got = prefill_attention(*args, warps=warps)
        close(got, want, vmax, f"prefill bits={bits} d={d} heads={heads} warps={warps}")


@pytest.mark.parametrize("variant", [{"stages": 2}, {"stages": 3}, {"pv_split": True}])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_sm90_variants_long(d, variant):
    """A 4097-token causal sequence plus short ones, no pool, q/k/v as views of one fused qkv buffer, every
    ring depth / PV form the launcher can pick."""
    r = np.random.default_rng()
    h, kvh = 8, 2
    lens = [4097, 3, 130]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    qkv = r.standard_normal((T, (h + 2 * kvh) * d)).astype(np.float16)
    q, k, v = split_qkv(qkv, h, kvh, d)
    want = prefill_attention(q, k, v, cu)
    gq, gk, gv = split_qkv(cp.asarray(qkv), h, kvh, d)
    poison_pool()
    out = cp.empty((T, h, d), dtype=cp.float16)
    g_cu = int32_array(cp.asarray(cu), "cu")
    lds = head_rows(gq, "q"), head_rows(gk, "k"), head_rows(gv, "v")
    attention_sm90.prefill_attention_sm90(gq, gk, gv, *lds, g_cu, g_cu[1:] - g_cu[:-1], None, 0, None, 0, 16,
                                          LOG2E / np.sqrt(d), max(lens), out, head_rows(out, "out"),
                                          variant=variant)
    close(out, want, float(np.abs(v).max()), f"prefill sm90 long d={d} {variant}")
