"""Megatron splits (model/tp_split.py) checked by a numpy "virtual TP": shard the weights, run every rank's
part with the numpy reference (the emulation's integer semantics), sum the partials as the all-reduce
does, and compare with tp = 1.

Measured tolerances (documented in model/tp_split.py; the bounds below leave about 2x margin):
- column splits (q/k/v, gate/up): bit-identical to the tp = 1 columns, every format;
- row splits (o_proj, down_proj), given the same int8 input codes: the ranks' integer accumulators sum
  exactly to the tp = 1 accumulator; after each rank's fp32 epilogue, its fp16 rounding and the fp16 sum, the
  output differs from tp = 1's by those fp16 roundings only (half an ulp of each partial, of the sum and of
  tp = 1's output);
- row splits as they run (each rank quantizes its own K slice per token): one int8 re-quantization's noise,
  0.7% (W8A8, W4A8 g128) to 1.3% (W4A8 per-channel) of the output's RMS;
- a whole 4-layer random model, 128-token prefill logits: float (w16a16) to fp32 rounding (< 1e-6 relative);
  quantized 2.6% (W8A8), 2.8% (W4A8 g128), 8% (W4A8 per-channel) of the largest logit, 94-98% argmax
  agreement on flat random logits - the size of the twin-vs-emulation tolerance of
  tests/engine/test_gpu_runner_twin.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.precision import Precision
from qserve_lite.core.rope import rope_cos_sin
from qserve_lite.errors import ConfigError
from qserve_lite.kernels.act_quant import quantize_per_token
from qserve_lite.kernels.kv_quant import KVFakeQuantizer
from qserve_lite.kernels.w4a8_gemm import group_level1, w4a8_group_epilogue, w4a8_per_channel_epilogue
from qserve_lite.kernels.w8a8_gemm import exact_int_matmul, w8a8_epilogue
from qserve_lite.model.attention import ContiguousAttention
from qserve_lite.model.gpu_model import DeviceWeights
from qserve_lite.model.llama import LlamaModel, rms_norm
from qserve_lite.model.random_weights import build_random_weights, random_host_weights
from qserve_lite.model.tp_split import check_splits, rank_config, shard_weights, split_columns, split_rows

FORMATS = [("w4a8kv4", 128), ("w4a8kv4", -1), ("w8a8kv8", 128), ("w16a16", 128)]


def small_config(arch: str = "LlamaForCausalLM", **over) -> ModelConfig:
    base = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, num_hidden_layers=4, vocab_size=512, max_position_embeddings=512,
                tie_word_embeddings=False)
    return ModelConfig.from_dict(tiny_config(arch, **(base | over)))


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return small_config()


@pytest.fixture(scope="module", params=FORMATS, ids=[f"{p}-g{g}" for p, g in FORMATS])
def model(request, cfg):
    precision, g = request.param
    p = Precision.parse(precision)
    return p, random_host_weights(cfg, p, g, seed=1)


# ---- the checks before loading ----

@pytest.mark.parametrize("over,tp,w_bits,g,words", [
    (dict(num_attention_heads=6, num_key_value_heads=2, head_dim=64, hidden_size=384), 4, 16, None,
     "6 attention heads do not divide by 4"),
    (dict(num_attention_heads=8, num_key_value_heads=8, head_dim=32), 3, 16, None, "do not divide by 3"),
    (dict(num_attention_heads=12, num_key_value_heads=3, head_dim=32, hidden_size=384), 2, 16, None,
     "3 KV heads neither divide by 2"),
    (dict(intermediate_size=502), 4, 16, None, "intermediate_size 502 does not divide by 4"),
    (dict(num_attention_heads=8, hidden_size=512, intermediate_size=768), 4, 4, 128,
     "down_proj gets 192 input channels per rank, not a multiple of the W4 group size 128"),
    (dict(), 4, 4, 128, "o_proj gets 64 input channels per rank"),
    (dict(intermediate_size=192), 4, 4, -1,
     "down_proj gets 48 input channels per rank, not a multiple of 32"),
])
def test_shapes_that_cannot_split_fail_in_one_line(over, tp, w_bits, g, words):
    with pytest.raises(ConfigError) as e:
        check_splits(small_config(**over), tp, w_bits, g, name="m")
    message = str(e.value)
    assert message.startswith(f"m cannot run with tensor_parallel_size {tp}:") and words in message
    assert "\n" not in message


def test_shapes_that_split(cfg):
    for tp, w_bits, g in [(1, 4, 128), (2, 4, 128), (2, 4, -1), (4, 8, None), (4, 16, None)]:
        check_splits(cfg, tp, w_bits, g)
    llama70 = small_config(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                           num_key_value_heads=8, head_dim=128)
    for tp in (2, 4, 8):
        check_splits(llama70, tp, 4, 128)
    assert rank_config(llama70, 8).num_kv_heads == 1 and rank_config(llama70, 2).intermediate_size == 14336
    with pytest.raises(ConfigError):
        check_splits(cfg, 0)


# ---- one linear ----

def _outputs(lin, x):
    return np.asarray(lin(x), np.float32)


def test_column_splits_match_the_full_linear(model, cfg):
    """Integer paths: bit-identical. Float weights (w16): within a few ulp, since the BLAS may pick another
    summation order for a narrower matrix (seen with OpenBLAS on a 2-core CI machine: 7e-7 at 2.06)."""
    p, w = model
    lw = w.layers[0]
    x = np.random.default_rng(0).standard_normal((7, cfg.hidden_size)).astype(np.float32)
    for lin in (lw.q_proj, lw.k_proj, lw.gate_proj):
        full = _outputs(lin, x)
        n = lin.out_features
        for sl in (slice(0, n // 2), slice(n // 2, n)):
            part = _outputs(split_columns(lin, sl), x)
            if p.w_bits == 16:
                np.testing.assert_allclose(part, full[:, sl], rtol=2e-6, atol=1e-6)
            else:
                assert np.array_equal(part, full[:, sl])


def _row_parts(lin, tp):
    k = lin.in_features // tp
    return [split_rows(lin, slice(r * k, (r + 1) * k), keep_bias=r == 0) for r in range(tp)]


def _int_weight(lin):
    q = lin.qweight
    if hasattr(q, "s2"):
        return group_level1(q.codes, q.s2, q.zeros, q.group_size).astype(np.int64)
    return q.codes.astype(np.int64)


def _epilogue(lin, acc, qa):
    q = lin.qweight
    if hasattr(q, "s2"):
        return w4a8_group_epilogue(acc, qa.scales, q.s1)
    if hasattr(q, "szeros"):
        return w4a8_per_channel_epilogue(acc, qa.scales, qa.sums, q.scales, q.szeros)
    return w8a8_epilogue(acc, qa.scales, q.scales)


def test_row_splits_sum_exactly_in_integers(model):
    """Given the same int8 input codes, the ranks' accumulators add up to tp = 1's exactly; the fp16 output
    after per-rank epilogues and the fp16 sum differs only by the fp16 roundings: of each partial (half an
    ulp of |y_r|), of the sum and of tp = 1's output (half an ulp of |y| each)."""
    p, w = model
    if p.w_bits == 16:
        pytest.skip("float weights have no integer part")
    lw = w.layers[1]
    x = np.random.default_rng(2).standard_normal((9, lw.down_proj.in_features)).astype(np.float32)
    qa = quantize_per_token(x)
    full = exact_int_matmul(qa.q, _int_weight(lw.down_proj))
    tp, k = 2, lw.down_proj.in_features // 2
    parts = _row_parts(lw.down_proj, tp)
    accs = [exact_int_matmul(qa.q[:, r * k:(r + 1) * k], _int_weight(part)) for r, part in enumerate(parts)]
    assert np.array_equal(sum(a.astype(np.int64) for a in accs), full)
    y1 = _epilogue(lw.down_proj, full, qa).astype(np.float32)
    partials = []
    for r, (part, acc) in enumerate(zip(parts, accs, strict=True)):
        x_r = x[:, r * k:(r + 1) * k]  # per-channel W4: the local slice's sum
        qa_r = qa._replace(sums=x_r.astype(np.float16).astype(np.float64).sum(-1).astype(np.float32))
        partials.append(_epilogue(part, acc, qa_r).astype(np.float64))
    y2 = sum(partials).astype(np.float16).astype(np.float32)
    bound = 1.01 * 2.0**-11 * (sum(np.abs(y) for y in partials) + np.abs(y1) + np.abs(y2)) + 2.0**-24
    assert np.all(np.abs(y2 - y1) <= bound)
    assert np.mean(y2 != y1) < 0.5  # most outputs are exactly tp = 1's


def test_row_splits_as_they_run(model):
    """Each rank quantizes its own K slice (its own per-token scale): one re-quantization's noise."""
    p, w = model
    lw = w.layers[1]
    x = np.random.default_rng(3).standard_normal((16, lw.down_proj.in_features)).astype(np.float32)
    y1 = _outputs(lw.down_proj, x)
    k = x.shape[1] // 2
    parts = _row_parts(lw.down_proj, 2)
    y2 = sum(_outputs(part, x[:, r * k:(r + 1) * k]).astype(np.float64) for r, part in enumerate(parts))
    rel = np.sqrt(np.mean((y2 - y1) ** 2)) / np.sqrt(np.mean(y1**2))
    assert rel < (1e-3 if p.w_bits == 16 else 0.02), rel


# ---- the whole model ----

def _reference(cfg, weights, p):
    m = LlamaModel(cfg, weights, np, kv_quantizer=KVFakeQuantizer(p.kv_bits) if p.kv_bits < 16 else None)
    m.fp16_activations = p.w_bits < 16
    return m


def _all_reduce(parts, fp16: bool):
    """The sum of the ranks' outputs as NCCL gives it (fp16 activations: one rounding of the exact sum)."""
    s = np.sum([np.asarray(x, np.float64) for x in parts], axis=0)
    return s.astype(np.float16).astype(np.float32) if fp16 else s.astype(np.float32)


def virtual_tp_logits(cfg, weights, p, tp, tokens):
    """Prefill logits [T, vocab] of the model split over tp virtual ranks, with the all-reduces."""
    models = [_reference(rank_config(cfg, tp), shard_weights(weights, cfg, tp, r), p) for r in range(tp)]
    m0, T = models[0], len(tokens)
    attns = [ContiguousAttention(m.new_cache(1, T), 0, True) for m in models]
    cos, sin = rope_cos_sin(np.arange(T), m0.inv_freq, np, dtype=np.float32)
    h = weights.embed_tokens[np.asarray(tokens)][None]
    for i in range(cfg.num_layers):
        lws = [m.weights.layers[i] for m in models]
        x = rms_norm(h, lws[0].input_norm, cfg.rms_norm_eps, np)
        attn = [m.attention(i, lw, x, cos, sin, a, 0) for m, lw, a in zip(models, lws, attns, strict=True)]
        h = m0._fp16(h + _all_reduce(attn, m0.fp16_activations))
        x = rms_norm(h, lws[0].post_attn_norm, cfg.rms_norm_eps, np)
        h = m0._fp16(h + _all_reduce([m.mlp(i, lw, x) for m, lw in zip(models, lws, strict=True)],
                                     m0.fp16_activations))
    return m0.logits(m0._fp16(rms_norm(h[0], weights.final_norm, cfg.rms_norm_eps, np)))


def test_tp1_virtual_forward_is_the_reference(cfg, model):
    p, w = model
    tokens = np.arange(5, 60)
    ref = _reference(cfg, w, p)
    expect = ref.logits(ref.forward(tokens[None], ref.new_cache(1, len(tokens)), fresh_new_kv=True)[0])
    assert np.array_equal(virtual_tp_logits(cfg, w, p, 1, tokens), expect)


def test_virtual_tp_follows_tp1(cfg, model):
    p, w = model
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 128)
    ref = virtual_tp_logits(cfg, w, p, 1, tokens)
    bound, min_agree = (1e-5, 1.0) if p.w_bits == 16 else (0.2, 0.85)
    for tp in (2, 4):
        if p.w_bits == 4 and tp == 4:  # K per rank 64: below the W4 group size (check_splits refuses it)
            continue
        out = virtual_tp_logits(cfg, w, p, tp, tokens)
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        agree = np.mean(out.argmax(-1) == ref.argmax(-1))
        assert rel < bound and agree >= min_agree, (tp, rel, agree)


def test_kv_heads_replicated_when_fewer_than_ranks():
    """2 KV heads over 4 ranks: ranks 0-1 hold KV head 0, ranks 2-3 KV head 1; the result is tp = 1's."""
    cfg = small_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=512, num_hidden_layers=2)
    p = Precision.parse("w16a16")
    w = random_host_weights(cfg, p, seed=4)
    k = w.layers[0].k_proj.weight
    for rank in range(4):
        shard = shard_weights(w, cfg, 4, rank).layers[0]
        assert shard.q_proj.out_features == 2 * 64
        assert np.array_equal(shard.k_proj.weight, k[(rank // 2) * 64:(rank // 2 + 1) * 64])
    tokens = np.arange(3, 40)
    ref = virtual_tp_logits(cfg, w, p, 1, tokens)
    assert np.abs(virtual_tp_logits(cfg, w, p, 4, tokens) - ref).max() < 1e-5 * np.abs(ref).max()


def test_bias_rows_go_with_their_columns():
    """Qwen2's q/k/v biases are split with the output channels."""
    cfg_q = small_config("Qwen2ForCausalLM", num_hidden_layers=1)
    assert cfg_q.qkv_bias
    p = Precision.parse("w4a8kv4")
    w = random_host_weights(cfg_q, p, 128, seed=5)
    shard = shard_weights(w, cfg_q, 2, 1).layers[0]
    assert np.array_equal(shard.q_proj.bias, w.layers[0].q_proj.bias[128:])
    assert shard.o_proj.bias is None
    tokens = np.arange(3, 50)
    ref = virtual_tp_logits(cfg_q, w, p, 1, tokens)
    out = virtual_tp_logits(cfg_q, w, p, 2, tokens)
    assert np.abs(out - ref).max() < 0.2 * np.abs(ref).max()


def test_random_host_weights_are_the_device_builders(cfg):
    """random_host_weights uploads to exactly build_random_weights(xp=numpy)'s arrays."""
    for precision, g in FORMATS:
        p = Precision.parse(precision)
        direct = build_random_weights(cfg, p, g, xp=np, seed=7)
        up = DeviceWeights.from_host(cfg, random_host_weights(cfg, p, g, seed=7), p, np)
        assert up.mode == direct.mode
        for a, b in zip(up.layers, direct.layers, strict=True):
            for name in ("qkv", "o_proj", "gate_up", "down"):
                la, lb = getattr(a, name), getattr(b, name)
                for f in ("weight", "scales", "szeros", "s2_scales", "s2_zeros"):
                    va, vb = getattr(la, f), getattr(lb, f)
                    assert (va is None) == (vb is None) and (va is None or np.array_equal(va, vb)), (name, f)
        assert np.array_equal(up.lm_head, direct.lm_head) and np.array_equal(up.embed, direct.embed)
