"""Exact emulation of QServe's W4A8 / W8A8 GEMMs, activation and KV quantization (the numpy spec of the
future CUDA kernels), precisions, and how precision reaches the loader and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qserve_lite.cli import main
from qserve_lite.core.precision import PRECISION_NAMES, Precision
from qserve_lite.errors import QServeLiteError
from qserve_lite.eval.perplexity import perplexity
from qserve_lite.io import loader
from qserve_lite.io.loader import load_model
from qserve_lite.kernels.act_quant import dequantize_per_token, quantize_per_token
from qserve_lite.kernels.kv_quant import KVFakeQuantizer, kv_dequantize, kv_fake_quant, kv_quantize
from qserve_lite.kernels.w4a8_gemm import group_level1, w4a8_group_gemm, w4a8_per_channel_gemm
from qserve_lite.kernels.w8a8_gemm import exact_int_matmul, w8a8_gemm
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.quant.quantizers import quantize_w4_group, quantize_w4_per_channel, quantize_w8_per_channel

EPS32 = 2.0**-24  # half an fp32 ulp, relative
EPS16 = 2.0**-11  # half an fp16 ulp, relative


def fresh_rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh inputs every run; failures print the shapes involved


def activations(rng, m: int, k: int) -> np.ndarray:
    """Roughly LLM-like: Gaussian with a few large outlier channels, plus one all-zero token if m > 1."""
    x = rng.standard_normal((m, k)) * rng.uniform(0.1, 3.0, size=(m, 1))
    x[:, rng.choice(k, 3, replace=False)] *= 20
    if m > 1:
        x[m // 2] = 0.0
    return x.astype(np.float32)


def weight(rng, n: int, k: int) -> np.ndarray:
    return rng.standard_normal((n, k)) / np.sqrt(k) + 0.02 * rng.standard_normal((n, 1))


SHAPES = [(m, k) for m in (1, 7, 300) for k in (200, 576)]


# ---- exact integer accumulation ----

@pytest.mark.parametrize("m,k", SHAPES)
def test_float64_blas_matmul_equals_int64(m, k):
    rng = fresh_rng()
    a = rng.integers(-127, 128, (m, k)).astype(np.int8)
    w4, w8 = rng.integers(0, 16, (40, k)).astype(np.uint8), rng.integers(-128, 128, (40, k)).astype(np.int8)
    for b in (w4, w8):
        acc = exact_int_matmul(a, b)
        assert acc.dtype == np.int32
        np.testing.assert_array_equal(acc, a.astype(np.int64) @ b.astype(np.int64).T)


def test_float64_blas_matmul_is_exact_at_the_extremes():
    # Sums far beyond float32's 2^24 (and near int32's limit for int8 x int8 over K = 2^17 / 2).
    k = 65536
    a = np.full((3, k), 127, np.int8)
    a[1] = -127
    a[2, ::2] = -127
    b = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8), np.tile(np.int8([127, -128]), k // 2)])
    np.testing.assert_array_equal(exact_int_matmul(a, b), a.astype(np.int64) @ b.astype(np.int64).T)


# ---- activation quantization ----

@pytest.mark.parametrize("m,k", SHAPES)
def test_act_quant_invariants(m, k):
    x = activations(fresh_rng(), m, k)
    qa = quantize_per_token(x)
    assert qa.q.dtype == np.int8 and qa.q.shape == (m, k)
    assert qa.scales.dtype == np.float16 and qa.sums.dtype == np.float32
    assert np.abs(qa.q.astype(np.int32)).max() <= 127
    x16 = x.astype(np.float16).astype(np.float64)
    amax = np.abs(x16).max(axis=1)
    live = amax > 0
    # scale is amax/127 rounded once to fp16 (the fp32 intermediate does not double-round)
    np.testing.assert_array_equal(qa.scales[live], (amax[live] / 127).astype(np.float16))
    np.testing.assert_array_equal(qa.scales[~live], 1)
    # each token's largest |x| maps to +-127 with its sign
    rows = np.arange(m)
    j = np.abs(x16).argmax(axis=1)
    np.testing.assert_array_equal(qa.q[rows[live], j[live]], 127 * np.sign(x16[rows[live], j[live]]))
    assert not qa.q[~live].any()
    # round to nearest: reconstruction within half a step
    s = qa.scales.astype(np.float64)[:, None]
    assert np.all(np.abs(dequantize_per_token(qa) - x16) <= s * (0.5 + 1e-5))
    # the sum is of the fp16 activation (not of the codes), exact then rounded once to fp32
    np.testing.assert_array_equal(qa.sums, x16.sum(axis=1).astype(np.float32))


def test_act_quant_keeps_leading_axes():
    x = activations(fresh_rng(), 6, 200).reshape(2, 3, 200)
    qa = quantize_per_token(x)
    flat = quantize_per_token(x.reshape(6, 200))
    assert qa.q.shape == (2, 3, 200) and qa.scales.shape == (2, 3)
    np.testing.assert_array_equal(qa.q.reshape(6, 200), flat.q)


# ---- GEMMs: emulation == dequantize-then-float64-matmul, within fp16 output rounding ----

def assert_close_to_reference(out16, ref, magnitude, before_bias=None):
    """|out - ref| <= fp16 rounding of ref (and of the GEMM result before the bias is added, which is
    rounded to fp16 on its own) + a few fp32 roundings of the epilogue's terms."""
    assert out16.dtype == np.float16 and out16.shape == ref.shape
    err = np.abs(out16.astype(np.float64) - ref)
    bound = EPS16 * np.abs(ref) + 8 * EPS32 * magnitude + 2.0**-24
    if before_bias is not None:
        bound += EPS16 * np.abs(before_bias) + 2.0**-24
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"err {err[worst]} > bound {bound[worst]} at {worst}"


@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w4a8_per_channel_gemm(m, k, with_bias):
    rng = fresh_rng()
    n = 72
    x, qw = activations(rng, m, k), quantize_w4_per_channel(weight(rng, n, k))
    bias = (0.1 * rng.standard_normal(n)).astype(np.float32) if with_bias else None
    qa = quantize_per_token(x)
    out = w4a8_per_channel_gemm(qa.q, qa.scales, qa.sums, qw.codes, qw.scales, qw.szeros, bias)

    xq = dequantize_per_token(qa)  # q_x * sx
    sz = qw.szeros.astype(np.float64)
    # (q_x sx) @ W_hat^T, with the zero term's sx*sum(q) replaced by the kernel's sum of the fp16 activation
    ref = xq @ qw.dequantize().T + (xq.sum(axis=1) - qa.sums.astype(np.float64))[:, None] * sz[None, :]
    magnitude = np.abs(xq) @ np.abs(qw.codes * qw.scales.astype(np.float64)[:, None]).T \
        + np.abs(qa.sums.astype(np.float64))[:, None] * np.abs(sz)[None, :]
    if bias is None:
        assert_close_to_reference(out, ref, magnitude)
    else:  # the bias joins after the fp16 rounding of the GEMM
        ref_bias = ref + bias.astype(np.float16).astype(np.float64)[None, :]
        assert_close_to_reference(out, ref_bias, magnitude, ref)


@pytest.mark.parametrize("m,k", SHAPES)
def test_w4a8_group_gemm_with_k_padding(m, k):
    rng = fresh_rng()
    n = 64
    x, qw = activations(rng, m, k), quantize_w4_group(weight(rng, n, k), group_size=128)
    assert qw.codes.shape[1] == -(-k // 128) * 128 and qw.in_features == k  # K padded, true K kept
    level1 = group_level1(qw.codes, qw.s2, qw.zeros, qw.group_size)
    assert level1.dtype == np.int8
    np.testing.assert_array_equal(level1, qw.level1())  # byte-lane arithmetic == codes*s2 - z
    qa = quantize_per_token(x)
    out = w4a8_group_gemm(qa.q, qa.scales, level1, qw.s1)
    xq = dequantize_per_token(qa)
    ref = xq @ qw.dequantize().T
    assert_close_to_reference(out, ref, np.abs(xq) @ np.abs(qw.dequantize()).T)


@pytest.mark.parametrize("m,k", SHAPES)
def test_w8a8_gemm(m, k):
    rng = fresh_rng()
    n = 56
    x, qw = activations(rng, m, k), quantize_w8_per_channel(weight(rng, n, k))
    bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    qa = quantize_per_token(x)
    out = w8a8_gemm(qa.q, qa.scales, qw.codes, qw.scales, bias)
    xq = dequantize_per_token(qa)
    ref = xq @ qw.dequantize().T
    assert_close_to_reference(out, ref + bias.astype(np.float16).astype(np.float64)[None, :],
                              np.abs(xq) @ np.abs(qw.dequantize()).T, ref)


def test_gemms_are_bit_exact_under_any_k_order():
    """Integer accumulation and the exact activation sum make the result independent of summation order,
    so a CUDA kernel with any tiling / split-K can match the numpy spec bit for bit."""
    rng = fresh_rng()
    m, k, n = 7, 576, 48
    x = activations(rng, m, k)
    perm = rng.permutation(k)
    qa, qp = quantize_per_token(x), quantize_per_token(x[:, perm])
    pc = quantize_w4_per_channel(weight(rng, n, k))
    a = w4a8_per_channel_gemm(qa.q, qa.scales, qa.sums, pc.codes, pc.scales, pc.szeros)
    b = w4a8_per_channel_gemm(qp.q, qp.scales, qp.sums, pc.codes[:, perm], pc.scales, pc.szeros)
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    g = quantize_w4_group(weight(rng, n, k))
    lv = group_level1(g.codes, g.s2, g.zeros)[:, :k]
    a = w4a8_group_gemm(qa.q, qa.scales, lv, g.s1)
    b = w4a8_group_gemm(qp.q, qp.scales, lv[:, perm], g.s1)
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_group_level1_rejects_out_of_range_weights():
    codes = np.full((1, 128), 15, np.uint8)
    with pytest.raises(ValueError, match="kernel's range"):
        group_level1(codes, np.full((1, 1), 18, np.uint8), np.zeros((1, 1), np.int16))  # 15*18 > 255
    with pytest.raises(ValueError, match="kernel's range"):
        group_level1(codes, np.full((1, 1), 16, np.uint8), np.full((1, 1), -10, np.int16))  # 240+10 > 127


# ---- quantized linears ----

@pytest.mark.parametrize("make", ["w4_per_channel", "w4_group", "w8"])
@pytest.mark.parametrize("k", [200, 576])
def test_quantized_linear_call(make, k):
    rng = fresh_rng()
    n = 40
    w = weight(rng, n, k)
    bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    qw = {"w4_per_channel": quantize_w4_per_channel, "w4_group": quantize_w4_group,
          "w8": quantize_w8_per_channel}[make](w)
    lin = (W8A8Linear if make == "w8" else W4A8Linear)(qw, bias)
    assert (lin.in_features, lin.out_features) == (k, n)
    x = activations(rng, 14, k).reshape(2, 7, k)
    y = lin(x)
    assert y.dtype == np.float32 and y.shape == (2, 7, n)
    np.testing.assert_array_equal(y, y.astype(np.float16).astype(np.float32))  # fp16-valued output
    # the same numbers as the GEMM op on the flattened tokens
    qa = quantize_per_token(x.reshape(14, k))
    if make == "w4_per_channel":
        direct = w4a8_per_channel_gemm(qa.q, qa.scales, qa.sums, qw.codes, qw.scales, qw.szeros, bias)
    elif make == "w4_group":
        direct = w4a8_group_gemm(qa.q, qa.scales, group_level1(qw.codes, qw.s2, qw.zeros), qw.s1, bias)
    else:
        direct = w8a8_gemm(qa.q, qa.scales, qw.codes, qw.scales, bias)
    np.testing.assert_array_equal(y.reshape(14, n), direct.astype(np.float32))
    np.testing.assert_array_equal(lin(x), y)  # the cached weight copy gives the same result
    # and close to the float linear
    ref = x.astype(np.float64) @ w.T + bias
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel < (0.08 if make == "w8" else 0.3), rel


def quantize_model_linears(model, make) -> None:
    for lw in model.weights.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            lin: Linear = getattr(lw, name)
            qw = make(np.asarray(lin.weight, dtype=np.float64))
            setattr(lw, name, (W8A8Linear if make is quantize_w8_per_channel else W4A8Linear)(qw, lin.bias))


@pytest.mark.parametrize("make", [quantize_w4_per_channel, quantize_w4_group, quantize_w8_per_channel])
def test_quantized_tiny_model_tracks_the_float_model(tiny_model_dir, make):
    ids = fresh_rng().integers(0, 320, 40)
    ref = load_model(tiny_model_dir).model
    float_logits = ref.logits(ref.forward(ids[None], ref.new_cache(1, 40)))[0]
    q = load_model(tiny_model_dir).model
    quantize_model_linears(q, make)
    q_logits = q.logits(q.forward(ids[None], q.new_cache(1, 40)))[0]
    assert np.isfinite(q_logits).all()
    corr = np.corrcoef(float_logits.ravel(), q_logits.ravel())[0, 1]
    assert corr > (0.99 if make is quantize_w8_per_channel else 0.9), corr
    assert not np.array_equal(float_logits, q_logits)


# ---- KV cache quantization ----

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(2, 3, 17, 12), (1, 2, 5, 128), (1, 1, 1, 64)])
def test_kv_quant_codes_and_error(bits, shape):
    rng = fresh_rng()
    x = (rng.standard_normal(shape) * rng.uniform(0.05, 4, shape[:-1] + (1,))
         + rng.uniform(-1, 1, shape[:-1] + (1,))).astype(np.float32)
    codes, scales, zeros = kv_quantize(x, bits)
    assert codes.dtype == np.uint8 and codes.shape == shape and int(codes.max()) <= 2**bits - 1
    assert scales.dtype == np.float16 and zeros.dtype == np.float16 and scales.shape == shape[:-1]
    x16 = x.astype(np.float16).astype(np.float64)
    mn, mx = x16.min(-1), x16.max(-1)
    # (no degenerate head here, so the scale floor is inactive)
    np.testing.assert_array_equal(scales, ((mx - mn) / (2**bits - 1)).astype(np.float16))
    np.testing.assert_array_equal(zeros, (-mn / scales.astype(np.float64)).astype(np.float16))
    # the extremes land on the ends of the code range (up to the fp16 rounding of the scale)
    assert np.all(np.take_along_axis(codes, x16.argmin(-1)[..., None], -1) <= 1)
    assert np.all(np.take_along_axis(codes, x16.argmax(-1)[..., None], -1) >= 2**bits - 2)
    x_hat = kv_dequantize(codes, scales, zeros)
    assert x_hat.dtype == np.float32
    s = scales.astype(np.float64)[..., None]
    slack = EPS16 * np.abs(mn)[..., None] + 4 * EPS32 * (np.abs(x16) + np.abs(mn)[..., None] + s)
    assert np.all(np.abs(x_hat - x16) <= s / 2 + slack)
    np.testing.assert_array_equal(kv_fake_quant(x, bits), x_hat)
    assert kv_fake_quant(x, bits).dtype == x.dtype


def test_kv_quant_is_per_token_per_head():
    rng = fresh_rng()
    x = rng.standard_normal((2, 4, 9, 32)).astype(np.float32)
    y = x.copy()
    y[1, 2, 5, 7] = 1000.0  # an outlier in one head of one token
    for bits in (4, 8):
        cx, sx, zx = kv_quantize(x, bits)
        cy, sy, zy = kv_quantize(y, bits)
        other = np.ones(x.shape[:-1], bool)
        other[1, 2, 5] = False
        np.testing.assert_array_equal(sx[other], sy[other])
        np.testing.assert_array_equal(zx[other], zy[other])
        np.testing.assert_array_equal(cx[other], cy[other])
        assert sy[1, 2, 5] > 50 * sx[1, 2, 5]


def test_kv_quant_degenerate_heads():
    x = np.zeros((1, 2, 3, 16), np.float32)
    x[0, 1] = 0.75  # a constant head: scale 0 -> 1, reconstructed exactly
    x[0, 0, 2, :8] = 1.0  # KV8 range of 2^-10 on an offset of 1: zero would overflow fp16 without the clip
    x[0, 0, 2, 8:] = 1.0 + 2.0**-10
    for bits in (4, 8):
        codes, scales, zeros = kv_quantize(x, bits)
        assert np.isfinite(zeros.astype(np.float32)).all()
        x_hat = kv_dequantize(codes, scales, zeros)
        assert np.isfinite(x_hat).all()
        np.testing.assert_array_equal(scales[0, 1], 1)
        np.testing.assert_array_equal(x_hat[0, 1], x[0, 1])
        np.testing.assert_array_equal(x_hat[0, 0, :2], 0)
        s = float(scales[0, 0, 2])
        assert np.abs(x_hat - x).max() <= s / 2 + 2.0**-11 + 1e-6


def test_kv8_is_closer_than_kv4():
    x = fresh_rng().standard_normal((1, 2, 50, 64)).astype(np.float32)
    e4 = np.abs(kv_fake_quant(x, 4) - x).mean()
    e8 = np.abs(kv_fake_quant(x, 8) - x).mean()
    assert e8 < e4 / 8
    with pytest.raises(ValueError):
        kv_quantize(x, 3)


# ---- precision ----

def test_precision_parse_and_names():
    assert set(PRECISION_NAMES) >= {"w4a8kv4", "w4a8kv8", "w8a8kv4", "w8a8kv8", "w16a16kv4", "w16a16kv8",
                                    "w16a16"}
    for name in PRECISION_NAMES:
        p = Precision.parse(name)
        assert p.name == name and str(p) == name and Precision.parse(p.name) == p
    p = Precision.parse("W4A8KV4")
    assert (p.w_bits, p.a_bits, p.kv_bits) == (4, 8, 4) and not p.is_float
    assert Precision.parse("w16a16kv16") == Precision() == Precision.parse("w16a16")
    assert Precision.parse("w16a16kv8").is_float
    with pytest.raises(AttributeError):
        p.kv_bits = 8  # frozen
    for bad in ("w4a16", "w3a8kv4", "w4a8kv2", "fp16", "", "w4a8kv4x"):
        with pytest.raises(QServeLiteError, match="valid: w4a8kv4, w4a8kv8"):
            Precision.parse(bad)
    with pytest.raises(QServeLiteError):
        Precision(16, 8, 4)


# ---- precision in the loader and the CLI ----

def test_loader_float_model_precisions(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    assert lm.precision == Precision() and lm.model.kv_quantizer is None
    kv4 = load_model(tiny_model_dir, precision="w16a16kv4")
    assert kv4.precision.name == "w16a16kv4" and kv4.model.kv_quantizer.bits == 4
    kv8 = load_model(tiny_model_dir, precision="w16a16kv8")
    assert kv8.model.kv_quantizer.bits == 8
    ids = fresh_rng().integers(0, lm.config.vocab_size, 96)
    base = perplexity(lm.model, ids, seq_len=48, progress=False).ppl
    p4 = perplexity(kv4.model, ids, seq_len=48, progress=False).ppl
    p8 = perplexity(kv8.model, ids, seq_len=48, progress=False).ppl
    assert p4 != base and p8 != base
    assert abs(np.log(p4 / base)) < 0.1 and abs(np.log(p8 / base)) < abs(np.log(p4 / base)) + 2e-3
    for name in ("w4a8kv4", "w8a8kv8", "w4a8"):
        with pytest.raises(QServeLiteError, match="qserve-lite quantize"):
            load_model(tiny_model_dir, precision=name)
    with pytest.raises(QServeLiteError, match="unknown precision"):
        load_model(tiny_model_dir, precision="int4")


def test_kv_quantizer_reaches_the_cache(tiny_model_dir):
    lm = load_model(tiny_model_dir, precision="w16a16kv4")
    cache = lm.model.new_cache(1, 10)
    lm.model.forward(np.arange(10)[None], cache)
    k = cache.k[0][:, :, :10]
    np.testing.assert_array_equal(k, kv_fake_quant(k, 4))  # stored values are already on the KV4 grid
    assert isinstance(lm.model.kv_quantizer, KVFakeQuantizer)


@pytest.fixture
def fake_quantized_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """A copy of the tiny model marked as a W4 g128 checkpoint, with a stand-in checkpoint reader (the real
    qserve_lite.io.checkpoint is written separately; only its interface matters here)."""
    out = tmp_path / "tiny-w4"
    shutil.copytree(tiny_model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "qoq", "w_bit": 4, "group_size": 128, "kv_bit": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    calls = []

    def read_quantized_weights(model_cfg, path, group_size=None):
        from qserve_lite.io.hf_weights import load_llama_weights

        calls.append(path)
        w = load_llama_weights(model_cfg, path)
        for lw in w.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                lin = getattr(lw, name)
                setattr(lw, name, W4A8Linear(quantize_w4_group(lin.weight.astype(np.float64)), lin.bias))
        return w

    monkeypatch.setattr(loader, "read_quant_config", lambda model_dir: dict(
        json.loads((model_dir / "config.json").read_text())["quantization_config"]))
    monkeypatch.setattr(loader, "read_quantized_weights", read_quantized_weights)
    return out, calls


def test_loader_quantized_checkpoint_precisions(fake_quantized_checkpoint):
    path, calls = fake_quantized_checkpoint
    lm = load_model(path)
    assert lm.precision.name == "w4a8kv4" and lm.model.kv_quantizer.bits == 4 and calls
    assert isinstance(lm.model.weights.layers[0].q_proj, W4A8Linear)
    assert load_model(path, precision="w4a8kv8").model.kv_quantizer.bits == 8
    assert load_model(path, precision="w4a8").model.kv_quantizer is None
    for name in ("w8a8kv4", "w16a16", "w16a16kv4"):
        with pytest.raises(QServeLiteError, match="4-bit-weight quantized checkpoint"):
            load_model(path, precision=name)
    ids = np.arange(12)
    logits = lm.model.logits(lm.model.forward(ids[None], lm.model.new_cache(1, 12)))
    assert np.isfinite(logits).all()


def test_loader_qserve_zoo_checkpoint_without_quantization_config(tmp_path):
    """A QServe zoo checkpoint has no quantization_config: it is still recognized as quantized (W4
    per-channel, default KV4) and its linears run the W4A8 emulation."""
    pytest.importorskip("qserve_lite.io.checkpoint")
    from conftest import build_tokenizer

    src = Path(__file__).parents[1] / "data" / "qserve_zoo_tiny"
    if not src.is_dir():
        pytest.skip("zoo fixture not present")
    path = tmp_path / "zoo"
    shutil.copytree(src, path)
    build_tokenizer(path)
    lm = load_model(path)
    assert lm.precision.name == "w4a8kv4" and isinstance(lm.model.weights.layers[0].q_proj, W4A8Linear)
    logits = lm.model.logits(lm.model.forward(np.arange(9)[None] % 48, lm.model.new_cache(1, 9)))
    assert logits.shape == (1, 9, 48) and np.isfinite(logits).all()
    assert load_model(path, precision="w4a8kv8").model.kv_quantizer.bits == 8
    with pytest.raises(QServeLiteError, match="4-bit-weight quantized checkpoint"):
        load_model(path, precision="w8a8kv8")


def test_cli_precision(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. Quantization maps weights to small integers. " * 12)
    common = ["ppl", "--model", str(tiny_model_dir), "--text", str(text), "--seq-len", "32"]
    assert main(common + ["--precision", "w16a16kv8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ppl ") and "precision w16a16kv8" in out.err
    assert main(common + ["--precision", "w4a8kv4"]) == 2
    assert "qserve-lite quantize" in capsys.readouterr().err
    assert main(common + ["--precision", "w5a5"]) == 2
    assert "valid: w4a8kv4" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "-p", "Hello", "--max-tokens", "3",
                 "--precision", "w16a16kv4", "--no-stream"]) == 0
    assert "w16a16kv4" in capsys.readouterr().err
