"""The reference forward against an independent naive implementation, and cache consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import random_weights, tiny_config, write_model

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.rope import rope_inv_freq
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.io.loader import load_model


def naive_forward(cfg: dict, t: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Token-by-token float64 transformer with explicit loops over heads and positions."""
    H, KVH, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    w = {k: v.astype(np.float64) for k, v in t.items()}

    def norm(x, g):
        return x / math.sqrt(float(np.mean(x * x)) + eps) * g

    def rope(vec, pos):
        out = vec.copy()
        half = D // 2
        for i in range(half):
            ang = pos * theta ** (-2.0 * i / D)
            a, b = vec[i], vec[i + half]
            out[i] = a * math.cos(ang) - b * math.sin(ang)
            out[i + half] = b * math.cos(ang) + a * math.sin(ang)
        return out

    def lin(name, x):
        y = w[name + ".weight"] @ x
        return y + w[name + ".bias"] if name + ".bias" in w else y

    keys = [[] for _ in range(cfg["num_hidden_layers"])]
    vals = [[] for _ in range(cfg["num_hidden_layers"])]
    outs = []
    for pos, tok in enumerate(ids):
        x = w["model.embed_tokens.weight"][tok].copy()
        for layer in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            hn = norm(x, w[f"{p}.input_layernorm.weight"])
            q = lin(f"{p}.self_attn.q_proj", hn).reshape(H, D)
            k = lin(f"{p}.self_attn.k_proj", hn).reshape(KVH, D)
            v = lin(f"{p}.self_attn.v_proj", hn).reshape(KVH, D)
            keys[layer].append(np.stack([rope(k[j], pos) for j in range(KVH)]))
            vals[layer].append(v)
            att = np.zeros((H, D))
            for h in range(H):
                kv = h // (H // KVH)
                qh = rope(q[h], pos)
                s = np.array([qh @ keys[layer][j][kv] for j in range(pos + 1)]) / math.sqrt(D)
                pr = np.exp(s - s.max())
                pr /= pr.sum()
                att[h] = sum(pr[j] * vals[layer][j][kv] for j in range(pos + 1))
            x = x + lin(f"{p}.self_attn.o_proj", att.reshape(-1))
            hn = norm(x, w[f"{p}.post_attention_layernorm.weight"])
            g = lin(f"{p}.mlp.gate_proj", hn)
            x = x + lin(f"{p}.mlp.down_proj", g / (1 + np.exp(-g)) * lin(f"{p}.mlp.up_proj", hn))
        x = norm(x, w["model.norm.weight"])
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        outs.append(head @ x)
    return np.stack(outs)


@pytest.mark.parametrize(
    "arch,over",
    [
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"num_key_value_heads": 6, "tie_word_embeddings": False}),  # MHA, untied head
        ("MistralForCausalLM", {"num_key_value_heads": 3}),
        ("Qwen2ForCausalLM", {}),  # qkv bias
    ],
)
def test_forward_matches_naive(tmp_path, arch, over):
    cfg = tiny_config(arch, **over)
    tensors = random_weights(cfg, seed=hash(arch) % 1000)
    mdir = write_model(tmp_path / "m", cfg, tensors)
    lm = load_model(mdir)
    ids = list(np.random.default_rng(1).integers(0, cfg["vocab_size"], 9))
    cache = lm.model.new_cache(1, len(ids))
    got = lm.model.logits(lm.model.forward(np.array([ids]), cache))[0]
    want = naive_forward(cfg, tensors, ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_kv_cache_decode_equals_full_recompute(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, lm.config.vocab_size, (3, 20))  # batch of 3 sequences
    full = lm.model.forward(ids, lm.model.new_cache(3, 20))
    cache = lm.model.new_cache(3, 20)
    parts = [lm.model.forward(ids[:, :7], cache)]  # prefill 7, then a chunk of 5, then one token at a time
    parts.append(lm.model.forward(ids[:, 7:12], cache))
    for t in range(12, 20):
        parts.append(lm.model.forward(ids[:, t : t + 1], cache))
    assert cache.length == 20
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_loads_same_as_single(tmp_path):
    cfg = tiny_config()
    tensors = random_weights(cfg, seed=5)
    a = load_llama_weights(ModelConfig.from_dict(cfg), write_model(tmp_path / "a", cfg, tensors))
    b = load_llama_weights(ModelConfig.from_dict(cfg), write_model(tmp_path / "b", cfg, tensors, shards=3))
    np.testing.assert_array_equal(a.layers[1].down_proj.weight, b.layers[1].down_proj.weight)
    np.testing.assert_array_equal(a.embed_tokens, b.embed_tokens)


def test_bf16_and_fp16_checkpoints_load(tmp_path):
    from safetensors.numpy import save_file

    cfg = tiny_config()
    tensors = random_weights(cfg, seed=6)
    mdir = write_model(tmp_path / "m", cfg, tensors)
    # fp16 file
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(mdir / "model.safetensors"))
    w16 = load_llama_weights(ModelConfig.from_dict(cfg), mdir)
    np.testing.assert_array_equal(
        w16.final_norm, tensors["model.norm.weight"].astype(np.float16).astype(np.float32)
    )
    # bf16 written by hand (numpy has no bf16): top 16 bits of each fp32
    from qserve_lite.io.safetensors_reader import SafetensorsFile

    bits = (tensors["model.norm.weight"].view(np.uint32) >> 16).astype(np.uint16)
    header = b'{"x":{"dtype":"BF16","shape":[%d],"data_offsets":[0,%d]}}' % (bits.size, bits.nbytes)
    p = tmp_path / "bf16.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
    with SafetensorsFile(p) as f:
        got = f.get("x")
    want = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.max(np.abs(got - tensors["model.norm.weight"])) < 1e-2


def test_safetensors_reads_release_pages_and_stay_correct(tmp_path):
    """get() copies a tensor out and unmaps its pages (large checkpoints read tensor by tensor must not stay
    resident); tensors that share a page, and repeated reads, still come back exact."""
    from safetensors.numpy import save_file

    from qserve_lite.io.safetensors_reader import SafetensorsFile

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal(3).astype(np.float32),  # a and b share the first page
               "b": rng.standard_normal((700, 300)).astype(np.float16),
               "c": rng.integers(-5, 5, 4099).astype(np.int32)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        for _ in range(2):
            for name, want in tensors.items():
                np.testing.assert_array_equal(f.get(name), want)
        np.testing.assert_array_equal(f.get("b", dtype=np.float64), tensors["b"].astype(np.float64))


def test_llama3_rope_scaling_shapes_frequencies():
    base = tiny_config(head_dim=64, rope_theta=500000.0)
    scaled = dict(
        base,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    f0 = rope_inv_freq(ModelConfig.from_dict(base))
    f1 = rope_inv_freq(ModelConfig.from_dict(scaled))
    wavelen = 2 * np.pi / f0
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(f1[high], f0[high])  # short wavelengths untouched
    np.testing.assert_allclose(f1[low], f0[low] / 8)  # long wavelengths slowed by `factor`
    assert np.all((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / 8))  # blended in between
    linear = dict(base, rope_scaling={"type": "linear", "factor": 2.0})
    np.testing.assert_allclose(rope_inv_freq(ModelConfig.from_dict(linear)), f0 / 2)


def test_forward_keeps_fp32(tiny_model_dir):
    """A stray float64 promotion makes the CPU path several times slower; the forward must stay fp32."""
    lm = load_model(tiny_model_dir)
    h = lm.model.forward(np.array([[3, 4, 5]]), lm.model.new_cache(1, 3))
    assert h.dtype == np.float32
    assert lm.model.logits(h).dtype == np.float32


def test_blocked_prefill_attention_equals_single_block(tiny_model_dir, monkeypatch):
    """Prefill attention runs in query blocks: any block size gives the same result, after a prefix too."""
    from qserve_lite.model import llama

    lm = load_model(tiny_model_dir)
    ids = np.random.default_rng(9).integers(0, lm.config.vocab_size, (2, 23))

    def run():
        cache = lm.model.new_cache(2, 23)
        a = lm.model.forward(ids[:, :10], cache)
        return np.concatenate([a, lm.model.forward(ids[:, 10:], cache)], axis=1)

    monkeypatch.setattr(llama, "ATTN_QUERY_BLOCK", 1024)
    ref = run()
    for block in (1, 3, 4, 7):
        monkeypatch.setattr(llama, "ATTN_QUERY_BLOCK", block)
        np.testing.assert_allclose(run(), ref, rtol=1e-5, atol=1e-5)
