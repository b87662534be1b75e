"""The paged-KV writer and attention kernels against their numpy twins (pytest -m gpu; skipped without a GPU).

Writer: rotated q / k and every byte of the page pool identical to the twin's (both pools start poisoned with
0xFF), except the sign of a zero point that is zero (a head whose minimum is a signed zero: numpy's min over
+0 / -0 picks either; both dequantize identically). Attention: |gpu - twin| <= 5e-3 * max|V| + 2^-10 |twin|
elementwise (kernels/attention.py states why), no NaN, every output written (outputs come from a memory pool
refilled with 0x7f bytes, fp16 NaN); unwritten page slots past each context hold 0xFF (NaN scales / values),
so a kernel that reads them unmasked fails.
Context lengths 1, 63, 64, 65, 1000, 4097 (and 16421 at batch 1, up to the most splits); head_dim 64 and
128; GQA ratios 1, 3, 4, 8 (and 16); KV4, KV8, fp16 pages; batches up to 64; split-K forced on and off;
decode replayed from a CUDA graph. Decode with the fused o_proj input (quant_out): the quantized output is
quantize_per_token of the kernel's own fp16 output bit for bit, and that output is the plain call's.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import cupy_or_skip

from qserve_lite.core.rope import rope_inv_freq
from qserve_lite.kernels.act_quant import quantize_per_token
from qserve_lite.kernels.attention import decode_attention, prefill_attention, rope_write_kv
from qserve_lite.kernels.cuda import attention as cuda_attention
from qserve_lite.kernels.paged_kv import PagedKVPool

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()

CONTEXTS = [1, 63, 64, 65, 1000, 4097]
GQA = [(4, 4), (6, 2), (8, 2), (16, 2)]  # (query heads, kv heads): ratios 1, 3, 4, 8
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def poison_pool(nbytes: int = 256 << 20) -> None:
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    block = cp.full(nbytes, 0x7F, dtype=cp.uint8)
    del block


def gpu_pool(np_pool: PagedKVPool) -> PagedKVPool:
    lay = np_pool.layout
    g = PagedKVPool(np_pool.num_layers, np_pool.num_pages, lay.num_kv_heads, lay.head_dim, lay.kv_bits, cp)
    g.pool[...] = cp.asarray(np_pool.pool)
    return g


def close(got_gpu, want, vmax: float, what: str) -> None:
    got = cp.asnumpy(got_gpu).astype(np.float32)
    want = np.asarray(want).astype(np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: {int((~np.isfinite(got)).sum())} non-finite outputs"
    err = np.abs(got - want)
    bound = 5e-3 * vmax + np.abs(want) * 2.0**-10
    bad = err > bound
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {got.size} outside tolerance, worst "
                           f"{float((err - bound).max()):.3g} over at {worst}"
                           f" (max err {float(err.max()):.3g}, vmax {vmax:.3g})")


def build(r, lens, kvh, d, bits, layers=1):
    """A numpy pool (poisoned 0xFF) holding random K/V for sequences of `lens` tokens on shuffled pages."""
    need = [-(-n // 64) for n in lens]
    pages = sum(need) + 3
    pool = PagedKVPool(layers, pages, kvh, d, bits, fill=0xFF)
    perm = r.permutation(pages)
    bt = -np.ones((len(lens), max(need) + 2), dtype=np.int32)
    slots, at = [], 0
    for i, n in enumerate(lens):
        bt[i, : need[i]] = perm[at : at + need[i]]
        at += need[i]
        p = np.arange(n)
        slots.append(bt[i, p // 64] * 64 + p % 64)
    total = sum(lens)
    # keys with per-channel outliers, values plain; a few constant heads (scale 1)
    k = (r.standard_normal((total, kvh, d)) * r.uniform(0.3, 4.0, d)).astype(np.float16)
    v = r.standard_normal((total, kvh, d)).astype(np.float16)
    k[r.integers(0, total, 2), 0] = 0.25
    q_dummy = np.zeros((total, 1, d), np.float16)
    for layer in range(layers):
        rope_write_kv(q_dummy, k, v, np.zeros(total), np.ones(d // 2), pool, layer, np.concatenate(slots),
                      rope=False)
    vmax = max(float(np.abs(pool.gather(0, bt[i], n)[1]).max()) for i, n in enumerate(lens))
    return pool, bt, vmax


# ---- writer ----

@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (32, 8)])
def test_rope_write_kv_bit_exact(bits, d, heads):
    check_writer(bits, d, heads, 300, rope=True, k_hadamard=False)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("T,heads,rope", [(1, (4, 4), True), (7, (6, 2), False), (301, (32, 8), True),
                                          (77, (6, 2), True)])
def test_rope_write_kv_hadamard_bit_exact(bits, d, T, heads, rope):
    """QS_KHAD: q and k rotated per head by the FWHT after RoPE (or alone, write-only mode), bit for bit the
    twin's (kernels/attention.head_hadamard), and K quantized from the rotated fp16 values; v untouched."""
    check_writer(bits, d, heads, T, rope=rope, k_hadamard=True)


def check_writer(bits, d, heads, T, rope, k_hadamard):
    r = np.random.default_rng()
    h, kvh = heads
    pages = -(-T // 64) + 4
    inv_freq = rope_inv_freq(SimpleNamespace(head_dim=d, rope_theta=500000.0, rope_scaling=LLAMA3))
    width = (h + 2 * kvh) * d
    qkv = (r.standard_normal((T, width + 8)) * r.uniform(0.1, 8.0, (T, 1))).astype(np.float16)
    qkv[5 % T, h * d : (h + 1) * d] = 1.5  # a constant k head
    qkv[6 % T] = 0.0
    qkv[T // 2, h * d + 3 : width : d] = 40.0  # outlier channels in every k and v head
    pos = r.integers(0, 131072, T).astype(np.int32)
    slots = r.permutation(pages * 64)[:T].astype(np.int32)
    slots[r.integers(0, T, 10 if T > 10 else 0)] = -1
    np_pool = PagedKVPool(2, pages, kvh, d, bits, fill=0xFF)
    g_pool = gpu_pool(np_pool)
    g_qkv = cp.asarray(qkv)

    def split(a):
        return (a[:, : h * d].reshape(-1, h, d), a[:, h * d : (h + kvh) * d].reshape(-1, kvh, d),
                a[:, (h + kvh) * d : width].reshape(-1, kvh, d))

    q, k, v = split(qkv)
    v_before = v.copy()
    rope_write_kv(q, k, v, pos, inv_freq, np_pool, 1, slots, rope=rope, k_hadamard=k_hadamard)
    assert (v.view(np.uint16) == v_before.view(np.uint16)).all()
    gq, gk, gv = split(g_qkv)
    assert gq.strides[0] == (width + 8) * 2 or T == 1  # a strided view, rotated in place
    rope_write_kv(gq, gk, gv, cp.asarray(pos), cp.asarray(inv_freq), g_pool, 1, cp.asarray(slots), rope=rope,
                  k_hadamard=k_hadamard)
    got = cp.asnumpy(g_qkv)
    parts = {"q": slice(0, h * d), "k": slice(h * d, (h + kvh) * d),
             "v and the row padding": slice((h + kvh) * d, None)}
    for name, cols in parts.items():
        diff = got[:, cols].view(np.uint16) != qkv[:, cols].view(np.uint16)
        assert not diff.any(), f"{name}: {int(diff.sum())} values differ, first at {np.argwhere(diff)[0]}"
    got_pool = PagedKVPool(2, pages, kvh, d, bits)
    got_pool.pool[...] = cp.asnumpy(g_pool.pool)
    for layer in (0, 1):
        for which in (0, 1):
            for name, a, b in zip(("data", "scales", "zeros"), got_pool.views(layer, which),
                                  np_pool.views(layer, which), strict=True):
                if a is None:
                    continue
                diff = a.view(np.uint8) != b.view(np.uint8)
                if name == "zeros":  # a zero point of +-0 (the head's minimum is a signed zero): either sign
                    diff = (a != b) & ~(np.isnan(a) & np.isnan(b))
                assert not diff.any(), (f"layer {layer} {'KV'[which]} {name}: {int(diff.sum())} differ, "
                                        f"first at {np.argwhere(diff)[0]}")


# ---- decode ----

@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", GQA)
def test_decode_contexts(bits, d, heads):
    r = np.random.default_rng()
    h, kvh = heads
    np_pool, bt, vmax = build(r, CONTEXTS, kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q = (r.standard_normal((len(CONTEXTS), h, d)) * 1.5).astype(np.float16)
    ctx = np.array(CONTEXTS, dtype=np.int32)
    want = decode_attention(q, np_pool, 0, bt, ctx)
    for splits in (None, 1):
        poison_pool()
        got = decode_attention(cp.asarray(q), g_pool, 0, cp.asarray(bt), cp.asarray(ctx), splits=splits)
        close(got, want, vmax, f"decode bits={bits} d={d} heads={heads} splits={splits}")


@pytest.mark.parametrize("bits,d,heads", [(4, 128, (32, 8)), (8, 64, (16, 2)), (16, 128, (12, 4)),
                                          (4, 64, (16, 1))])
def test_decode_batch_64(bits, d, heads):
    r = np.random.default_rng()
    h, kvh = heads
    lens = list(r.integers(1, 1500, 64))
    lens[:6] = CONTEXTS
    np_pool, bt, vmax = build(r, lens, kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q = (r.standard_normal((64, h, d)) * 2.0).astype(np.float16)
    ctx = np.array(lens, dtype=np.int32)
    want = decode_attention(q, np_pool, 0, bt, ctx)
    for splits in (None, 1, 7):
        poison_pool()
        got = decode_attention(cp.asarray(q), g_pool, 0, cp.asarray(bt), cp.asarray(ctx), splits=splits)
        close(got, want, vmax, f"decode batch 64 bits={bits} splits={splits}")
    # q as a strided view of a fused qkv buffer, output into a strided view
    qkv = cp.zeros((64, (h + 2 * kvh) * d), dtype=cp.float16)
    qkv[:, : h * d] = cp.asarray(q.reshape(64, h * d))
    out = cp.full((64, (h + 1) * d), cp.nan, dtype=cp.float16)
    decode_attention(qkv[:, : h * d].reshape(64, h, d), g_pool, 0, cp.asarray(bt), cp.asarray(ctx),
                     out=out[:, d:].reshape(64, h, d))
    close(out[:, d:].reshape(64, h, d), want, vmax, "decode strided")


@pytest.mark.parametrize("bits,d,heads", [(4, 128, (32, 8)), (4, 128, (64, 8)), (4, 64, (8, 8)),
                                          (8, 128, (32, 8)), (16, 64, (16, 2))])
def test_decode_batch1_long_context(bits, d, heads):
    """Batch 1 with a long context (not a multiple of the page) splits over the whole GPU: the heuristic's
    split count, the most splits (the combine of 129 partials of 128 tokens), and 3 long splits."""
    r = np.random.default_rng()
    h, kvh = heads
    n = 16384 + 37
    np_pool, bt, vmax = build(r, [n], kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q = (r.standard_normal((1, h, d)) * 1.5).astype(np.float16)
    ctx = np.array([n], dtype=np.int32)
    want = decode_attention(q, np_pool, 0, bt, ctx)
    base, _ = cuda_attention.decode_geometry(1, h, kvh, bt.shape[1] * 64)
    assert base > 1, base  # batch 1 spreads over the SMs
    for splits in (None, cuda_attention.MAX_SPLITS, 3):
        poison_pool()
        got = decode_attention(cp.asarray(q), g_pool, 0, cp.asarray(bt), cp.asarray(ctx), splits=splits)
        close(got, want, vmax, f"decode batch 1 ctx {n} bits={bits} d={d} heads={heads} splits={splits}")


@pytest.mark.parametrize("bits,d", [(4, 128), (4, 64), (8, 128)])
@pytest.mark.parametrize("variant", [{"sub": 1}, {"sub": 2}, {"sub": 4}, {"warps": 8}])
def test_decode_variants(bits, d, variant):
    """The tuning alternatives of the decode kernel (subtiles per tile, warps per block) compute the same."""
    r = np.random.default_rng()
    h, kvh = 24, 8
    lens = CONTEXTS + [int(x) for x in r.integers(1, 3000, 10)]
    np_pool, bt, vmax = build(r, lens, kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q = (r.standard_normal((len(lens), h, d)) * 1.5).astype(np.float16)
    ctx = np.array(lens, dtype=np.int32)
    want = decode_attention(q, np_pool, 0, bt, ctx)
    for splits in (None, 1, 5):
        poison_pool()
        got = cuda_attention.decode_attention(cp.asarray(q), g_pool, 0, cp.asarray(bt), cp.asarray(ctx),
                                              1 / np.sqrt(d), None, splits, None, None, variant=variant)
        close(got, want, vmax, f"decode variant {variant} bits={bits} d={d} splits={splits}")


# issue-16 alternatives: persistent one-split blocks (large batches), deeper rings with fewer, longer splits
# and the faster last-split combine (batch 1)
PERSIST_VARIANTS = [{"persist": 1}, {"persist": 1, "warps": 8}, {"persist": 1, "stages": 4}]
SPLIT_VARIANTS = [{"combine": 1}, {"stages": 6, "combine": 1}, {"stages": 8, "combine": 1}]


@pytest.mark.parametrize("variant", PERSIST_VARIANTS)
@pytest.mark.parametrize("bits,d,heads", [(4, 128, (32, 8)), (4, 64, (4, 4)), (8, 128, (16, 2)),
                                          (16, 64, (32, 4))])
def test_decode_persist_variants(variant, bits, d, heads):
    """Persistent one-split blocks: more (sequence, kv head) items than resident blocks (each block loops,
    its rings crossing items of different lengths, some with no tile for some warps), a zero context, GQA
    1 / 4 / 8; with splits (None: the heuristic's split-K, where "persist" does not apply) unchanged."""
    r = np.random.default_rng()
    h, kvh = heads
    B = 640 // kvh + 3  # > 4 resident blocks x 132 SMs of items
    lens = CONTEXTS + [int(x) for x in r.integers(1, 400, B - len(CONTEXTS))]
    np_pool, bt, vmax = build(r, lens, kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q = (r.standard_normal((B, h, d)) * 1.5).astype(np.float16)
    ctx = np.array(lens, dtype=np.int32)
    ctx[7] = 0
    want = decode_attention(q, np_pool, 0, bt, ctx)
    for splits in (1, None):
        poison_pool()
        got = cuda_attention.decode_attention(cp.asarray(q), g_pool, 0, cp.asarray(bt), cp.asarray(ctx),
                                              1 / np.sqrt(d), None, splits, None, None, variant=variant)
        close(got, want, vmax, f"decode variant {variant} bits={bits} d={d} heads={heads} splits={splits}")


@pytest.mark.parametrize("variant", SPLIT_VARIANTS)
@pytest.mark.parametrize("bits,d,heads", [(4, 128, (32, 8)), (8, 64, (16, 2))])
def test_decode_split_variants_batch1(variant, bits, d, heads):
    """Batch 1 with a long context (not a multiple of the page): the variant's own split count (from its
    resident blocks), the most splits, and 3; plus a small batch of odd contexts with 5 splits."""
    r = np.random.default_rng()
    h, kvh = heads
    lens = [16384 + 37, *CONTEXTS]
    np_pool, bt, vmax = build(r, lens, kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q = (r.standard_normal((len(lens), h, d)) * 1.5).astype(np.float16)
    ctx = np.array(lens, dtype=np.int32)
    want = decode_attention(q, np_pool, 0, bt, ctx)
    for rows, splits in ((slice(0, 1), None), (slice(0, 1), cuda_attention.MAX_SPLITS), (slice(0, 1), 3),
                         (slice(1, None), 5)):
        poison_pool()
        got = cuda_attention.decode_attention(cp.asarray(q[rows]), g_pool, 0, cp.asarray(bt[rows]),
                                              cp.asarray(ctx[rows]), 1 / np.sqrt(d), None, splits, None, None,
                                              variant=variant)
        close(got, want[rows], vmax, f"decode variant {variant} bits={bits} d={d} splits={splits}")


@pytest.mark.parametrize("variant", [None, {"persist": 1}, {"stages": 6, "combine": 1}])
def test_decode_cuda_graph(variant):
    """Capture once, then replay with new queries and longer contexts written into the same buffers; the
    split-K counters are back at zero after every call."""
    r = np.random.default_rng()
    h, kvh, d, bits, B = 32, 8, 128, 4, 8
    lens = [int(x) for x in r.integers(1, 3000, B)]
    np_pool, bt, vmax = build(r, [n + 40 for n in lens], kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q1 = r.standard_normal((B, h, d)).astype(np.float16)
    q2 = r.standard_normal((B, h, d)).astype(np.float16)
    g_q, g_bt = cp.asarray(q1), cp.asarray(bt)
    g_ctx = cp.asarray(np.array(lens, dtype=np.int32))
    max_ctx = bt.shape[1] * 64
    splits, _ = cuda_attention.decode_geometry(B, h, kvh, max_ctx)
    assert splits > 1
    if variant and variant.get("persist"):
        splits = 1
    out = cp.empty((B, h, d), dtype=cp.float16)
    ws = cuda_attention.decode_workspace(B, h, d, splits)
    new_lens = np.array(lens, dtype=np.int32) + 40

    def call():
        cuda_attention.decode_attention(g_q, g_pool, 0, g_bt, g_ctx, 1 / np.sqrt(d), max_ctx, splits, out, ws,
                                        variant=variant)

    def new_inputs():
        g_q[...] = cp.asarray(q2)
        g_ctx[...] = cp.asarray(new_lens)
        out[...] = cp.nan

    replay_in_graph(call, new_inputs, ws[1], 1)
    close(out, decode_attention(q2, np_pool, 0, bt, new_lens), vmax, f"decode graph replay {variant}")


def replay_in_graph(call, new_inputs, counters, replays: int) -> None:
    """call() eagerly, then captured in a CUDA graph; new_inputs(), then the graph replayed `replays` times;
    the counters are zero after the eager call and after the replays."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        call()
        stream.synchronize()
        assert not counters.any(), "counters left nonzero"
        stream.begin_capture()
        try:
            call()
        finally:
            graph = stream.end_capture()
        new_inputs()
        for _ in range(replays):
            graph.launch(stream)
        stream.synchronize()
        assert not counters.any(), "counters left nonzero after the replays"


# ---- decode with the fused o_proj input (quant_out) ----

def same_bits(got_gpu, want, what: str) -> None:
    got = cp.asnumpy(got_gpu) if isinstance(got_gpu, cp.ndarray) else np.asarray(got_gpu)
    want = cp.asnumpy(want) if isinstance(want, cp.ndarray) else np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.shape,
                                                                 want.dtype)
    bad = got.view(np.uint8) != want.view(np.uint8) if got.dtype.itemsize == 1 else \
        got.view(f"u{got.dtype.itemsize}") != want.view(f"u{want.dtype.itemsize}")
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} differ, first at {np.argwhere(bad)[0]}"


def quant_buffers(B: int, K: int, with_sums: bool):
    """Poisoned (codes, scales, sums or None) for quant_out."""
    return (cp.full((B, K), 0x7F, dtype=cp.int8), cp.full((B,), cp.nan, dtype=cp.float16),
            cp.full((B,), cp.nan, dtype=cp.float32) if with_sums else None)


def check_fused_quant(q, np_pool, bt, ctx, vmax, splits, with_sums, what, variant=None, out_pad=0):
    """decode_attention with quant_out: its fp16 output equals the plain call's (default variant) and is close
    to the twin; codes / scales / sums equal quantize_per_token of that output bit for bit (the GPU row kernel
    and the numpy spec alike); the counters are back at zero."""
    B, h, d = q.shape
    kvh = np_pool.layout.num_kv_heads
    g_pool, g_q, g_bt, g_ctx = gpu_pool(np_pool), cp.asarray(q), cp.asarray(bt), cp.asarray(ctx)
    nsplit, _ = cuda_attention.decode_geometry(B, h, kvh, bt.shape[1] * 64, splits)
    ws = cuda_attention.decode_workspace(B, h, d, nsplit)
    poison_pool()
    wide = cp.full((B, h * d + out_pad), cp.nan, dtype=cp.float16)  # out_pad: a strided output
    out = wide[:, out_pad:].reshape(B, h, d)
    quant = quant_buffers(B, h * d, with_sums)
    got = cuda_attention.decode_attention(g_q, g_pool, 0, g_bt, g_ctx, 1 / np.sqrt(d), None, splits, out, ws,
                                          variant=variant, quant_out=quant)
    assert got is out
    assert not ws[1].any(), f"{what}: counters left nonzero"
    close(out, decode_attention(q, np_pool, 0, bt, ctx), vmax, what)
    if variant is None:
        plain = decode_attention(g_q, g_pool, 0, g_bt, g_ctx, splits=splits)
        same_bits(out, plain, f"{what}: fp16 output, fused vs plain")
    flat = out.reshape(B, h * d)
    for name, want in (("GPU row kernel", quantize_per_token(flat, cp, with_sums)),
                       ("numpy spec", quantize_per_token(cp.asnumpy(flat), np, with_sums))):
        same_bits(quant[0], want.q, f"{what}: codes vs {name}")
        same_bits(quant[1], want.scales, f"{what}: scales vs {name}")
        if with_sums:
            same_bits(quant[2], want.sums, f"{what}: sums vs {name}")


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (16, 4), (16, 2), (32, 8)])  # GQA 1, 4, 8, 4
def test_decode_quant_out_batch37(bits, d, heads):
    """Batch 37 of odd contexts (one of them 0, one 1) with the heuristic's splits, one split and 5; per-token
    sums on (W4 per-channel) and off; a strided output once."""
    r = np.random.default_rng()
    h, kvh = heads
    lens = CONTEXTS + [int(x) for x in r.integers(1, 3000, 37 - len(CONTEXTS))]
    np_pool, bt, vmax = build(r, lens, kvh, d, bits)
    q = (r.standard_normal((37, h, d)) * 1.5).astype(np.float16)
    ctx = np.array(lens, dtype=np.int32)
    ctx[9] = 0
    for splits, with_sums, pad in ((None, True, 0), (1, False, 0), (5, True, 8)):
        check_fused_quant(q, np_pool, bt, ctx, vmax, splits, with_sums,
                          f"quant_out bits={bits} d={d} heads={heads} splits={splits} pad={pad}", out_pad=pad)


@pytest.mark.parametrize("bits,d,heads", [(4, 128, (32, 8)), (8, 64, (8, 8)), (16, 128, (16, 2)),
                                          (4, 64, (64, 8))])
def test_decode_quant_out_batch1_many_splits(bits, d, heads):
    """Batch 1, a long context: the heuristic's splits and the most splits (the token's head blocks all come
    out of last-split combines), with and without sums."""
    r = np.random.default_rng()
    h, kvh = heads
    n = 16384 + 37
    np_pool, bt, vmax = build(r, [n], kvh, d, bits)
    q = (r.standard_normal((1, h, d)) * 1.5).astype(np.float16)
    ctx = np.array([n], dtype=np.int32)
    for splits, with_sums in ((None, True), (cuda_attention.MAX_SPLITS, False)):
        check_fused_quant(q, np_pool, bt, ctx, vmax, splits, with_sums,
                          f"quant_out batch 1 bits={bits} d={d} heads={heads} splits={splits}")


@pytest.mark.parametrize("variant", [{"stages": 6, "combine": 1}, {"persist": 1}, {"sub": 4}, {"warps": 8}])
def test_decode_quant_out_variants(variant):
    """The tuning alternatives with quant_out ("persist" falls back to the split kernel)."""
    r = np.random.default_rng()
    h, kvh, d, bits = 24, 8, 128, 4
    lens = CONTEXTS + [int(x) for x in r.integers(1, 3000, 10)]
    np_pool, bt, vmax = build(r, lens, kvh, d, bits)
    q = (r.standard_normal((len(lens), h, d)) * 1.5).astype(np.float16)
    ctx = np.array(lens, dtype=np.int32)
    for splits in (None, 1, 5):
        check_fused_quant(q, np_pool, bt, ctx, vmax, splits, True, f"quant_out {variant} splits={splits}",
                          variant=variant)


@pytest.mark.parametrize("batch", [8, 300])
def test_decode_quant_out_cuda_graph(batch):
    """Captured once, replayed with new queries and longer contexts: the quantized output follows the new
    fp16 output bit for bit and the counters are back at zero (batch 8: split-K; 300: one split)."""
    r = np.random.default_rng()
    h, kvh, d, bits, B = 32, 8, 128, 4, batch
    lens = [int(x) for x in r.integers(1, 1500, B)]
    np_pool, bt, vmax = build(r, [n + 40 for n in lens], kvh, d, bits)
    g_pool = gpu_pool(np_pool)
    q2 = r.standard_normal((B, h, d)).astype(np.float16)
    g_q, g_bt = cp.asarray(r.standard_normal((B, h, d)).astype(np.float16)), cp.asarray(bt)
    g_ctx = cp.asarray(np.array(lens, dtype=np.int32))
    max_ctx = bt.shape[1] * 64
    splits, _ = cuda_attention.decode_geometry(B, h, kvh, max_ctx)
    assert (splits > 1) == (B == 8)
    out = cp.empty((B, h, d), dtype=cp.float16)
    ws = cuda_attention.decode_workspace(B, h, d, splits)
    quant = quant_buffers(B, h * d, True)
    new_lens = np.array(lens, dtype=np.int32) + 40

    def call():
        cuda_attention.decode_attention(g_q, g_pool, 0, g_bt, g_ctx, 1 / np.sqrt(d), max_ctx, splits, out, ws,
                                        quant_out=quant)

    def new_inputs():
        g_q[...] = cp.asarray(q2)
        g_ctx[...] = cp.asarray(new_lens)
        out[...] = cp.nan
        for a in quant:
            a[...] = 0x7F if a.dtype == cp.int8 else cp.nan

    replay_in_graph(call, new_inputs, ws[1], 2)
    close(out, decode_attention(q2, np_pool, 0, bt, new_lens), vmax, "quant_out graph replay")
    want = quantize_per_token(out.reshape(B, h * d), cp, True)
    for name, got, ref in zip(("codes", "scales", "sums"), quant, want, strict=True):
        same_bits(got, ref, f"quant_out graph replay {name}")


# ---- prefill ----

# (new tokens, cached tokens before them): contexts 1, 63, 64, 65, 1000 fresh; chunks over cached pages
# ending at 101, 1065 and 4097 tokens.
PREFILL_SEQS = [(1, 0), (63, 0), (64, 0), (65, 0), (1000, 0), (37, 64), (100, 965), (5, 4092)]


def prefill_case(r, seqs, heads, d, bits):
    """Packed sequences of (new, cached) tokens over a poisoned pool: (GPU arguments of prefill_attention up
    to block_tables, the twin's output, vmax)."""
    h, kvh = heads
    ctx = [n + c for n, c in seqs]
    np_pool, bt, vmax = build(r, ctx, kvh, d, bits)
    new = np.array([n for n, _ in seqs])
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    T = int(cu[-1])
    q = (r.standard_normal((T, h, d)) * 1.5).astype(np.float16)
    k = (r.standard_normal((T, kvh, d)) * r.uniform(0.3, 4.0, d)).astype(np.float16)
    v = r.standard_normal((T, kvh, d)).astype(np.float16)
    vmax = max(vmax, float(np.abs(v).max()))
    ctx = np.array(ctx, dtype=np.int32)
    want = prefill_attention(q, k, v, cu, ctx, np_pool, 0, bt)
    args = (cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(cu), cp.asarray(ctx), gpu_pool(np_pool),
            0, cp.asarray(bt))
    return args, want, vmax


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", GQA)
def test_prefill_varlen_with_cache(bits, d, heads):
    args, want, vmax = prefill_case(np.random.default_rng(), PREFILL_SEQS, heads, d, bits)
    for warps in ((4, 8) if (bits, d, heads) == (16, 128, (8, 2)) else (None,)):
        poison_pool()
        got = prefill_attention(*args, warps=warps)
        close(got, want, vmax, f"prefill bits={bits} d={d} heads={heads} warps={warps}")


def split_qkv(qkv, h, kvh, d):
    """q, k, v [T, heads, d] views of a fused [T, (h + 2 kvh) d] buffer (numpy or cupy)."""
    T = qkv.shape[0]
    return (qkv[:, : h * d].reshape(T, h, d), qkv[:, h * d : (h + kvh) * d].reshape(T, kvh, d),
            qkv[:, (h + kvh) * d :].reshape(T, kvh, d))


@pytest.mark.parametrize("d", [64, 128])
def test_prefill_no_cache_long(d):
    """One 4097-token causal sequence plus a short one, no pool (pure fresh K/V), qkv views."""
    r = np.random.default_rng()
    h, kvh = 8, 2
    lens = [4097, 3]
    cu = np.array([0, 4097, 4100], dtype=np.int32)
    qkv = r.standard_normal((4100, (h + 2 * kvh) * d)).astype(np.float16)
    q, k, v = split_qkv(qkv, h, kvh, d)
    want = prefill_attention(q, k, v, cu)
    poison_pool()
    got = prefill_attention(*split_qkv(cp.asarray(qkv), h, kvh, d), cp.asarray(cu), max_seqlen_q=max(lens))
    close(got, want, float(np.abs(v).max()), f"prefill long d={d}")
