"""QoQ pipeline steps: exactness of the float transforms, GPTQ and clipping, calibration, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import random_weights, tiny_config, write_model

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.model.llama import LlamaModel
from qserve_lite.model.tokenizer import Tokenizer
from qserve_lite.quant import calibrate, qoq
from qserve_lite.quant.calibrate import LayerRunner, PointSpec, build_samples, collect
from qserve_lite.quant.clip import clip_ratios, rtn_w4_per_channel, search_qk_clip, search_row_clip
from qserve_lite.quant.gptq import gptq_w4_group, gptq_w4_per_channel, gptq_w8
from qserve_lite.quant.quantizers import quantize_w4_group, quantize_w4_per_channel, quantize_w8_per_channel
from qserve_lite.quant.reorder import reorder_down
from qserve_lite.quant.smooth_attention import smooth_attention, tie_rope_halves
from qserve_lite.quant.smooth_proj import smooth_proj

FIXTURE_TEXT = Path(__file__).parents[1] / "data" / "python_doc_sample.rst.txt"


def _load64(model_dir):
    cfg = ModelConfig.from_file(Path(model_dir) / "config.json")
    return cfg, load_llama_weights(cfg, model_dir, dtype=np.float64)


def _logits(cfg, weights, ids):
    model = LlamaModel(cfg, weights, np)
    cache = model.new_cache(batch=ids.shape[0], max_len=ids.shape[1])
    return model.logits(model.forward(ids, cache))


def _samples(cfg, n=3, t=40, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, t))


@pytest.fixture(scope="module")
def qoq_model_dir(tmp_path_factory) -> Path:
    """Tiny GQA Llama whose linears are multiples of 32 (QServe's W4 packing) with outlier channels in the
    residual stream's norm gains, which hurt per-token A8 unless the model is rotated."""
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=512)
    t = random_weights(cfg, seed=3)
    for i in range(cfg["num_hidden_layers"]):
        t[f"model.layers.{i}.input_layernorm.weight"][[5, 40]] *= 25.0
        t[f"model.layers.{i}.post_attention_layernorm.weight"][[7, 21]] *= 25.0
    return write_model(tmp_path_factory.mktemp("qoq-tiny"), cfg, t)


# ---- exactness of the float transforms ----

def test_smooth_attention_keeps_logits_and_scales_keys(tiny_model_dir):
    cfg, w = _load64(tiny_model_dir)
    ids = _samples(cfg)
    ref = _logits(cfg, w, ids)
    stats = collect(LlamaModel(cfg, w, np), ids, {"q": PointSpec(absmax=True), "k": PointSpec(absmax=True)},
                    progress=False)
    scales = []
    for i, lw in enumerate(w.layers):
        lam = smooth_attention(lw, stats[i]["k"].absmax, stats[i]["q"].absmax, cfg.num_heads, 0.5, 0.3)
        assert lam.shape == (cfg.num_kv_heads, cfg.head_dim)
        np.testing.assert_array_equal(lam, tie_rope_halves(lam))  # RoPE pairs (i, i + d/2) share a scale
        scales.append(lam)
    assert not np.allclose(scales[0], 1.0)
    np.testing.assert_allclose(_logits(cfg, w, ids), ref, rtol=1e-9, atol=1e-9)
    # post-RoPE keys are exactly the old keys / lambda (the scale commutes with RoPE)
    after = collect(LlamaModel(cfg, w, np), ids, {"k": PointSpec(absmax=True)}, progress=False)
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(after[i]["k"].absmax, stats[i]["k"].absmax / scales[i], rtol=1e-9)


def test_smooth_attention_search_never_worse_than_none(qoq_model_dir):
    from qserve_lite.quant.smooth_attention import alpha_beta_candidates, search_smooth_attention

    cfg, w = _load64(qoq_model_dir)
    ids = _samples(cfg, n=2, t=48, seed=6)
    spec = {p: PointSpec(absmax=True, keep_samples=2) for p in ("q", "k", "v")}
    st = LayerRunner(LlamaModel(cfg, w, np), ids).run(0, spec)
    alpha, beta, err, base = search_smooth_attention(st["q"].samples, st["k"].samples, st["v"].samples,
                                                     w.layers[0].o_proj.weight, st["k"].absmax,
                                                     st["q"].absmax, kv_bits=4, grid=10, query_stride=2)
    assert (alpha, beta) in alpha_beta_candidates(10) and len(alpha_beta_candidates(20)) == 39
    assert 0 < err <= base
    # K cached Hadamard-rotated (k_hadamard): scored as the runtime will cache it
    *_, err_h, base_h = search_smooth_attention(st["q"].samples, st["k"].samples, st["v"].samples,
                                                w.layers[0].o_proj.weight, st["k"].absmax, st["q"].absmax,
                                                kv_bits=4, grid=10, query_stride=2, k_hadamard=True)
    assert 0 < err_h <= base_h and base_h != base


def test_smooth_attention_degenerate_scales():
    from qserve_lite.quant.smooth_attention import smooth_attention_scales

    k = np.abs(np.random.default_rng(0).standard_normal((2, 8)))
    k[0, 1] = k[0, 5] = 0.0
    lam = smooth_attention_scales(k, alpha=0.5)
    assert lam[0, 1] == lam[0, 5] == 1.0 and np.all(lam > 0)
    k[1, 2] = np.inf
    np.testing.assert_array_equal(smooth_attention_scales(k), 1.0)


def test_reorder_and_smooth_proj_keep_logits(tiny_model_dir):
    cfg, w = _load64(tiny_model_dir)
    ids = _samples(cfg, seed=1)
    ref = _logits(cfg, w, ids)
    stats = collect(LlamaModel(cfg, w, np), ids, {"down_in": PointSpec(absmax=True)}, progress=False)
    for i, lw in enumerate(w.layers):
        m = stats[i]["down_in"].absmax
        perm = reorder_down(lw, m)
        assert sorted(perm) == list(range(cfg.intermediate_size)) and np.all(np.diff(m[perm]) >= 0)
        lam = smooth_proj(lw, m[perm], alpha=0.3, beta=0.7)
        assert not np.allclose(lam, 1.0)
    np.testing.assert_allclose(_logits(cfg, w, ids), ref, rtol=1e-9, atol=1e-9)


def test_transformed_statistics_equal_recollected(qoq_model_dir):
    """The pipeline collects once and transforms down_proj's statistics with reorder + smoothing; that must
    equal what a second calibration pass over the transformed layer would collect."""
    cfg, w = _load64(qoq_model_dir)
    ids = _samples(cfg, n=4, t=32, seed=2)
    config = qoq.qoq_g128(smooth_attention_search=False)
    spec = {"down_in": PointSpec(absmax=True, hessian=True, rows=50), "k": PointSpec(absmax=True)}
    runner = LayerRunner(LlamaModel(cfg, w, np), ids, batch_size=3)
    stats = runner.run(0, spec)
    qoq.transform_layer(cfg, w.layers[0], stats, config)
    again = LayerRunner(LlamaModel(cfg, w, np), ids, batch_size=2).run(0, spec)
    for field in ("absmax", "hessian", "rows"):
        np.testing.assert_allclose(getattr(stats["down_in"], field), getattr(again["down_in"], field),
                                   rtol=1e-5, atol=1e-9)
    assert again["down_in"].tokens == ids.size and again["down_in"].rows.shape == (50, cfg.intermediate_size)


# ---- GPTQ and clipping ----

def _correlated_inputs(rng, n_tokens, k):
    """Inputs with strongly correlated channels and uneven scales (where GPTQ's error feedback pays off)."""
    z = rng.standard_normal((n_tokens, k // 4))
    mix = rng.standard_normal((k // 4, k))
    return (z @ mix + 0.1 * rng.standard_normal((n_tokens, k))) * rng.uniform(0.2, 3.0, k)


@pytest.mark.parametrize("fmt", ["per_channel", "g128", "w8"])
def test_gptq_beats_rtn(fmt):
    rng = np.random.default_rng({"per_channel": 0, "g128": 1, "w8": 2}[fmt])
    n, k = 48, 200
    x = _correlated_inputs(rng, 1024, k)
    x[:, 17] = 0.0  # a dead input channel
    w = rng.standard_normal((n, k))
    h = 2.0 / len(x) * x.T @ x
    if fmt == "per_channel":
        q_rtn, q_gptq = quantize_w4_per_channel(w), gptq_w4_per_channel(w, h)
        assert q_gptq.codes.max() <= 15
        np.testing.assert_array_equal(q_gptq.scales, q_rtn.scales)  # the parameters stay fixed
    elif fmt == "g128":
        q_rtn, q_gptq = quantize_w4_group(w, 128), gptq_w4_group(w, h, 128)
        assert q_gptq.codes.shape == (n, 256) and q_gptq.codes.max() <= 15
        u8 = q_gptq.level1()
        assert u8.min() >= -128 and u8.max() <= 127
        np.testing.assert_array_equal(q_gptq.s2, q_rtn.s2)
        np.testing.assert_array_equal(q_gptq.zeros, q_rtn.zeros)
    else:
        q_rtn, q_gptq = quantize_w8_per_channel(w), gptq_w8(w, h)
        assert q_gptq.codes.dtype == np.int8
    err_rtn = np.sum((x @ (q_rtn.dequantize() - w).T) ** 2)
    err_gptq = np.sum((x @ (q_gptq.dequantize() - w).T) ** 2)
    assert err_gptq < 0.7 * err_rtn


def test_gptq_without_act_order_and_singular_hessian():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 64))  # rank 10 < 64: singular H, damping must rescue it
    w = rng.standard_normal((32, 64))
    h = x.T @ x
    q = gptq_w4_per_channel(w, h, act_order=False, block_size=16)
    assert np.all(np.isfinite(q.dequantize()))


def test_clip_search_never_increases_row_error():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((40, 96))
    w[np.arange(40), rng.integers(0, 96, 40)] *= 8.0  # one outlier per row makes clipping pay off
    x = _correlated_inputs(rng, 300, 96).astype(np.float32)
    ratios = clip_ratios(40, 0.2)
    assert ratios[0] == 1.0 and math.isclose(ratios[-1], 0.2) and len(ratios) == 41
    best, err, base = search_row_clip(w, x, ratios)
    assert np.all(err <= base)
    assert np.any(best < 1.0) and np.sum(err) < 0.9 * np.sum(base)
    # the reported error is the one of the chosen ratio
    w_hat = rtn_w4_per_channel(w, best)
    np.testing.assert_allclose(err, np.sum((x.astype(np.float64) @ (w_hat - w).T) ** 2, axis=0), rtol=1e-3)


def test_group_clip_search_lowers_weighted_error_and_keeps_int8_range():
    from qserve_lite.quant.clip import search_group_clip
    from qserve_lite.quant.gptq import progressive_params, rtn_w4_group

    rng = np.random.default_rng(8)
    w = rng.standard_normal((32, 200)) * rng.uniform(0.1, 2, (32, 1))
    w[np.arange(32), rng.integers(0, 200, 32)] *= 6.0
    h_diag = rng.uniform(0.1, 3.0, 200)
    u = progressive_params(w, 128)[0]
    ratio = search_group_clip(u, h_diag, 128, clip_ratios(20, 0.6))
    assert ratio.shape == (32, 2) and ratio.min() >= 0.6 - 1e-12 and np.any(ratio < 1)

    def weighted_err(q):
        return ((q.dequantize() - w) ** 2 * h_diag).sum(axis=1)

    clipped, plain = rtn_w4_group(w, 128, group_ratio=ratio), rtn_w4_group(w, 128)
    np.testing.assert_array_equal(plain.codes, quantize_w4_group(w, 128).codes)
    assert np.sum(weighted_err(clipped)) < np.sum(weighted_err(plain))
    u8 = clipped.level1()
    assert u8.min() >= -128 and u8.max() <= 127 and clipped.codes.max() <= 15


def test_group_clip_search_picks_each_groups_best_ratio_by_the_quantizer_formulas():
    """Brute force with the quantizer's own functions: for every ratio, s2 / z from progressive_group_params
    of the shrunk U and codes from progressive_codes; each (row, group) keeps the first ratio of least
    diag(H)-weighted error. The search must pick exactly those ratios."""
    from qserve_lite.quant.clip import search_group_clip
    from qserve_lite.quant.gptq import progressive_params
    from qserve_lite.quant.quantizers import progressive_codes, progressive_group_params

    rng = np.random.default_rng(21)
    w = rng.standard_normal((24, 300)) * rng.uniform(0.1, 2, (24, 1))
    w[np.arange(24), rng.integers(0, 300, 24)] *= 8.0
    h_diag = rng.uniform(0.0, 3.0, 300)
    u = progressive_params(w, 64)[0]
    ratios = clip_ratios(20, 0.6)
    n, G = u.shape[0], u.shape[1] // 64
    hg = np.zeros(u.shape[1])
    hg[:300] = h_diag
    ug = u.reshape(n, G, 64)
    errs = []
    for r in ratios:
        s2, z = progressive_group_params(u * r, 64)
        codes = progressive_codes(ug, s2[..., None], z[..., None])
        d = codes * s2[..., None].astype(np.float64) - z[..., None] - ug
        errs.append(((d * d) * hg.reshape(G, 64)).sum(axis=2))
    want = ratios[np.argmin(np.stack(errs), axis=0)]  # argmin: the first of equal errors, ratio 1.0 first
    got = search_group_clip(u, h_diag, 64, ratios)
    np.testing.assert_array_equal(got, want)
    assert np.any(got < 1)


def test_qk_block_clip_search(qoq_model_dir):
    cfg, w = _load64(qoq_model_dir)
    from qserve_lite.core.rope import rope_inv_freq

    ids = _samples(cfg, n=2, t=24, seed=4)
    st = LayerRunner(LlamaModel(cfg, w, np), ids).run(0, {"attn_in": PointSpec(keep_samples=2)})
    assert st["attn_in"].samples.shape == (2, 24, cfg.hidden_size)
    ratios = clip_ratios(10, 0.5)
    rq, rk = search_qk_clip(w.layers[0], st["attn_in"].samples, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            rope_inv_freq(cfg), ratios, query_stride=3)
    assert rq in ratios and rk in ratios


# ---- calibration data ----

def test_build_samples_recipe(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    docs = [FIXTURE_TEXT.read_text()[i * 3000:(i + 1) * 3000] for i in range(6)]
    a = build_samples(tok, docs, 4, 64, seed=1)
    assert a.shape == (4, 64) and a.dtype == np.int64
    np.testing.assert_array_equal(a, build_samples(tok, docs, 4, 64, seed=1))  # seeded
    assert not np.array_equal(a, build_samples(tok, docs, 4, 64, seed=2))
    # too few documents for one window each: evenly spaced windows of the whole text
    b = build_samples(tok, docs[:1], 5, 64, seed=1)
    assert b.shape[1] == 64 and 1 <= b.shape[0] <= 5
    with pytest.raises(Exception, match="fewer than one sample"):
        build_samples(tok, ["tiny"], 2, 64)


def test_python_doc_split_is_disjoint():
    try:
        calib, evaluation = calibrate.split_python_doc()
    except Exception:
        pytest.skip("python3.11-doc is not installed")
    assert not set(calib) & set(evaluation)
    assert len(evaluation) == -(-(len(calib) + len(evaluation)) // 10)


# ---- end to end ----

def _ppl(model_dir, ids):
    from qserve_lite.eval.perplexity import perplexity
    from qserve_lite.io.loader import load_model

    lm = load_model(model_dir)
    return perplexity(lm.model, ids, seq_len=128, progress=False).ppl, lm


def test_quantize_model_end_to_end(qoq_model_dir, tmp_path):
    tok = Tokenizer(qoq_model_dir)
    ids = tok.encode(FIXTURE_TEXT.read_text(), add_special_tokens=False)[:1024]
    cal = dict(n_samples=8, seq_len=64)
    fp, _ = _ppl(qoq_model_dir, ids)
    results = {}
    for name, config in [("rtn", qoq.rtn(group_size=128, **cal)),
                         ("g128", qoq.qoq_g128(**cal)),
                         ("per_channel", qoq.qoq_per_channel(clip_grid=10, **cal))]:
        report = qoq.quantize_model(qoq_model_dir, tmp_path / name, config, calib_files=[FIXTURE_TEXT],
                                    progress=False)
        results[name], lm = _ppl(report.out_dir, ids)
        assert math.isfinite(results[name])
        qc = lm.model.weights.extra["quantization_config"]
        assert qc["w_bit"] == 4 and qc["group_size"] == config.group_size and qc["kv_bit"] == 4
        assert qc["qoq"]["gptq"] == config.gptq
        assert qc["k_hadamard"] is True and lm.model.k_hadamard  # on by default
        assert qc["calibration"]["tokens"] == (0 if name == "rtn" else 8 * 64)  # RTN needs no calibration
        assert lm.precision.name == "w4a8kv4"
    # QoQ stays near the float model and well ahead of RTN, which the outlier channels hurt
    for name in ("g128", "per_channel"):
        assert abs(math.log(results[name] / fp)) < 0.05, results
        assert abs(math.log(results[name] / fp)) < 0.5 * abs(math.log(results["rtn"] / fp)), results


def test_quantize_cli_w8a8(qoq_model_dir, tmp_path):
    from qserve_lite.cli import main
    from qserve_lite.io.loader import load_model

    out = tmp_path / "w8"
    rc = main(["quantize", "--model", str(qoq_model_dir), "--out", str(out), "--precision", "w8a8kv8",
               "--calib-text", str(FIXTURE_TEXT), "--calib-tokens", "256", "--calib-seq-len", "64"])
    assert rc == 0
    lm = load_model(out)
    qc = lm.model.weights.extra["quantization_config"]
    assert (qc["w_bit"], qc["kv_bit"], qc["group_size"]) == (8, 8, -1)
    assert qc["calibration"]["n_samples"] == 4 and lm.precision.name == "w8a8kv8"


def test_blocked_gptq_equals_textbook_recursion():
    """Lazy batch updates (blocks of 128, sub-blocks of 16) give the column-by-column GPTQ result."""
    from qserve_lite.quant.gptq import _inverse_cholesky_upper, gptq, per_channel_w4_column
    from qserve_lite.quant.quantizers import w4_per_channel_params

    rng = np.random.default_rng(11)
    x = _correlated_inputs(rng, 400, 300)
    w = rng.standard_normal((24, 300))
    h = 2.0 / len(x) * x.T @ x
    quant = per_channel_w4_column(*w4_per_channel_params(w))
    got = gptq(w, h, quant, block_size=128)
    perm = np.argsort(-np.diag(h), kind="stable")
    hp = h[perm][:, perm]
    u = _inverse_cholesky_upper(hp, 0.01)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(hp + 0.01 * np.mean(np.diag(h)) * np.eye(300)),
                               rtol=1e-6, atol=1e-9)
    wp = w[:, perm].copy()
    ref = np.empty_like(wp)
    for i in range(300):
        ref[:, i] = quant(int(perm[i]), wp[:, i])
        wp[:, i + 1:] -= np.outer((wp[:, i] - ref[:, i]) / u[i, i], u[i, i + 1:])
    expect = np.empty_like(ref)
    expect[:, perm] = ref
    np.testing.assert_allclose(got, expect, atol=1e-9)


# ---- where the calibration forwards run ----

def test_calibration_defaults_follow_the_calibration_device(monkeypatch):
    """A machine with a GPU still calibrates on the CPU unless asked, and then with the CPU's sizes (128 x
    1024 tokens of numpy forwards would take an hour there); calib_device "gpu" takes deepcompressor's."""
    monkeypatch.setattr(calibrate, "gpu_available", lambda: True)
    cpu = qoq.qoq_g128()
    assert cpu.calib_device == "cpu"
    assert cpu.calibration_size() == (16, 512) and cpu.clip_search_stride() == 4
    gpu = qoq.qoq_g128(calib_device="gpu")
    assert gpu.calibration_size() == (128, 1024) and gpu.clip_search_stride() == 1
    assert qoq.qoq_g128(calib_device="gpu", n_samples=8, seq_len=64).calibration_size() == (8, 64)
    with pytest.raises(qoq.QServeLiteError, match="calib_device"):
        qoq.qoq_g128(calib_device="tpu")


@pytest.mark.parametrize("gpu,device,expect", [(True, "auto", "gpu"), (False, "auto", "cpu"),
                                                (True, "cpu", "cpu")])
def test_quantize_cli_calibrates_on_the_gpu_when_there_is_one(monkeypatch, tmp_path, gpu, device, expect):
    """`quantize --device auto` (the default) calibrates on a GPU when cupy sees one, else on the CPU; the
    CLI's step flags (here --rotation-seed) reach the QoQConfig."""
    from qserve_lite import cli
    from qserve_lite.core import backend as device_mod

    monkeypatch.setattr(device_mod, "gpu_unavailable_reason", lambda: None if gpu else "no GPU here")
    seen = {}

    def fake_quantize_model(model, out, config, **kw):
        seen["config"] = config
        return qoq.QuantizeReport(Path(out), 0.0, 0.0, 0, [])

    monkeypatch.setattr(cli, "quantize_model", fake_quantize_model)
    args = ["quantize", "--model", "m", "--out", str(tmp_path / "q"), "--rotation-seed", "5"]
    assert cli.main(args + (["--device", device] if device != "auto" else [])) == 0
    config = seen["config"]
    assert config.calib_device == expect and config.rotation_seed == 5
    assert config.calibration_size() == ((128, 1024) if expect == "gpu" else (16, 512))


def test_gpu_calibration_without_a_gpu_is_a_clear_error(qoq_model_dir, tmp_path, monkeypatch, capsys):
    from qserve_lite.cli import main

    monkeypatch.setattr(calibrate, "gpu_available", lambda: False)
    rc = main(["quantize", "--model", str(qoq_model_dir), "--out", str(tmp_path / "q"), "--device", "gpu",
               "--calib-text", str(FIXTURE_TEXT)])
    assert rc != 0 and "needs cupy and a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_point_reducer_stats(qoq_model_dir):
    """The reducer's absmax, X^T X, strided rows and kept samples (the same code reduces cupy batches on the
    device)."""
    x = np.random.default_rng(1).standard_normal((4, 10, 6)).astype(np.float32)
    red = calibrate._PointReducer(PointSpec(absmax=True, hessian=True, rows=5, keep_samples=3), 40)
    red.update(x[:2], 0)
    red.update(x[2:], 2)
    st = red.finish()
    flat = x.reshape(40, 6).astype(np.float64)
    np.testing.assert_allclose(st.absmax, np.abs(flat).max(axis=0))
    np.testing.assert_allclose(st.hessian, flat.T @ flat, rtol=1e-5)
    assert st.tokens == 40 and st.rows.shape == (5, 6) and st.samples.shape == (3, 10, 6)
    np.testing.assert_array_equal(st.rows, x.reshape(40, 6)[np.linspace(0, 39, 5).round().astype(int)])


# ---- streaming: one float layer in memory ----

@pytest.mark.parametrize("make", [
    lambda: qoq.qoq_g128(n_samples=2, seq_len=32, clip_rows=16),
    lambda: qoq.qoq_per_channel(n_samples=2, seq_len=32, clip_rows=16, rotation_seed=1),
    lambda: qoq.qoq_g128(n_samples=2, seq_len=32, rotation=False, propagate=True),
])
def test_streamed_layers_quantize_exactly_like_the_loaded_model(qoq_model_dir, make):
    """quantize_model reads each decoder layer only when the pipeline reaches it (LayerReader); the codes
    and scales must be those of the same pipeline run on the fully loaded model."""
    from qserve_lite.io.hf_weights import LayerReader

    cfg = ModelConfig.from_file(qoq_model_dir / "config.json")
    samples = np.random.default_rng(4).integers(3, cfg.vocab_size, (2, 32))
    full = load_llama_weights(cfg, qoq_model_dir, dtype=np.float64)
    lazy = load_llama_weights(cfg, qoq_model_dir, dtype=np.float64, layers=False)
    assert all(lw is None for lw in lazy.layers)
    qoq.quantize_weights(cfg, full, samples, make(), progress=False)
    reads = []
    with LayerReader(cfg, qoq_model_dir, dtype=np.float64) as reader:
        def read(i):
            assert all(lw is None for lw in lazy.layers[i:])  # layers are read in order, one at a time
            reads.append(i)
            return reader(i)
        qoq.quantize_weights(cfg, lazy, samples, make(), progress=False, read_layer=read)
    assert reads == list(range(cfg.num_layers))
    np.testing.assert_array_equal(lazy.embed_tokens, full.embed_tokens)
    np.testing.assert_array_equal(lazy.lm_head.weight, full.lm_head.weight)
    for a, b in zip(lazy.layers, full.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            qa, qb = getattr(a, name).qweight, getattr(b, name).qweight
            arrays = {k: v for k, v in vars(qb).items() if isinstance(v, np.ndarray)}
            assert "codes" in arrays
            for field_name, arr in arrays.items():
                np.testing.assert_array_equal(getattr(qa, field_name), arr, err_msg=f"{name}.{field_name}")


def test_quantize_weights_needs_a_reader_for_missing_layers(qoq_model_dir):
    cfg = ModelConfig.from_file(qoq_model_dir / "config.json")
    lazy = load_llama_weights(cfg, qoq_model_dir, dtype=np.float64, layers=False)
    with pytest.raises(ValueError, match="no read_layer"):
        qoq.quantize_weights(cfg, lazy, None, qoq.rtn(), progress=False)
