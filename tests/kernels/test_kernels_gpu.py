"""Every CUDA kernel against its numpy twin on fresh random data (pytest -m gpu; skipped without a GPU).

Integer parts (codes, accumulators) must be identical, fp16 outputs equal bit for bit where the twin says
so (W4A8, W8A8, quantizers, RMSNorm), within one fp16 ulp where it documents a tolerance (SiLU's expf), and
within fp32 accumulation error for the fp16 GEMM. Outputs are poisoned before each run: the memory pool is
refilled with 0x7f bytes, so an element a kernel forgets to write reads as NaN / 127 and fails the check.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cupy_or_skip

from qserve_lite.core.pack import pack_w4, to_qserve_group_params
from qserve_lite.kernels.act_quant import quantize_per_token, silu_mul, silu_mul_quant
from qserve_lite.kernels.cuda.device import sm90a_active, wgmma_available
from qserve_lite.kernels.cuda.gemm import NAMED_CONFIGS, gemm
from qserve_lite.kernels.cuda.gemm_skinny import SkinnyConfig
from qserve_lite.kernels.cuda.gemm_sm90 import SM90_CONFIGS
from qserve_lite.kernels.cuda.workspace import pin_workspaces, release_workspaces
from qserve_lite.kernels.fp16_gemm import fp16_gemm
from qserve_lite.kernels.norm_quant import rms_norm, rms_norm_quant
from qserve_lite.kernels.w4a8_gemm import w4_to_int8, w4a8_group_gemm_packed, w4a8_per_channel_gemm_packed
from qserve_lite.kernels.w8a8_gemm import w8a8_gemm

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()

MS = [1, 7, 64, 300, 2048]


def rng() -> np.random.Generator:
    return np.random.default_rng()


def poison_pool(nbytes: int = 256 << 20) -> None:
    """Fill the pool's free memory with 0x7f so fresh cupy.empty outputs start as garbage (fp16 NaN)."""
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    block = cp.full(nbytes, 0x7F, dtype=cp.uint8)
    del block


def activations(r, m: int, k: int) -> np.ndarray:
    x = r.standard_normal((m, k)) * r.uniform(0.1, 3.0, size=(m, 1))
    x[:, r.choice(k, min(3, k), replace=False)] *= 20
    if m > 1:
        x[m // 2] = 0.0  # an all-zero token: scale 1, sum 0
    return x.astype(np.float16)


def same(a_gpu, b_np, what: str) -> None:
    a = cp.asnumpy(a_gpu)
    b = np.asarray(b_np)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, a.dtype, b.shape, b.dtype)
    if a.dtype.kind == "f":
        bad = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    else:
        bad = a != b
    assert not bad.any(), f"{what}: {int(bad.sum())} of {a.size} differ, first at {np.argwhere(bad)[0]}: " \
                          f"{a[tuple(np.argwhere(bad)[0])]} vs {b[tuple(np.argwhere(bad)[0])]}"


def opt(a):
    return None if a is None else cp.asarray(a)


def test_sm90a_on_hopper():
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("not a Hopper GPU")
    assert sm90a_active()


# ---- row kernels ----

@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [4096, 200, 77])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_quantize_per_token(m, k, dtype):
    r = rng()
    x = activations(r, m, k).astype(dtype) * dtype(1.001)
    if m > 2:  # a token whose values sit exactly on and next to half-integer multiples of its scale
        sc = float(np.float16(np.abs(x[1].astype(np.float16)).max().astype(np.float32) / np.float32(127)))
        x[1, : k // 2] = (np.arange(k // 2) % 254 - 127 + 0.5) * sc
        x[1, k // 2 :] = np.nextafter(x[1, : k - k // 2], np.inf)
        x[1, 0] = 127 * sc  # amax: the scale stays sc
    poison_pool()
    qa = quantize_per_token(cp.asarray(x), cp)
    ref = quantize_per_token(x)
    same(qa.q, ref.q, "q")
    same(qa.scales, ref.scales, "scales")
    same(qa.sums, ref.sums, "sums")


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [4096, 200, 77])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_quant(m, k, with_residual):
    r = rng()
    x = activations(r, m, k)
    res = activations(r, m, k) if with_residual else None
    gamma = (1 + 0.1 * r.standard_normal(k)).astype(np.float16)
    eps = 1e-5
    poison_pool()
    res_gpu = None if res is None else cp.asarray(res)
    qa, new_res = rms_norm_quant(cp.asarray(x), cp.asarray(gamma), eps, res_gpu, cp)
    y, new_res2 = rms_norm(cp.asarray(x), cp.asarray(gamma), eps, res_gpu, cp)
    ref_qa, ref_res = rms_norm_quant(x, gamma, eps, res)
    ref_y, _ = rms_norm(x, gamma, eps, res)
    same(qa.q, ref_qa.q, "q")
    same(qa.scales, ref_qa.scales, "scales")
    same(qa.sums, ref_qa.sums, "sums")
    qa2, _ = rms_norm_quant(cp.asarray(x), cp.asarray(gamma), eps, res_gpu, cp, with_sums=False)
    assert qa2.sums is None
    same(qa2.q, ref_qa.q, "q (no sums)")
    same(new_res, ref_res, "residual")
    same(new_res2, ref_res, "residual (rms_norm)")
    same(y, ref_y, "y")


def _ulps16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in fp16 ulps (ordered integer representation)."""
    def key(v):
        i = v.view(np.int16).astype(np.int32)
        return np.where(i < 0, -32768 - i, i)
    return np.abs(key(a) - key(b))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("inter", [1536, 200, 77])
def test_silu_mul_quant(m, inter):
    r = rng()
    gate_up = activations(r, m, 2 * inter)
    poison_pool()
    h = silu_mul(cp.asarray(gate_up), cp)
    qa = silu_mul_quant(cp.asarray(gate_up), cp)
    h_np = cp.asnumpy(h)
    ref = silu_mul(gate_up)
    ulps = _ulps16(h_np, ref)
    # at most 1 ulp (the kernel's exp differs from numpy's), on at most 0.1% of the elements or 2 of them
    # (small shapes: one 1-ulp element of 539 is 0.19%)
    off = int((ulps > 0).sum())
    assert ulps.max() <= 1 and off <= max(2, 1e-3 * ulps.size), (ulps.max(), off, ulps.size)
    ref_qa = quantize_per_token(h_np)  # the twin applied to the kernel's own fp16 product: exact
    same(qa.q, ref_qa.q, "q")
    same(silu_mul_quant(cp.asarray(gate_up), cp, with_sums=False).q, ref_qa.q, "q (no sums)")
    same(qa.scales, ref_qa.scales, "scales")
    same(qa.sums, ref_qa.sums, "sums")


# ---- GEMMs ----

def quant_acts(r, m: int, k: int):
    q = r.integers(-127, 128, (m, k)).astype(np.int8)
    scales = r.uniform(1e-3, 2e-2, m).astype(np.float16)
    sums = (r.standard_normal(m) * 30).astype(np.float32)
    return q, scales, sums


def w4_per_channel(r, n: int, k_pad: int):
    codes = r.integers(0, 16, (n, k_pad)).astype(np.uint8)
    s1 = r.uniform(1e-3, 1e-2, n).astype(np.float16)
    szeros = (s1.astype(np.float32) * r.integers(0, 16, n)).astype(np.float16)
    return pack_w4(codes), s1, szeros


def w4_group(r, n: int, k_pad: int):
    codes = r.integers(0, 16, (n, k_pad)).astype(np.uint8)
    groups = k_pad // 128
    s2 = r.integers(1, 17, (n, groups)).astype(np.uint8)  # 15 * s2 - z must stay <= 127 with z <= 127
    lo = np.maximum(15 * s2.astype(np.int16) - 127, -128)
    zeros = (lo + (r.random((n, groups)) * (127 - lo + 1)).astype(np.int16)).astype(np.int16)
    s2_scales, s2_zeros = to_qserve_group_params(s2, zeros)
    s1 = r.uniform(1e-3, 1e-2, n).astype(np.float16)
    return pack_w4(codes), s1, s2_scales, s2_zeros


# (n, k, k_pad per-channel, k_pad g128): real widths, and an odd K (unaligned rows, zero padding).
GEMM_SHAPES = [(1536, 576, 576, 640), (576, 200, 224, 256), (4096, 4096, 4096, 4096)]


def _gemm_ms(n, k):
    return [m for m in MS if not (m == 2048 and n * k > 4096 * 1536)]


@pytest.mark.parametrize("n,k,kpc,kg", GEMM_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_w4a8_per_channel(n, k, kpc, kg, bias):
    r = rng()
    qw, s1, sz = w4_per_channel(r, n, kpc)
    b = r.standard_normal(n).astype(np.float16) if bias else None
    for m in _gemm_ms(n, k):
        q, sx, xs = quant_acts(r, m, k)
        poison_pool()
        out = w4a8_per_channel_gemm_packed(cp.asarray(q), cp.asarray(sx), cp.asarray(xs), cp.asarray(qw),
                                           cp.asarray(s1), cp.asarray(sz), opt(b), cp)
        same(out, w4a8_per_channel_gemm_packed(q, sx, xs, qw, s1, sz, b), f"w4a8 per-channel m={m}")


@pytest.mark.parametrize("n,k,kpc,kg", GEMM_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_w4a8_group(n, k, kpc, kg, bias):
    r = rng()
    qw, s1, s2s, s2z = w4_group(r, n, kg)
    b = r.standard_normal(n).astype(np.float16) if bias else None
    for m in _gemm_ms(n, k):
        q, sx, _ = quant_acts(r, m, k)
        poison_pool()
        out = w4a8_group_gemm_packed(cp.asarray(q), cp.asarray(sx), cp.asarray(qw), cp.asarray(s1),
                                     cp.asarray(s2s), cp.asarray(s2z), opt(b), cp)
        same(out, w4a8_group_gemm_packed(q, sx, qw, s1, s2s, s2z, b), f"w4a8 g128 m={m}")


@pytest.mark.parametrize("n,k", [(1536, 576), (576, 200), (4096, 4096), (96, 77)])
def test_w8a8(n, k):
    r = rng()
    codes = r.integers(-128, 128, (n, k)).astype(np.int8)
    ws = r.uniform(1e-3, 1e-2, n).astype(np.float16)
    b = r.standard_normal(n).astype(np.float16)
    for m in _gemm_ms(n, k):
        q, sx, _ = quant_acts(r, m, k)
        for bias in (None, b):
            poison_pool()
            out = w8a8_gemm(cp.asarray(q), cp.asarray(sx), cp.asarray(codes), cp.asarray(ws),
                            None if bias is None else cp.asarray(bias), cp)
            same(out, w8a8_gemm(q, sx, codes, ws, bias), f"w8a8 m={m}")


@pytest.mark.parametrize("n,k", [(1536, 576), (576, 200), (4096, 4096), (1000, 77)])
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_fp16_gemm(n, k, out_dtype):
    r = rng()
    w = (r.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    b = r.standard_normal(n).astype(np.float16)
    for m in _gemm_ms(n, k):
        x = activations(r, m, k)
        poison_pool()
        out = cp.asnumpy(fp16_gemm(cp.asarray(x), cp.asarray(w), cp.asarray(b), out_dtype, cp))
        check_fp16_gemm(out, x, w, b, out_dtype)


def check_fp16_gemm(out, x, w, b, out_dtype):
    """The fp16 GEMM's documented tolerance: fp32 accumulation error, then the output rounding(s)."""
    m, n = x.shape[0], w.shape[0]
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert np.isfinite(out).all(), "unwritten (poisoned) outputs"
    ref = fp16_gemm(x, w, b, out_dtype)
    ref_nobias = fp16_gemm(x, w, None, out_dtype)
    bound = x.shape[1] * 2.0**-23 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)
    ulp = np.spacing(np.abs(ref)).astype(np.float64) + np.spacing(np.abs(ref_nobias)).astype(np.float64)
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    assert (err <= bound + ulp).all(), f"max excess {(err - bound - ulp).max()}"


# ---- every tile configuration, split-K on and off, on one shape ----

@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
@pytest.mark.parametrize("mode", ["w4_per_channel", "w4_g128", "w8", "f16"])
def test_every_config(name, mode):
    r = rng()
    cfg = NAMED_CONFIGS[name]
    if cfg.wgmma and (mode == "f16" or not wgmma_available()):
        pytest.skip("wgmma tiles: Hopper and int8 modes only")
    n, k = 384, 1024
    m = {8: 5, 16: 13, 32: 29, 64: 61}.get(cfg.bm, 300)
    b = r.standard_normal(n).astype(np.float16)
    for splits in ([1, 3] if cfg.splitk else [1]):
        if mode == "f16":
            x = activations(r, m, k)
            w = (r.standard_normal((n, k)) / 32).astype(np.float16)
            poison_pool()
            out = gemm("f16", cp.asarray(x), cp.asarray(w), n, k, bias=cp.asarray(b), out_f32=True,
                       config=cfg, splits=splits)
            check_fp16_gemm(cp.asnumpy(out), x, w, b, np.float32)
            continue
        q, sx, xs = quant_acts(r, m, k)
        args = dict(x_scales=cp.asarray(sx), bias=cp.asarray(b), config=cfg, splits=splits)
        if mode == "w4_per_channel":
            qw, s1, sz = w4_per_channel(r, n, k)
            ref = w4a8_per_channel_gemm_packed(q, sx, xs, qw, s1, sz, b)
            args.update(x_sums=cp.asarray(xs), w_scales=cp.asarray(s1), w_szeros=cp.asarray(sz))
            w = qw
        elif mode == "w4_g128":
            qw, s1, s2s, s2z = w4_group(r, n, k)
            ref = w4a8_group_gemm_packed(q, sx, qw, s1, s2s, s2z, b)
            args.update(w_scales=cp.asarray(s1), s2_scales=cp.asarray(s2s), s2_zeros=cp.asarray(s2z))
            w = qw
        else:
            w = r.integers(-128, 128, (n, k)).astype(np.int8)
            ws = r.uniform(1e-3, 1e-2, n).astype(np.float16)
            ref = w8a8_gemm(q, sx, w, ws, b)
            args.update(w_scales=cp.asarray(ws))
        poison_pool()
        out = gemm(mode, cp.asarray(q), cp.asarray(w), n, k, **args)
        same(out, ref, f"{mode} {name} splits={splits}")


# ---- the Hopper TMA + wgmma kernel: every tile, split-K on and off, odd shapes ----

def _int8_case(r, mode: str, m: int, n: int, k: int, b):
    """(activations, weight, kwargs, numpy twin's output) of one int8-mode GEMM with valid random operands."""
    q, sx, xs = quant_acts(r, m, k)
    args = dict(x_scales=cp.asarray(sx), bias=None if b is None else cp.asarray(b))
    if mode == "w4_per_channel":
        w, s1, sz = w4_per_channel(r, n, k)
        ref = w4a8_per_channel_gemm_packed(q, sx, xs, w, s1, sz, b)
        args.update(x_sums=cp.asarray(xs), w_scales=cp.asarray(s1), w_szeros=cp.asarray(sz))
    elif mode == "w4_g128":
        w, s1, s2s, s2z = w4_group(r, n, k)
        ref = w4a8_group_gemm_packed(q, sx, w, s1, s2s, s2z, b)
        args.update(w_scales=cp.asarray(s1), s2_scales=cp.asarray(s2s), s2_zeros=cp.asarray(s2z))
    else:
        w = r.integers(-128, 128, (n, k)).astype(np.int8)
        ws = r.uniform(1e-3, 1e-2, n).astype(np.float16)
        ref = w8a8_gemm(q, sx, w, ws, b)
        args.update(w_scales=cp.asarray(ws))
    return q, w, args, ref


@pytest.mark.parametrize("name", sorted(SM90_CONFIGS))
@pytest.mark.parametrize("mode", ["w4_per_channel", "w4_g128", "w8"])
def test_sm90_configs(name, mode):
    if not wgmma_available():
        pytest.skip("the sm90 kernel needs a Hopper GPU")
    r = rng()
    # M = 1, 7, 300, 4099 (partial token tiles), N not a multiple of the tile, K not a multiple of 128
    # (per-channel, W8: 608) and several K splits
    k_odd = 1024 if mode == "w4_g128" else 608
    for m, n, k in [(1, 384, 1024), (7, 384, k_odd), (300, 640, k_odd), (4099, 256, 256)]:
        for splits in (1, 3):
            b = r.standard_normal(n).astype(np.float16) if splits == 3 else None
            q, w, args, ref = _int8_case(r, mode, m, n, k, b)
            poison_pool()
            out = gemm(mode, cp.asarray(q), cp.asarray(w), n, k, config=SM90_CONFIGS[name], splits=splits,
                       **args)
            same(out, ref, f"sm90 {mode} {name} m={m} n={n} k={k} splits={splits}")


@pytest.mark.parametrize("m", [64, 300])
def test_sm90_graph_capture(m):
    """The sm90 kernel (launched through the driver with TMA descriptors) replays in a CUDA graph with new
    activations, split-K workspace included."""
    if not wgmma_available():
        pytest.skip("the sm90 kernel needs a Hopper GPU")
    r = rng()
    n, k = 1024, 4096
    q, w, args, _ = _int8_case(r, "w4_g128", m, n, k, None)
    x = cp.asarray(q)
    wd = cp.asarray(w)
    gemm("w4_g128", x, wd, n, k, splits=3, **args)  # compile, allocate the workspace
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            y = gemm("w4_g128", x, wd, n, k, splits=3, **args)
        finally:
            graph = stream.end_capture()
    for _ in range(2):
        q2 = r.integers(-127, 128, (m, k)).astype(np.int8)
        x[...] = cp.asarray(q2)
        cp.cuda.Device().synchronize()
        graph.launch(stream)
        stream.synchronize()
        ref = w4a8_group_gemm_packed(q2, cp.asnumpy(args["x_scales"]), w, cp.asnumpy(args["w_scales"]),
                                     cp.asnumpy(args["s2_scales"]), cp.asnumpy(args["s2_zeros"]))
        same(y, ref, f"graph sm90 gemm m={m}")


# ---- the skinny decode kernel: every warp count, split-K, odd K ----

SKINNY = [(1, 8, 2), (2, 4, 2), (1, 4, 1), (4, 2, 1)]


@pytest.mark.parametrize("mode", ["w4_per_channel", "w4_g128"])
@pytest.mark.parametrize("cb,kw,depth", SKINNY)
def test_skinny_configs(mode, cb, kw, depth):
    r = rng()
    n = 384
    cases = [(1024, 1024, 1, 1), (1024, 1024, 13, 3), (200, 256, 7, 2), (4096, 4096, 16, 5), (200, 224, 3, 1),
             (14336, 14336, 9, 1)]
    for k, k_pad, m, splits in cases:
        q, sx, xs = quant_acts(r, m, k)
        b = r.standard_normal(n).astype(np.float16)
        args = dict(x_scales=cp.asarray(sx), bias=cp.asarray(b), config=SkinnyConfig(cb, kw, depth),
                    splits=splits)
        if mode == "w4_per_channel":
            qw, s1, sz = w4_per_channel(r, n, k_pad)
            ref = w4a8_per_channel_gemm_packed(q, sx, xs, qw, s1, sz, b)
            args.update(x_sums=cp.asarray(xs), w_scales=cp.asarray(s1), w_szeros=cp.asarray(sz))
        elif k_pad % 128:
            continue  # g128 needs K_pad % 128 == 0
        else:
            qw, s1, s2s, s2z = w4_group(r, n, k_pad)
            ref = w4a8_group_gemm_packed(q, sx, qw, s1, s2s, s2z, b)
            args.update(w_scales=cp.asarray(s1), s2_scales=cp.asarray(s2s), s2_zeros=cp.asarray(s2z))
        poison_pool()
        out = gemm(mode, cp.asarray(q), cp.asarray(qw), n, k_pad, **args)
        same(out, ref, f"skinny {mode} {cb}x{kw}x{depth} m={m} k={k} splits={splits}")


# ---- the dequantize-once + cuBLAS INT8 path ----

@pytest.mark.parametrize("m", [7, 300])
def test_cublas_path(m):
    r = rng()
    n, k = 1536, 576
    q, sx, xs = quant_acts(r, m, k)
    qw, s1, sz = w4_per_channel(r, n, k)
    same(w4_to_int8(cp.asarray(qw), xp=cp), w4_to_int8(qw), "w4_to_int8 per-channel")
    out = w4a8_per_channel_gemm_packed(cp.asarray(q), cp.asarray(sx), cp.asarray(xs), cp.asarray(qw),
                                       cp.asarray(s1), cp.asarray(sz), None, cp, method="cublas")
    same(out, w4a8_per_channel_gemm_packed(q, sx, xs, qw, s1, sz), "cublas per-channel")
    qw, s1, s2s, s2z = w4_group(r, n, 640)
    same(w4_to_int8(cp.asarray(qw), cp.asarray(s2s), cp.asarray(s2z), cp), w4_to_int8(qw, s2s, s2z),
         "w4_to_int8 g128")
    out = w4a8_group_gemm_packed(cp.asarray(q), cp.asarray(sx), cp.asarray(qw), cp.asarray(s1),
                                 cp.asarray(s2s), cp.asarray(s2z), None, cp, method="cublas")
    same(out, w4a8_group_gemm_packed(q, sx, qw, s1, s2s, s2z), "cublas g128")


# ---- CUDA graphs: a decode step's kernels replay with new inputs ----

def test_cuda_graph_capture():
    r = rng()
    m, hidden, n = 4, 4096, 6144
    qw, s1, s2s, s2z = (cp.asarray(a) for a in w4_group(r, n, hidden))
    gamma = cp.asarray((1 + 0.1 * r.standard_normal(hidden)).astype(np.float16))
    x = cp.asarray(activations(r, m, hidden))
    res = cp.asarray(activations(r, m, hidden))

    def step():
        qa, new_res = rms_norm_quant(x, gamma, 1e-5, res, cp)
        return w4a8_group_gemm_packed(qa.q, qa.scales, qw, s1, s2s, s2z, None, cp), new_res

    step()  # compile, allocate the split-K workspace
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            y, new_res = step()
        finally:
            graph = stream.end_capture()
    for _ in range(2):
        x[...] = cp.asarray(activations(r, m, hidden))
        res[...] = cp.asarray(activations(r, m, hidden))
        cp.cuda.Device().synchronize()
        graph.launch(stream)
        stream.synchronize()
        xs, rs = cp.asnumpy(x), cp.asnumpy(res)
        qa_ref, res_ref = rms_norm_quant(xs, cp.asnumpy(gamma), 1e-5, rs)
        ref = w4a8_group_gemm_packed(qa_ref.q, qa_ref.scales, cp.asnumpy(qw), cp.asnumpy(s1), cp.asnumpy(s2s),
                                     cp.asnumpy(s2z))
        same(new_res, res_ref, "graph residual")
        same(y, ref, "graph gemm")


def test_pin_and_release_workspaces():
    """A split-K GEMM on a stream leaves its int32 workspace for pin_workspaces; release drops it."""
    r = rng()
    m, n, k = 4, 384, 4096
    qw, s1, s2s, s2z = (cp.asarray(a) for a in w4_group(r, n, k))
    q, sx, _ = quant_acts(r, m, k)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        out = gemm("w4_g128", cp.asarray(q), qw, n, k, x_scales=cp.asarray(sx), w_scales=s1, s2_scales=s2s,
                   s2_zeros=s2z, splits=4)
        stream.synchronize()
    assert out.shape == (m, n)
    gemm_bufs, attention_bufs = pin_workspaces(stream)
    assert gemm_bufs is not None and gemm_bufs[0].dtype == cp.int32 and gemm_bufs[1].dtype == cp.int32
    assert attention_bufs is None  # no decode attention ran on this stream
    release_workspaces(stream)
    assert pin_workspaces(stream) == [None, None]


@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_fp16_gemm_cublas_route_and_capture(monkeypatch, out_dtype):
    """fp16 GEMMs that ask for cuBLAS (`cublas=True`) of >= CUBLAS_F16_MIN_M tokens run on it outside capture
    (strided rows, K < the weight's K, bias); without asking, or inside a CUDA graph, our kernel runs; all
    within the twin's tolerance."""
    import qserve_lite.kernels.cuda.gemm as cg

    r = rng()
    m, n, k, kw = 300, 1000, 600, 640
    w = (r.standard_normal((n, kw)) / np.sqrt(k)).astype(np.float16)
    w[:, k:] = 0
    b = r.standard_normal(n).astype(np.float16)
    xs = activations(r, m, k + 24)
    x = xs[:, :k]  # strided rows
    gx, gw, gb = cp.asarray(xs)[:, :k], cp.asarray(w), cp.asarray(b)
    out32 = out_dtype == np.float32
    calls = []
    real = cg.fp16_matmul_cublas
    monkeypatch.setattr(cg, "fp16_matmul_cublas", lambda *a, **kw_: calls.append(1) or real(*a, **kw_))
    ours = cp.asnumpy(cg.gemm("f16", gx, gw, n, kw, bias=gb, out_f32=out32))  # also loads our kernel
    assert not calls, "without cublas=True the fp16 GEMM is our kernel"
    check_fp16_gemm(ours, x, w[:, :k], b, out_dtype)
    got = cp.asnumpy(cg.gemm("f16", gx, gw, n, kw, bias=gb, out_f32=out32, cublas=True))
    assert calls, "an uncaptured fp16 GEMM of 300 tokens with cublas=True should use cuBLAS"
    check_fp16_gemm(got, x, w[:, :k], b, out_dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            y = cg.gemm("f16", gx, gw, n, kw, bias=gb, out_f32=out32, cublas=True)
        finally:
            graph = stream.end_capture()
    assert len(calls) == 1, "inside capture the fp16 GEMM must be our kernel"
    graph.launch(stream)
    stream.synchronize()
    check_fp16_gemm(cp.asnumpy(y), x, w[:, :k], b, out_dtype)
