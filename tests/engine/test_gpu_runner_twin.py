"""The GPU runner's op sequence on the kernels' numpy twins (GPUModelRunner(xp=numpy)), on the CPU: fused and
packed weights round-trip, and its greedy tokens follow the CPU emulation's (teacher-forced) on a tiny model.
The GPU tests (test_engine_gpu.py) then check the device against this same twin."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import random_weights, teacher_forced, tiny_config, write_model

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.pack import from_qserve_group_params, unpack_w4
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.io.checkpoint import LINEARS, save_quantized
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.io.loader import load_model
from qserve_lite.model.gpu_model import fuse_linears
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.quant.quantizers import quantize_w4_group, quantize_w4_per_channel, quantize_w8_per_channel

QC = {
    "w4_g128": {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": 128, "kv_bit": 4},
    "w4_chn": {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": -1, "kv_bit": 4},
    "w8": {"quant_method": "qoq", "w_bit": 8, "a_bit": 8, "group_size": -1, "kv_bit": 8},
}
QUANTIZE = {"w4_g128": lambda w: W4A8Linear(quantize_w4_group(w, 128)),
            "w4_chn": lambda w: W4A8Linear(quantize_w4_per_channel(w)),
            "w8": lambda w: W8A8Linear(quantize_w8_per_channel(w))}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, num_hidden_layers=2, vocab_size=320, max_position_embeddings=512,
                      tie_word_embeddings=False)
    tensors = random_weights(cfg, seed=11)
    tensors["lm_head.weight"] *= 4.0  # clear argmax winners
    return write_model(tmp_path_factory.mktemp("twin-float"), cfg, tensors)


# checkpoints marked for the q / k Hadamard rotation (k_hadamard): (format, quantization_config changes)
KHAD = {"w8_khad": ("w8", {"kv_bit": 4, "k_hadamard": True})}


def _quantized(src, out, mode):
    mode, extra = KHAD.get(mode, (mode, {}))
    cfg_dict = json.loads((src / "config.json").read_text())
    weights = load_llama_weights(ModelConfig.from_dict(cfg_dict), src)
    for layer in weights.layers:
        for _, name in LINEARS:
            setattr(layer, name, QUANTIZE[mode](np.asarray(getattr(layer, name).weight, np.float64)))
    return save_quantized(out, cfg_dict, weights, {**QC[mode], **extra}, src)


@pytest.mark.parametrize("mode", list(QC))
def test_fused_weights_round_trip(float_dir, tmp_path, mode):
    lm = load_model(_quantized(float_dir, tmp_path / "q", mode))
    lw = lm.model.weights.layers[0]
    parts = [lw.q_proj, lw.k_proj, lw.v_proj]
    fused = fuse_linears(parts, np, "qkv")
    codes = np.concatenate([p.qweight.codes for p in parts])
    assert fused.n == codes.shape[0]
    if mode == "w8":
        assert fused.mode == "w8" and np.array_equal(fused.weight, codes)
        return
    assert np.array_equal(unpack_w4(fused.weight), codes)
    if mode == "w4_g128":
        s2, zeros = from_qserve_group_params(fused.s2_scales, fused.s2_zeros)
        assert np.array_equal(s2, np.concatenate([p.qweight.s2 for p in parts]))
        assert np.array_equal(zeros, np.concatenate([p.qweight.zeros for p in parts]))


@pytest.mark.parametrize("mode,precision", [("float", "w16a16"), ("w8", None), ("w8_khad", None),
                                            ("float_khad", "w16a16kv4")])
def test_twin_runner_follows_emulation(float_dir, tmp_path, mode, precision):
    """*_khad: q and k rotated per head by H_D after RoPE (the emulation multiplies by the matrix, the twin
    runs the KV writer's FWHT)."""
    path = float_dir if mode.startswith("float") else _quantized(float_dir, tmp_path / "q", mode)
    lm = load_model(path, precision=precision)
    if mode == "float_khad":
        lm = dataclasses.replace(lm, k_hadamard=True)
    assert lm.k_hadamard is lm.model.k_hadamard is mode.endswith("khad")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (1, 17, 64, 65, 100)]
    n = 16
    ref_rows, ref_own = teacher_forced(LLMEngine(lm, max_num_seqs=8), prompts, None, n)
    forced = [[ref_own[(i, j)] for j in range(n)] for i in range(len(prompts))]
    runner = GPUModelRunner(lm, max_num_batched_tokens=512, max_num_seqs=8, max_model_len=512, num_pages=32,
                            xp=np)
    assert runner.k_hadamard is lm.k_hadamard
    rows, _ = teacher_forced(LLMEngine(lm, max_num_seqs=8, num_pages=32, runner=runner), prompts, forced, n)
    agree = np.mean([np.argmax(rows[k]) == np.argmax(ref_rows[k]) for k in ref_rows])
    err = max(float(np.abs(rows[k] - ref_rows[k]).max() / np.abs(ref_rows[k]).max()) for k in ref_rows)
    assert agree >= 0.9, agree
    assert err < (0.01 if mode == "float" else 0.1), err
    if mode.endswith("khad"):  # the rotation was really applied: off, the twin's logits move
        plain = GPUModelRunner(dataclasses.replace(lm, k_hadamard=False), max_num_batched_tokens=512,
                               max_num_seqs=8, max_model_len=512,
                               num_pages=32, xp=np)
        engine = LLMEngine(lm, max_num_seqs=8, num_pages=32, runner=plain)
        rows_off, _ = teacher_forced(engine, prompts, forced, n)
        assert any(not np.array_equal(rows_off[k], rows[k]) for k in rows)


def test_fp16_activations_follow_the_gpu_numerics(float_dir, tmp_path):
    """Quantized checkpoints load with fp16_activations: the residual stream holds fp16 values, as on the GPU,
    and the twin runner's prefill logits then match the emulation's to float rounding noise, far closer than
    with fp32 activations (where KV4 / INT8 codes flip on the fp16-vs-fp32 differences)."""
    lm = load_model(_quantized(float_dir, tmp_path / "q", "w4_g128"))
    assert lm.model.fp16_activations and not load_model(float_dir).model.fp16_activations
    seen = []
    lm.model.observer = lambda i, point, value: seen.append(np.array(value)) if point == "layer_in" else None
    lm.model.forward(np.arange(3, 40)[None], lm.model.new_cache(1, 64))
    lm.model.observer = None
    assert all(np.array_equal(h, h.astype(np.float16).astype(np.float32)) for h in seen[1:])
    prompts = [np.random.default_rng(5).integers(3, 320, size=n).tolist() for n in (9, 70)]

    def prefill_err() -> float:
        ref, _ = teacher_forced(LLMEngine(lm, max_num_seqs=4), prompts, None, 1)
        runner = GPUModelRunner(lm, max_num_batched_tokens=512, max_num_seqs=4, max_model_len=512,
                                num_pages=16, xp=np)
        rows, _ = teacher_forced(LLMEngine(lm, max_num_seqs=4, num_pages=16, runner=runner), prompts, None, 1)
        return max(float(np.abs(rows[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)

    err_fp16 = prefill_err()
    lm.model.fp16_activations = False
    err_fp32 = prefill_err()
    assert err_fp16 < 1e-5 and err_fp16 < err_fp32 / 10, (err_fp16, err_fp32)
