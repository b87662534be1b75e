"""k_hadamard: the per-head Hadamard rotation of q and k after RoPE (model/llama.py, the KV writer's twin
kernels/attention.head_hadamard, the checkpoint flag, the quantize CLI). The GPU kernel is checked against the
twin in test_attention_gpu.py; here the twin is checked against an emulation of the kernel's lanes and
registers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import random_weights, tiny_config, write_model

from qserve_lite.core.hadamard import hadamard
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.rope import apply_rope, rope_cos_sin, rope_inv_freq
from qserve_lite.errors import ConfigError
from qserve_lite.io.checkpoint import LINEARS, save_quantized, validate_quant_config
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.io.loader import load_model
from qserve_lite.kernels.attention import head_hadamard, head_hadamard_scale, rope_write_kv
from qserve_lite.kernels.kv_quant import KVFakeQuantizer, kv_quantize
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.model.gpu_model import DeviceWeights
from qserve_lite.model.linear import Linear
from qserve_lite.model.llama import LlamaModel
from qserve_lite.model.quant_linear import W8A8Linear
from qserve_lite.model.weights import LayerWeights, LlamaWeights
from qserve_lite.quant.quantizers import quantize_w8_per_channel

QC_W8 = {"quant_method": "qoq", "w_bit": 8, "a_bit": 8, "group_size": -1, "kv_bit": 4}


# ---- the FWHT twin ----

def _fwht_register_stages(x1: list, x2: list, P: int) -> None:
    """The butterflies within each lane's P registers (strides 1 .. P/2), in place."""
    m = 1
    while m < P:
        for lane in range(32):
            for h in (x1, x2):
                for j in range(P):
                    if j & m == 0:
                        a, b = h[lane][j], h[lane][j | m]
                        h[lane][j], h[lane][j | m] = a + b, a - b
        m *= 2


def _fwht_shuffle_stages(x1: list, x2: list, P: int) -> None:
    """The butterflies across lanes (xor-shuffle distances 1 .. 16), in place."""
    lm = 1
    while lm < 32:
        for h in (x1, x2):
            old = [row[:] for row in h]
            for lane in range(32):
                for j in range(P):
                    partner, own = old[lane ^ lm][j], old[lane][j]
                    h[lane][j] = partner - own if lane & lm else own + partner
        lm *= 2


def _fwht_x1_x2_stage(x1: list, x2: list, P: int) -> None:
    """The last butterfly, between the two halves x1 and x2, in place."""
    for lane in range(32):
        for j in range(P):
            a, b = x1[lane][j], x2[lane][j]
            x1[lane][j], x2[lane][j] = a + b, a - b


def _kernel_fwht(x: np.ndarray) -> np.ndarray:
    """cuda/kv_writer.cu's QS_KHAD step on one head, emulated lane by lane: x1[lane][j] = channel lane*P + j,
    x2[lane][j] = channel D/2 + lane*P + j, register stages, shuffle stages, the x1/x2 stage, the scale."""
    D = x.shape[0]
    P, half = D // 64, D // 2
    x32 = x.astype(np.float32)
    x1 = [[x32[lane * P + j] for j in range(P)] for lane in range(32)]
    x2 = [[x32[half + lane * P + j] for j in range(P)] for lane in range(32)]
    _fwht_register_stages(x1, x2, P)
    _fwht_shuffle_stages(x1, x2, P)
    _fwht_x1_x2_stage(x1, x2, P)
    out = np.empty(D, np.float32)
    for lane in range(32):
        for j in range(P):
            out[lane * P + j], out[half + lane * P + j] = x1[lane][j], x2[lane][j]
    return (out * head_hadamard_scale(D)).astype(np.float16)


@pytest.mark.parametrize("d", [64, 128])
def test_head_hadamard_equals_the_matrix_and_the_kernels_steps(d):
    r = np.random.default_rng()
    x = (r.standard_normal((3, 5, d)) * r.uniform(0.01, 30.0, (3, 5, 1))).astype(np.float16)
    x[0, 0] = 0.0
    x[0, 1, 3] = -0.0
    got = head_hadamard(x)
    assert got.dtype == np.float16 and got.shape == x.shape
    ref = x.astype(np.float64) @ hadamard(d)
    # one fp16 rounding of a value that fp32 sums got to within ~1e-6 of the row's norm
    bound = 2.0**-11 * np.abs(ref) + 1e-6 * np.abs(ref).max(axis=-1, keepdims=True) + 2.0**-24
    assert (np.abs(got.astype(np.float64) - ref) <= bound).all()
    back = head_hadamard(got).astype(np.float64)  # H H = I, up to two fp16 roundings of each row
    assert (np.abs(back - x) <= 2.0**-9 * np.abs(x).max(axis=-1, keepdims=True)).all()
    for row in x.reshape(-1, d)[:6]:
        assert (_kernel_fwht(row).view(np.uint16) == head_hadamard(row).view(np.uint16)).all()


def test_head_hadamard_scale_is_fp32_of_inverse_sqrt():
    for d in (1, 2, 64, 128, 256, 512):
        assert head_hadamard_scale(d) == np.float32(1.0 / math.sqrt(d))
    assert head_hadamard_scale(128).view(np.uint32) == 0x3DB504F3  # the kernel's KHAD_SCALE for D = 128
    with pytest.raises(ValueError, match="power-of-two"):
        head_hadamard_scale(96)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_rope_write_kv_twin_rotates_q_and_k_then_quantizes_k(rope, bits):
    r = np.random.default_rng()
    T, H, KVH, d, pages = 37, 4, 2, 64, 2
    q = r.standard_normal((T, H, d)).astype(np.float16)
    k = (r.standard_normal((T, KVH, d)) * r.uniform(0.3, 6.0, d)).astype(np.float16)
    k[:, :, 5] += 20.0  # an outlier channel
    v = r.standard_normal((T, KVH, d)).astype(np.float16)
    pos = r.integers(0, 4096, T)
    inv_freq = rope_inv_freq(ModelConfig.from_dict(tiny_config(head_dim=d)))
    slots = r.permutation(pages * 64)[:T]
    slots[3] = -1
    want_q, want_k, want_v = q.copy(), k.copy(), v.copy()
    if rope:
        cos, sin = rope_cos_sin(pos, inv_freq, np, np.float32)
        want_q, want_k = apply_rope(want_q, cos, sin), apply_rope(want_k, cos, sin)
    want_q, want_k = head_hadamard(want_q), head_hadamard(want_k)
    pool = PagedKVPool(1, pages, KVH, d, bits, fill=0xFF)
    rope_write_kv(q, k, v, pos, inv_freq, pool, 0, slots, rope=rope, k_hadamard=True)
    assert (q.view(np.uint16) == want_q.view(np.uint16)).all()
    assert (k.view(np.uint16) == want_k.view(np.uint16)).all()
    assert (v.view(np.uint16) == want_v.view(np.uint16)).all()  # v is not rotated
    ref = PagedKVPool(1, pages, KVH, d, bits, fill=0xFF)
    keep = slots >= 0
    for which, x in ((0, want_k), (1, want_v)):
        if bits == 16:
            ref.store(0, which, slots[keep], values=x[keep])
        else:
            codes, scales, zeros = kv_quantize(x[keep], bits, np)
            ref.store(0, which, slots[keep], codes=codes, scales=scales, zeros=zeros)
    assert (pool.pool.view(np.uint8) == ref.pool.view(np.uint8)).all()


# ---- the model ----

def _model(kv_bits=None, outlier=False, layers=2):
    cfg_dict = tiny_config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, num_hidden_layers=layers, max_position_embeddings=256)
    t = random_weights(cfg_dict, seed=5)
    if outlier:  # a large K channel pair (c, c + D/2) per kv head, as real models have
        for i in range(layers):
            w = t[f"model.layers.{i}.self_attn.k_proj.weight"]
            for g in range(2):
                w[[g * 32 + 3, g * 32 + 19]] *= 30.0
    cfg = ModelConfig.from_dict(cfg_dict)

    def lin(name):
        return Linear(t[name].astype(np.float64))

    lws = []
    for i in range(layers):
        p = f"model.layers.{i}"
        lws.append(LayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"].astype(np.float64),
            q_proj=lin(f"{p}.self_attn.q_proj.weight"), k_proj=lin(f"{p}.self_attn.k_proj.weight"),
            v_proj=lin(f"{p}.self_attn.v_proj.weight"), o_proj=lin(f"{p}.self_attn.o_proj.weight"),
            post_attn_norm=t[f"{p}.post_attention_layernorm.weight"].astype(np.float64),
            gate_proj=lin(f"{p}.mlp.gate_proj.weight"), up_proj=lin(f"{p}.mlp.up_proj.weight"),
            down_proj=lin(f"{p}.mlp.down_proj.weight")))
    embed = t["model.embed_tokens.weight"].astype(np.float64)
    w = LlamaWeights(embed_tokens=embed, layers=lws, final_norm=t["model.norm.weight"].astype(np.float64),
                     lm_head=Linear(embed))
    return LlamaModel(cfg, w, np, kv_quantizer=KVFakeQuantizer(kv_bits) if kv_bits else None)


def _run(model, ids, k_hadamard, observe=None):
    model.k_hadamard = k_hadamard
    seen = {}
    model.observer = (lambda i, p, a: seen.__setitem__((i, p), a.copy())) if observe else None  # last call
    cache = model.new_cache(batch=ids.shape[0], max_len=ids.shape[1])
    half = ids.shape[1] // 2  # a prefill then more tokens attending to the cached (rotated) keys
    model.forward(ids[:, :half], cache)
    logits = model.logits(model.forward(ids[:, half:], cache))
    return logits, seen


def test_float_model_with_k_hadamard_keeps_logits_and_observed_qk():
    model = _model()
    ids = np.random.default_rng(1).integers(0, 320, (2, 40))
    off, seen_off = _run(model, ids, False, observe=True)
    on, seen_on = _run(model, ids, True, observe=True)
    np.testing.assert_allclose(on, off, rtol=1e-4, atol=1e-4 * np.abs(off).max())
    for key in seen_off:  # calibration statistics stay un-rotated
        if key[1] in ("q", "k"):
            np.testing.assert_allclose(seen_on[key], seen_off[key], rtol=1e-9, atol=1e-12)


def test_k_hadamard_lowers_kv4_attention_error_with_an_outlier_key_channel():
    ids = np.random.default_rng(2).integers(0, 320, (2, 48))
    ref = _run(_model(outlier=True, layers=1), ids, False, observe=True)[1]
    err = {}
    for khad in (False, True):
        logits, seen = _run(_model(kv_bits=4, outlier=True, layers=1), ids, khad, observe=True)
        # layer 0's attention output of the second call (its inputs do not depend on the KV cache)
        got, want = seen[(0, "o_in")], ref[(0, "o_in")]
        err[khad] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err[True] != err[False]
    assert err[True] < 0.7 * err[False], err


def test_head_hadamard_matrix_is_cached_in_the_model_dtype():
    model = _model()
    h32 = model.head_hadamard_matrix(np.float32)
    assert h32.dtype == np.float32 and model.head_hadamard_matrix(np.float32) is h32
    np.testing.assert_allclose(h32 @ h32, np.eye(32), atol=1e-6)


# ---- checkpoint flag, loader, device weights, CLI ----

@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
    return write_model(tmp_path_factory.mktemp("khad-float"), cfg, random_weights(cfg, seed=7))


def _w8_checkpoint(src: Path, out: Path, extra: dict) -> Path:
    cfg_dict = json.loads((src / "config.json").read_text())
    weights = load_llama_weights(ModelConfig.from_dict(cfg_dict), src)
    for layer in weights.layers:
        for _, name in LINEARS:
            setattr(layer, name, W8A8Linear(quantize_w8_per_channel(np.asarray(getattr(layer, name).weight,
                                                                                  np.float64))))
    return save_quantized(out, cfg_dict, weights, {**QC_W8, **extra}, src)


@pytest.mark.parametrize("extra,want", [({"k_hadamard": True}, True), ({"k_hadamard": False}, False),
                                        ({}, False)])
def test_checkpoint_flag_round_trip(float_dir, tmp_path, extra, want):
    path = _w8_checkpoint(float_dir, tmp_path / "ckpt", extra)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc.get("k_hadamard", "absent") == extra.get("k_hadamard", "absent")
    lm = load_model(path)
    assert lm.k_hadamard is want and lm.model.k_hadamard is want
    assert DeviceWeights.from_host(lm.config, lm.weights, lm.precision, np, lm.k_hadamard).k_hadamard is want
    assert load_model(float_dir, precision="w16a16kv4").model.k_hadamard is False


def test_checkpoint_flag_must_be_a_bool():
    with pytest.raises(ConfigError, match="k_hadamard"):
        validate_quant_config({**QC_W8, "k_hadamard": "yes"})


@pytest.mark.parametrize("flag", [False, True])
def test_quantize_cli_no_k_hadamard(float_dir, tmp_path, flag):
    from qserve_lite.cli import main

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(float_dir), "--out", str(out), "--precision", "w8a8kv4", "--rtn",
            "--device", "cpu"] + (["--no-k-hadamard"] if flag else [])
    assert main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["k_hadamard"] is (not flag) and qc["qoq"]["k_hadamard"] is (not flag)
    assert load_model(out).model.k_hadamard is (not flag)
