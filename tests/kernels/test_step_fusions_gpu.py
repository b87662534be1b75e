"""The decode-step fusions (issue 16) on the GPU (pytest -m gpu; skipped without a GPU): cuda/argmax.cu
against numpy.argmax, the RMSNorm row kernel gathering its rows (the embeddings) and loading its residual
and weight early, and the RoPE / KV writer in its wide decode block with 32-bit channel pairs, each against
its numpy twin and against the unfused path ($QSERVE_LITE_STEP_FUSIONS=0), bit for bit; then greedy decoding
of a small random model (CUDA graphs) with the fusions on and off (including the decode attention writing the
o_proj input, checked bit for bit in test_attention_gpu.py), token for token."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import cupy_or_skip

from qserve_lite.core.rope import rope_inv_freq
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.io.shipped_configs import load_config
from qserve_lite.kernels.argmax import argmax_rows
from qserve_lite.kernels.attention import decode_attention, rope_write_kv
from qserve_lite.kernels.fusions import ATTN_QUANT_ENV, FUSIONS_ENV
from qserve_lite.kernels.norm_quant import rms_norm, rms_norm_quant
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.model import gpu_model
from qserve_lite.model.random_weights import build_random_weights
from qserve_lite.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()


def fusions(monkeypatch, on: bool) -> None:
    monkeypatch.setenv(FUSIONS_ENV, "1" if on else "0")
    monkeypatch.setenv(ATTN_QUANT_ENV, "1")  # the attention-quant fusion follows the step switch when enabled


def poison_pool(nbytes: int = 256 << 20) -> None:
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    block = cp.full(nbytes, 0x7F, dtype=cp.uint8)
    del block


def same(a_gpu, b_np, what: str) -> None:
    a, b = cp.asnumpy(a_gpu), np.asarray(b_np)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, a.dtype, b.shape, b.dtype)
    bad = a.view(np.uint8) != b.view(np.uint8) if a.dtype.kind == "f" else a != b
    assert not bad.any(), f"{what}: {int(bad.sum())} differ, first at {np.argwhere(bad)[0]}"


# ---- argmax ----

def _all_minus_inf(row):
    row[:] = -np.inf


def _signed_zeros_max(row):
    row[:] = -np.abs(row) - 1
    row[[len(row) // 3, -1]] = [0.0, -0.0]


def _two_nans(row):
    row[[-1, len(row) // 2]] = np.nan


def _inf_last(row):
    row[-1] = np.inf


def _all_zero(row):
    row[:] = 0.0
    row[0] = -0.0


def logits(r, m: int, n: int) -> np.ndarray:
    """Random rows, half of them coarse (many ties at the maximum, over threads and splits); the first rows
    special (all -inf; zeros of both signs as the maximum; two NaNs; +inf last; all zero)."""
    x = r.standard_normal((m, n)).astype(np.float32)
    x[::2] = np.round(x[::2] * 2)
    for row, fill in zip(x, (_all_minus_inf, _signed_zeros_max, _two_nans, _inf_last, _all_zero),
                         strict=False):
        fill(row)
    return x


@pytest.mark.parametrize("m", [1, 3, 64, 256, 700])
@pytest.mark.parametrize("n", [128256, 32001, 4096, 5])
def test_argmax_matches_numpy(m, n):
    x = logits(np.random.default_rng(m * 7 + n), m, n)
    want = np.argmax(x, axis=-1).astype(np.int32)
    got = argmax_rows(cp.asarray(x), cp)
    same(got, want, "argmax")


@pytest.mark.parametrize("offset,pad", [(0, 3), (1, 4), (2, 0)])
def test_argmax_strided_and_unaligned_rows(offset, pad):
    r = np.random.default_rng(offset)
    m, n = 40, 32000
    big = logits(r, m, n + offset + pad)
    view = cp.asarray(big)[:, offset : offset + n]
    same(argmax_rows(view, cp), np.argmax(big[:, offset : offset + n], axis=-1).astype(np.int32), "argmax")


def test_argmax_unfused_path_agrees(monkeypatch):
    x = cp.asarray(logits(np.random.default_rng(1), 256, 128256))
    fused = argmax_rows(x, cp)
    fusions(monkeypatch, False)
    same(argmax_rows(x, cp), cp.asnumpy(fused), "cupy argmax vs the kernel")


# ---- embedding gather + RMSNorm (+ quant), early residual / weight loads ----

@pytest.mark.parametrize("k", [4096, 8192, 77])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("on", [True, False])
def test_gathered_norm_matches_twin(monkeypatch, k, with_residual, on):
    fusions(monkeypatch, on)
    r = np.random.default_rng(k)
    table = (r.standard_normal((1000, k)) * r.uniform(0.1, 3.0, (1000, 1))).astype(np.float16)
    ids = r.integers(0, 1000, 300).astype(np.int32)
    ids[:3] = [0, 999, 0]
    gamma = (1 + 0.1 * r.standard_normal(k)).astype(np.float16)
    res = r.standard_normal((300, k)).astype(np.float16) if with_residual else None
    poison_pool()
    g_table, g_ids, g_gamma = cp.asarray(table), cp.asarray(ids), cp.asarray(gamma)
    g_res = None if res is None else cp.asarray(res)
    qa, new_res = rms_norm_quant(g_table, g_gamma, 1e-5, g_res, cp, gather=g_ids)
    y, new_res2 = rms_norm(g_table, g_gamma, 1e-5, g_res, cp, gather=g_ids)
    ref_qa, ref_res = rms_norm_quant(table[ids], gamma, 1e-5, res)
    ref_y, _ = rms_norm(table[ids], gamma, 1e-5, res)
    checks = [("q", qa.q, ref_qa.q), ("scales", qa.scales, ref_qa.scales), ("sums", qa.sums, ref_qa.sums),
              ("residual", new_res, ref_res), ("residual (rms_norm)", new_res2, ref_res), ("y", y, ref_y)]
    for name, a, b in checks:
        same(a, b, name)


# ---- RoPE + KV writer: wide decode block, 32-bit pairs ----

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def run_writer(qkv, pos, slots, inv_freq, h, kvh, d, bits, khad, np_pool):
    g_qkv = cp.asarray(qkv)
    width = (h + 2 * kvh) * d
    q = g_qkv[:, : h * d].reshape(-1, h, d)
    k = g_qkv[:, h * d : (h + kvh) * d].reshape(-1, kvh, d)
    v = g_qkv[:, (h + kvh) * d : width].reshape(-1, kvh, d)
    pool = PagedKVPool(2, np_pool.num_pages, kvh, d, bits, cp)
    pool.pool[...] = cp.asarray(np_pool.pool)
    rope_write_kv(q, k, v, cp.asarray(pos), cp.asarray(inv_freq), pool, 1, cp.asarray(slots), k_hadamard=khad)
    return cp.asnumpy(g_qkv), cp.asnumpy(pool.pool)


@pytest.mark.parametrize("T", [1, 256, 2500])
@pytest.mark.parametrize("d,bits,khad", [(128, 4, False), (128, 8, True), (64, 4, False), (128, 16, False)])
@pytest.mark.parametrize("pad", [8, 1])
def test_writer_fused_equals_unfused_and_twin(monkeypatch, T, d, bits, khad, pad):
    """pad 1: an odd row stride (no 32-bit pairs); T 2500: a prefill-sized step (the narrow block)."""
    r = np.random.default_rng(T + d + bits + pad)
    h, kvh = 32, 8
    width = (h + 2 * kvh) * d
    qkv = (r.standard_normal((T, width + pad)) * r.uniform(0.1, 8.0, (T, 1))).astype(np.float16)
    pos = r.integers(0, 131072, T).astype(np.int32)
    pages = -(-T // 64) + 2
    slots = r.permutation(pages * 64)[:T].astype(np.int32)
    slots[r.integers(0, T, 5 if T > 5 else 0)] = -1
    inv_freq = rope_inv_freq(SimpleNamespace(head_dim=d, rope_theta=500000.0, rope_scaling=LLAMA3))
    np_pool = PagedKVPool(2, pages, kvh, d, bits, fill=0xFF)
    outs = {}
    for on in (True, False):
        fusions(monkeypatch, on)
        outs[on] = run_writer(qkv, pos, slots, inv_freq, h, kvh, d, bits, khad, np_pool)
    same(outs[True][0], outs[False][0], "q / k / v, fused vs unfused")
    same(outs[True][1], outs[False][1], "pages, fused vs unfused")
    q = qkv[:, : h * d].reshape(T, h, d)
    k = qkv[:, h * d : (h + kvh) * d].reshape(T, kvh, d)
    v = qkv[:, (h + kvh) * d : width].reshape(T, kvh, d)
    rope_write_kv(q, k, v, pos, inv_freq, np_pool, 1, slots, k_hadamard=khad)
    same(outs[True][0], qkv, "q / k / v vs the twin")


# ---- a whole decode loop ----

@pytest.mark.parametrize("precision,group", [("w4a8kv4", 128), ("w4a8kv4", -1), ("w8a8kv8", 128),
                                             ("w4a8", 128)])
def test_greedy_decode_identical_with_and_without_fusions(monkeypatch, precision, group):
    """Same tokens with the fusions on and off (both compute the same bits): a small random Llama-3 shape
    at W4A8KV4 (g128 and per-channel: the fused o_proj input with its per-token sums), W8A8KV8 and W4A8 with
    an fp16 cache, CUDA graphs on, batches of 1 to 24 sequences; with the fusions on, every decode attention
    wrote the o_proj input itself (quant_out)."""
    cfg = dataclasses.replace(load_config("llama-3-8b"), num_layers=2, hidden_size=1024,
                              intermediate_size=2048, num_heads=8, num_kv_heads=2, vocab_size=32000)
    weights = build_random_weights(cfg, precision, group, xp=cp, seed=0)
    r = np.random.default_rng(0)
    prompts = [r.integers(0, cfg.vocab_size, int(n)).tolist() for n in r.integers(3, 90, 24)]
    outs = {}
    calls = {True: 0, False: 0}

    def spy(*args, quant_out=None, **kw):
        calls[quant_out is not None] += 1
        return decode_attention(*args, quant_out=quant_out, **kw)

    monkeypatch.setattr(gpu_model, "decode_attention", spy)
    for on in (True, False):
        fusions(monkeypatch, on)
        calls[True] = calls[False] = 0
        config = EngineConfig(max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=256, num_pages=200)
        runner = GPUModelRunner(weights, config, xp=cp)
        engine = LLMEngine(None, config.replace(num_pages=None), runner=runner)
        assert runner.cuda_graphs
        ids = [engine.add_request(p, SamplingParams(max_tokens=12 + i % 5, ignore_eos=True), stream=False)
               for i, p in enumerate(prompts)]
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                done[out.request_id] = out.outputs[0].token_ids
        outs[on] = [done[i] for i in ids]
        assert runner.decode_graphs.captured, "no decode step ran as a graph"
        runner.release_graphs()
        assert calls[on] > 0 and calls[not on] == 0, (on, calls)
    assert outs[True] == outs[False]
