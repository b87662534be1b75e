"""The GPU page layout's numpy twin (kernels/paged_kv.py) and the attention twins (kernels/attention.py), on
the CPU."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from qserve_lite.core.kv_layout import KVPageLayout
from qserve_lite.core.rope import apply_rope, rope_cos_sin, rope_inv_freq
from qserve_lite.kernels.attention import decode_attention, prefill_attention, rope_write_kv
from qserve_lite.kernels.paged_kv import PagedKVPool, pack_codes, unpack_codes
from qserve_lite.model.llama import causal_attention
from qserve_lite.model.paged_kv_cache import PagedKVCache


def cfg(kvh=2, d=64, layers=1):
    return SimpleNamespace(num_layers=layers, num_kv_heads=kvh, head_dim=d)


def test_page_bytes_match_qserve():
    assert KVPageLayout(4, 8, 128).page_bytes == 34816  # Llama-3-8B KV4 K page (QServe's figure)
    assert KVPageLayout(8, 8, 128).page_bytes == 8 * 64 * 128 + 8 * 64 * 4
    assert KVPageLayout(16, 8, 128).page_bytes == 8 * 64 * 128 * 2
    assert KVPageLayout(4, 8, 128).kv_bytes_per_token() == 2 * (64 + 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_roundtrip(bits):
    r = np.random.default_rng()
    codes = r.integers(0, 2**bits, (3, 5, 64), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    if bits == 4:
        assert (packed[..., 0] == (codes[..., 0] | (codes[..., 1] << 4))).all()  # even channel low
    assert (unpack_codes(packed, bits) == codes).all()


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
def test_writer_twin_matches_paged_kv_cache(bits, d):
    """rope_write_kv (rope off) stores what PagedKVCache.write stores, in the GPU byte layout."""
    r = np.random.default_rng()
    kvh, pages, T = 3, 7, 150
    c = cfg(kvh, d)
    cache = PagedKVCache(c, pages, kv_bits=bits, dtype=np.float16)
    pool = PagedKVPool(1, pages, kvh, d, bits, fill=0)
    slots = r.permutation(pages * 64)[:T]
    k = (r.standard_normal((T, kvh, d)) * 2).astype(np.float16)
    v = r.standard_normal((T, kvh, d)).astype(np.float16)
    k[3] = 0.5  # a constant head: scale 1
    q = np.zeros((T, 1, d), dtype=np.float16)
    cache.write(0, k, v, slots)
    rope_write_kv(q, k.copy(), v, np.arange(T), np.ones(d // 2), pool, 0, slots, rope=False)
    page, off = slots // 64, slots % 64
    for which in (0, 1):
        got = pool.values(0, which)
        if bits == 16:
            want = (cache.k_pages, cache.v_pages)[which][0]
            assert (got[0][page, :, off] == want[page, :, off]).all()
            continue
        for g, w in zip(got, ((cache.k_codes, cache.k_scales, cache.k_zeros),
                             (cache.v_codes, cache.v_scales, cache.v_zeros))[which], strict=True):
            assert (g[page, :, off] == w[0][page, :, off]).all()
    # load_from copies the whole cache; gather dequantizes like PagedKVCache.gather
    pool2 = PagedKVPool(1, pages, kvh, d, bits, fill=0)
    pool2.load_from(cache)
    bt = r.permutation(pages)
    kg, vg = pool2.gather(0, bt, 200)
    kw, vw = cache.gather(0, bt[None], 200)
    np.testing.assert_array_equal(kg.astype(np.float16), kw[0])  # the cache rounds to its dtype (fp16)
    np.testing.assert_array_equal(vg.astype(np.float16), vw[0])


def test_writer_rotates_like_the_model():
    r = np.random.default_rng()
    d, T = 128, 40
    model_cfg = SimpleNamespace(head_dim=d, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    inv_freq = rope_inv_freq(model_cfg)
    pos = r.integers(0, 100000, T)
    q = r.standard_normal((T, 4, d)).astype(np.float16)
    k = r.standard_normal((T, 2, d)).astype(np.float16)
    v = r.standard_normal((T, 2, d)).astype(np.float16)
    q0, k0 = q.copy(), k.copy()
    pool = PagedKVPool(1, 1, 2, d, 4, fill=0)
    rope_write_kv(q, k, v, pos, inv_freq, pool, 0, -np.ones(T, dtype=np.int32))
    cos, sin = rope_cos_sin(pos, inv_freq, np, np.float32)
    np.testing.assert_array_equal(q, apply_rope(q0, cos, sin))
    np.testing.assert_array_equal(k, apply_rope(k0, cos, sin))
    assert not pool.pool.any()  # slot -1: nothing stored


def _pool_with(r, lens, kvh, d, bits, pages_extra=2):
    need = [-(-n // 64) for n in lens]
    pages = sum(need) + pages_extra
    pool = PagedKVPool(1, pages, kvh, d, bits, fill=0xFF)  # unwritten slots: NaN scales / values
    perm = r.permutation(pages)
    bt = -np.ones((len(lens), max(need) + 1), dtype=np.int32)
    slots, kk, vv, at = [], [], [], 0
    for i, n in enumerate(lens):
        bt[i, : need[i]] = perm[at : at + need[i]]
        at += need[i]
        p = np.arange(n)
        slots.append(bt[i, p // 64] * 64 + p % 64)
        kk.append((r.standard_normal((n, kvh, d)) * r.uniform(0.5, 3, d)).astype(np.float16))
        vv.append(r.standard_normal((n, kvh, d)).astype(np.float16))
    k, v = np.concatenate(kk), np.concatenate(vv)
    rope_write_kv(np.zeros((len(k), 1, d), np.float16), k, v, np.zeros(len(k)), np.ones(d // 2), pool, 0,
                  np.concatenate(slots), rope=False)
    return pool, bt, k, v


@pytest.mark.parametrize("bits", [4, 16])
def test_decode_twin_matches_model_attention(bits):
    r = np.random.default_rng()
    lens, kvh, h, d = [1, 63, 64, 65, 300], 2, 6, 64
    pool, bt, _, _ = _pool_with(r, lens, kvh, d, bits)
    q = r.standard_normal((len(lens), h, d)).astype(np.float16)
    out = decode_attention(q, pool, 0, bt, np.array(lens))
    for b, n in enumerate(lens):
        k, v = pool.gather(0, bt[b], n)
        want = causal_attention(q[b][None, None].astype(np.float32), k[None], v[None], n - 1, np)
        np.testing.assert_allclose(out[b].astype(np.float32), want.reshape(h, d), atol=2e-3, rtol=2e-3)


def test_prefill_twin_with_cached_pages_equals_one_pass():
    """A chunk attending to fp16 pages of its earlier tokens + its fresh K/V = one pass over everything."""
    r = np.random.default_rng()
    kvh, h, d = 2, 4, 64
    lens = [70, 130]
    pool, bt, k, v = _pool_with(r, lens, kvh, d, 16)
    q = r.standard_normal((sum(lens), h, d)).astype(np.float16)
    cu = np.array([0, 70, 200])
    full = prefill_attention(q, k, v, cu)
    new = [5, 64]  # the last tokens of each sequence as the chunk
    rows = np.concatenate([np.arange(cu[i + 1] - n, cu[i + 1]) for i, n in enumerate(new)])
    part = prefill_attention(q[rows], k[rows], v[rows], np.array([0, 5, 69]), np.array(lens), pool, 0, bt)
    np.testing.assert_allclose(part.astype(np.float32), full[rows].astype(np.float32), atol=1e-3)
    k0, v0 = (x[None, :70].transpose(0, 2, 1, 3).astype(np.float32) for x in (k, v))
    want = causal_attention(q[None, :70].astype(np.float32), k0, v0, 0, np)
    np.testing.assert_allclose(full[:70].astype(np.float32).reshape(70, h * d), want[0], atol=2e-3)
    assert math.isfinite(float(np.abs(full.astype(np.float32)).max()))
