"""The decode attention's fused o_proj input (issue 16, `decode_attention(quant_out=)`) on the CPU: the twin
is the composition quantize_per_token(decode_attention(...)), buffers are checked, and the GPU model
(model/gpu_model.py, on the numpy twins) routes the o_proj input through it exactly when the switch
(kernels/fusions.py) is on and the model's activations are int8, with the same tokens either way. The kernel
itself is checked against this composition bit for bit in test_attention_gpu.py (pytest -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.precision import Precision
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.kernels.act_quant import QuantizedActivation, quantize_per_token
from qserve_lite.kernels.attention import decode_attention, rope_write_kv
from qserve_lite.kernels.fusions import ATTN_QUANT_ENV, FUSIONS_ENV
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.model import gpu_model
from qserve_lite.model.gpu_model import DeviceWeights
from qserve_lite.model.random_weights import random_host_weights
from qserve_lite.sampling_params import SamplingParams


def decode_case(r, lens, h, kvh, d, bits):
    """q [B, h, d] and a pool holding random K/V of sequences of `lens` tokens (zero-length ones allowed)."""
    need = [max(1, -(-n // 64)) for n in lens]
    pool = PagedKVPool(1, sum(need), kvh, d, bits, fill=0)
    bt = np.zeros((len(lens), max(need)), dtype=np.int32)
    slots, at = [], 0
    for i, n in enumerate(lens):
        bt[i, : need[i]] = np.arange(at, at + need[i])
        at += need[i]
        p = np.arange(n)
        slots.append(bt[i, p // 64] * 64 + p % 64)
    total = sum(lens)
    k = (r.standard_normal((total, kvh, d)) * 2).astype(np.float16)
    v = (r.standard_normal((total, kvh, d)) * r.uniform(0.01, 30.0, (total, 1, 1))).astype(np.float16)
    rope_write_kv(np.zeros((total, 1, d), np.float16), k, v, np.zeros(total), np.ones(d // 2), pool, 0,
                  np.concatenate(slots), rope=False)
    q = r.standard_normal((len(lens), h, d)).astype(np.float16)
    return q, pool, bt, np.array(lens, dtype=np.int32)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("with_sums", [True, False])
def test_quant_out_is_quantize_per_token_of_the_output(bits, with_sums):
    r = np.random.default_rng(bits)
    h, kvh, d, lens = 8, 2, 64, [1, 70, 0, 130, 5]
    q, pool, bt, ctx = decode_case(r, lens, h, kvh, d, bits)
    B = len(lens)
    plain = decode_attention(q, pool, 0, bt, ctx)
    codes = np.full((B, h * d), 99, np.int8)
    scales = np.full(B, np.nan, np.float16)
    sums = np.full(B, np.nan, np.float32) if with_sums else None
    out = np.full((B, h, d), np.nan, np.float16)
    got = decode_attention(q, pool, 0, bt, ctx, out=out, quant_out=(codes, scales, sums))
    assert got is out and np.array_equal(out.view(np.uint16), plain.view(np.uint16))
    want = quantize_per_token(plain.reshape(B, h * d), with_sums=with_sums)
    assert np.array_equal(codes, want.q)
    assert np.array_equal(scales.view(np.uint16), want.scales.view(np.uint16))
    assert (codes[ctx > 0] != 0).any() and (codes[2] == 0).all() and scales[2] == 1.0  # a zero row: scale 1
    assert np.abs(codes).max() == 127 and (codes >= -127).all()
    if with_sums:
        assert np.array_equal(sums.view(np.uint32), want.sums.view(np.uint32))


def test_quant_out_accepts_a_quantized_activation_without_sums():
    r = np.random.default_rng(1)
    q, pool, bt, ctx = decode_case(r, [40, 200], 4, 4, 128, 4)
    qa = QuantizedActivation(np.empty((2, 512), np.int8), np.empty(2, np.float16), None)
    res = decode_attention(q, pool, 0, bt, ctx, quant_out=qa)
    want = quantize_per_token(res.reshape(2, 512), with_sums=False)
    assert np.array_equal(qa.q, want.q) and np.array_equal(qa.scales, want.scales)


@pytest.mark.parametrize("quant_out,match", [
    ([np.zeros((2, 256), np.int8), np.zeros(2, np.float16)], "expected \\(codes, scales"),
    ((np.zeros((2, 256), np.int8),), "expected \\(codes, scales"),
    ((np.zeros((2, 255), np.int8), np.zeros(2, np.float16)), "codes: expected int8 \\(2, 256\\)"),
    ((np.zeros((2, 256), np.uint8), np.zeros(2, np.float16)), "codes: expected int8"),
    ((np.zeros((2, 256), np.int8), np.zeros(2, np.float32)), "scales: expected float16 \\(2,\\)"),
    ((np.zeros((2, 256), np.int8), np.zeros(2, np.float16), np.zeros(3, np.float32)), "sums: expected"),
])
def test_quant_out_rejects_bad_buffers(quant_out, match):
    q, pool, bt, ctx = decode_case(np.random.default_rng(2), [3, 9], 4, 2, 64, 8)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, pool, 0, bt, ctx, quant_out=quant_out)


# ---- the GPU model's wiring, on the numpy twins ----

SHAPE = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2,
         "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 320}  # GQA 4
CFG = ModelConfig.from_dict(tiny_config(**SHAPE, max_position_embeddings=512))
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256, num_pages=24,
                      device="cpu")
PROMPTS = [np.random.default_rng(0).integers(0, 320, size=n).tolist() for n in (5, 33, 70)]


def greedy_with_spies(monkeypatch, precision: str, group: int, fused: bool):
    """Greedy tokens of a random model on the twin runner, with how many decode_attention calls got a
    quant_out (and whether it asked for sums), and how many o_proj inputs were quantized separately."""
    monkeypatch.setenv(FUSIONS_ENV, "1" if fused else "0")
    monkeypatch.setenv(ATTN_QUANT_ENV, "1")  # off by default until it has run on a GPU
    seen = {"quant_out": 0, "plain": 0, "sums": set(), "separate": 0}
    real_attn, real_quant = decode_attention, quantize_per_token  # the kernels' own, not an earlier spy

    def attn(*args, quant_out=None, **kw):
        seen["quant_out" if quant_out is not None else "plain"] += 1
        if quant_out is not None:
            seen["sums"].add(quant_out.sums is not None)
        return real_attn(*args, quant_out=quant_out, **kw)

    def quant(x, xp=np, with_sums=True):
        seen["separate"] += 1
        return real_quant(x, xp, with_sums)

    monkeypatch.setattr(gpu_model, "decode_attention", attn)
    monkeypatch.setattr(gpu_model, "quantize_per_token", quant)
    p = Precision.parse(precision)
    weights = DeviceWeights.from_host(CFG, random_host_weights(CFG, p, group, seed=3), p, np)
    engine = LLMEngine(None, CONFIG.replace(num_pages=None), runner=GPUModelRunner(weights, CONFIG, xp=np))
    ids = [engine.add_request(pr, SamplingParams(max_tokens=6, ignore_eos=True)) for pr in PROMPTS]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids], seen, weights.mode


@pytest.mark.parametrize("precision,group", [("w4a8kv4", 128), ("w4a8kv4", -1), ("w8a8kv8", 128),
                                             ("w16a16", 128)])
def test_gpu_model_fuses_the_o_proj_quantization_only_when_switched_on(monkeypatch, precision, group):
    tokens_on, on, mode = greedy_with_spies(monkeypatch, precision, group, fused=True)
    tokens_off, off, _ = greedy_with_spies(monkeypatch, precision, group, fused=False)
    assert tokens_on == tokens_off
    assert off["quant_out"] == 0 and off["plain"] > 0
    if mode == "f16":  # float activations: nothing to quantize, same calls either way
        assert on["quant_out"] == 0 and on["separate"] == off["separate"] == 0
        return
    assert on["plain"] == 0 and on["quant_out"] == off["plain"]  # every decode attention call fused
    assert on["sums"] == {mode == "w4_per_channel"}  # sums only for the per-channel W4 epilogue
    assert off["separate"] - on["separate"] == off["plain"]  # one separate quantization less per call
