"""Hadamard matrices and the QoQ rotation (norm folding, residual and per-head V/O rotation)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_weights, tiny_config, write_model

from qserve_lite.core import hadamard as hmod
from qserve_lite.core.hadamard import hadamard, hadamard_decomposition, is_hadamard_order
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.model.llama import LlamaModel
from qserve_lite.quant.rotate import (
    fold_norms,
    is_tied,
    norms_are_folded,
    rotate_heads_vo,
    rotate_model,
    rotate_residual,
    rotation_matrices,
    signed_hadamard,
    untie_embeddings,
    weights_to_float64,
)

# ---- Hadamard matrices ----

FULL_CHECK = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 48, 52, 60, 64, 76, 100, 108, 128, 140, 148,
              576, 960, 1536, 2048]
LARGE = [3072, 3584, 4096, 5120, 7168, 8192, 14336, 18944, 28672]


def check_hadamard(h: np.ndarray, n: int) -> None:
    assert h.shape == (n, n) and h.dtype == np.float64
    assert np.abs(h @ h.T - np.eye(n)).max() < 1e-10
    assert np.abs(np.abs(h) - 1 / np.sqrt(n)).max() < 1e-15  # all entries +-1/sqrt(n)


@pytest.mark.parametrize("n", FULL_CHECK)
def test_hadamard_orthogonal(n):
    check_hadamard(hadamard(n), n)


@pytest.mark.parametrize("n", LARGE)
def test_large_orders_are_kronecker_of_checked_factors(n):
    m, p2, method = hadamard_decomposition(n)
    assert m * p2 == n and p2 & (p2 - 1) == 0
    assert m in (1, 12, 20, 28, 36, 60, 76, 140, 148)
    check_hadamard(hadamard(m), m)
    check_hadamard(hadamard(min(p2, 1024)), min(p2, 1024))


def test_large_order_built():
    """One big matrix built for real (the rest follows from the Kronecker structure): sampled rows."""
    n = 5120
    h = hadamard(n)
    idx = np.random.default_rng(0).choice(n, 24, replace=False)
    assert np.abs(h[idx] @ h.T - np.eye(n)[idx]).max() < 1e-10
    assert np.abs(np.abs(h) - 1 / np.sqrt(n)).max() < 1e-15
    hadamard.cache_clear()


@pytest.mark.parametrize("n,expected", [
    (576, (36, 16)), (5120, (20, 256)), (7168, (28, 256)), (14336, (28, 512)), (48, (12, 4)),
    (1536, (12, 128)), (4096, (1, 4096)), (128, (1, 128)), (40, (20, 2)), (52, (52, 1)),
])
def test_decomposition_prefers_largest_power_of_two(n, expected):
    assert hadamard_decomposition(n)[:2] == expected


@pytest.mark.parametrize("q,kind", [(11, 1), (27, 1), (243, 1), (13, 2), (9, 2), (25, 2), (49, 2)])
def test_paley_constructions_exact(q, kind):
    """Integer check of both Paley constructions over prime fields and GF(p^k) (9, 25, 27, 49, 243)."""
    h = (hmod._paley1 if kind == 1 else hmod._paley2)(q).astype(np.int64)
    m = h.shape[0]
    assert m == (q + 1 if kind == 1 else 2 * (q + 1))
    assert set(np.unique(h)) == {-1, 1}
    assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


@pytest.mark.parametrize("n", [0, -4, 3, 6, 10, 92, 116, 156, 172, 184])
def test_unsupported_order_raises(n):
    assert not is_hadamard_order(n)
    with pytest.raises(QServeLiteError, match=f"order {n}"):
        hadamard(n)


def test_hadamard_cached_read_only_deterministic():
    a = hadamard(36)
    assert a is hadamard(36)
    with pytest.raises(ValueError):
        a[0, 0] = 0.0
    hadamard.cache_clear()
    assert np.array_equal(a, hadamard(36))


# ---- rotation on tiny models ----

VARIANTS = {
    "llama_gqa_tied": tiny_config(),  # hidden 48 = 12 * 4, head_dim 12 (Paley I), GQA 6/2
    "qwen2_bias": tiny_config("Qwen2ForCausalLM"),
    "untied": tiny_config(tie_word_embeddings=False),
    "paley_36_20": tiny_config(hidden_size=36, head_dim=20, num_attention_heads=4, num_key_value_heads=2),
    "paley_20_28_mha": tiny_config(hidden_size=20, head_dim=28, num_attention_heads=3, num_key_value_heads=3,
                                   tie_word_embeddings=False),
}
IDS = np.array([[1, 17, 200, 45, 3, 99, 250, 7, 12], [2, 5, 5, 310, 64, 128, 31, 0, 77]])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_dir):
    out = {}
    for i, (name, cfg) in enumerate(VARIANTS.items()):
        out[name] = write_model(tmp_path_factory.mktemp(name), cfg, random_weights(cfg, seed=i + 1),
                                tokenizer_from=tiny_model_dir)
    return out


def load64(path):
    cfg = ModelConfig.from_file(path / "config.json")
    return cfg, load_llama_weights(cfg, path, dtype=np.float64)


def run(cfg, weights):
    """Logits [B, T, vocab] plus the observed residual (layer 1 input), V and o_proj inputs of layer 1."""
    model = LlamaModel(cfg, weights)
    seen = {}
    model.observer = lambda layer, point, x: seen.__setitem__(point, np.array(x)) if layer == 1 else None
    hidden = model.forward(IDS, model.new_cache(*IDS.shape))
    return model.logits(hidden), seen


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fold_norms_keeps_logits(model_dirs, variant):
    cfg, w = load64(model_dirs[variant])
    ref, ref_seen = run(cfg, w)
    embed_before = w.embed_tokens.copy()
    assert is_tied(w) == cfg.tie_word_embeddings
    assert not norms_are_folded(w)
    fold_norms(w)
    assert norms_are_folded(w) and not is_tied(w)
    assert all(np.all(g == 1) for lw in w.layers for g in (lw.input_norm, lw.post_attn_norm))
    assert np.all(w.final_norm == 1)
    assert np.array_equal(w.embed_tokens, embed_before)  # the final norm went into lm_head only
    out, seen = run(cfg, w)
    assert rel_err(out, ref) < 1e-10
    assert np.abs(seen["layer_in"] - ref_seen["layer_in"]).max() < 1e-10  # folding leaves the residual as is


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rotate_model_keeps_logits_and_rotates(model_dirs, variant):
    cfg, w = load64(model_dirs[variant])
    ref, ref_seen = run(cfg, w)
    rotate_model(cfg, w)
    assert norms_are_folded(w) and not is_tied(w)
    out, seen = run(cfg, w)
    assert rel_err(out, ref) < 1e-10

    R, Rh = hadamard(cfg.hidden_size), hadamard(cfg.head_dim)
    # The residual stream really is rotated: h' = h R (and differs from h).
    h, h_rot = ref_seen["layer_in"], seen["layer_in"]
    assert np.abs(h_rot - h).max() > 0.1 * np.abs(h).max()
    assert np.abs(h_rot - h @ R).max() < 1e-10 * np.abs(h).max()
    # V of every kv head is rotated by Rh, and so is every query head's attention output.
    assert np.abs(seen["v"] - ref_seen["v"] @ Rh).max() < 1e-10 * np.abs(ref_seen["v"]).max()
    B, T = IDS.shape
    o = ref_seen["o_in"].reshape(B, T, cfg.num_heads, cfg.head_dim)
    assert np.abs(seen["o_in"] - (o @ Rh).reshape(B, T, -1)).max() < 1e-10 * np.abs(o).max()
    # q/k are untouched by the rotation.
    assert np.abs(seen["q"] - ref_seen["q"]).max() < 1e-10 * np.abs(ref_seen["q"]).max()


@pytest.mark.parametrize("residual,heads_vo", [(True, False), (False, True)])
def test_rotate_model_parts(model_dirs, residual, heads_vo):
    cfg, w = load64(model_dirs["llama_gqa_tied"])
    ref, _ = run(cfg, w)
    rotate_model(cfg, w, residual=residual, heads_vo=heads_vo)
    assert not is_tied(w)
    out, _ = run(cfg, w)
    assert rel_err(out, ref) < 1e-10


def test_seeded_rotation_keeps_logits_and_uses_signed_hadamard(model_dirs):
    """rotate_model(seed=...) rotates by diag(s) H with random signs s: logits unchanged, residual h R_s."""
    cfg, w = load64(model_dirs["llama_gqa_tied"])
    ref, ref_seen = run(cfg, w)
    rotate_model(cfg, w, seed=3)
    out, seen = run(cfg, w)
    assert rel_err(out, ref) < 1e-10
    R = signed_hadamard(cfg.hidden_size, np.random.default_rng(3))
    assert np.any(np.sign(R[:, 0]) != np.sign(hadamard(cfg.hidden_size)[:, 0]))  # some rows flipped
    assert np.abs(R @ R.T - np.eye(cfg.hidden_size)).max() < 1e-12
    h = ref_seen["layer_in"]
    assert np.abs(seen["layer_in"] - h @ R).max() < 1e-10 * np.abs(h).max()


@pytest.mark.parametrize("seed,residual", [(None, True), (5, True), (None, False)])
def test_layerwise_prepare_equals_whole_model_transforms(model_dirs, seed, residual):
    """rotate_model and the quantizer go one layer at a time (prepare_ends, then prepare_layer per layer);
    that must give exactly the whole-model transforms fold_norms, rotate_residual, rotate_heads_vo."""
    cfg, whole = load64(model_dirs["qwen2_bias"])
    _, parts = load64(model_dirs["qwen2_bias"])
    R, Rh = rotation_matrices(cfg, residual=residual, seed=seed)
    fold_norms(whole)
    if R is not None:
        rotate_residual(whole, R)
    rotate_heads_vo(cfg, whole, Rh)
    rotate_model(cfg, parts, residual=residual, seed=seed)
    np.testing.assert_array_equal(parts.embed_tokens, whole.embed_tokens)
    np.testing.assert_array_equal(parts.lm_head.weight, whole.lm_head.weight)
    np.testing.assert_array_equal(parts.final_norm, whole.final_norm)
    for a, b in zip(parts.layers, whole.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(getattr(a, name).weight, getattr(b, name).weight)
            if getattr(b, name).bias is not None:
                np.testing.assert_array_equal(getattr(a, name).bias, getattr(b, name).bias)
        np.testing.assert_array_equal(a.input_norm, b.input_norm)


def test_rotation_with_producer_biases_and_random_orthogonal(model_dirs):
    """o_proj / down_proj biases (b <- R^T b) and a non-Hadamard orthogonal R and Rh."""
    cfg, w = load64(model_dirs["qwen2_bias"])
    rng = np.random.default_rng(7)
    for lw in w.layers:
        lw.o_proj.bias = 0.1 * rng.standard_normal(cfg.hidden_size)
        lw.down_proj.bias = 0.1 * rng.standard_normal(cfg.hidden_size)
    ref, _ = run(cfg, w)
    R = np.linalg.qr(rng.standard_normal((cfg.hidden_size, cfg.hidden_size)))[0]
    Rh = np.linalg.qr(rng.standard_normal((cfg.head_dim, cfg.head_dim)))[0]
    fold_norms(w)
    rotate_residual(w, R)
    rotate_heads_vo(cfg, w, Rh)
    out, _ = run(cfg, w)
    assert rel_err(out, ref) < 1e-10


def test_weights_to_float64_copy_keeps_tie(model_dirs):
    cfg = ModelConfig.from_file(model_dirs["qwen2_bias"] / "config.json")
    w32 = load_llama_weights(cfg, model_dirs["qwen2_bias"])
    assert w32.embed_tokens.dtype == np.float32 and is_tied(w32)
    w64 = weights_to_float64(w32)
    assert is_tied(w64) and w64.embed_tokens.dtype == np.float64
    assert w64.layers[0].q_proj.bias is not None and w64.layers[0].q_proj.bias.dtype == np.float64
    assert not np.may_share_memory(w64.embed_tokens, w32.embed_tokens)
    ref, _ = run(cfg, weights_to_float64(w32))
    rotate_model(cfg, w64)
    assert is_tied(w32) and not norms_are_folded(w32)  # the float32 original is untouched
    out, _ = run(cfg, w64)
    assert rel_err(out, ref) < 1e-10

    cfg_u = ModelConfig.from_file(model_dirs["untied"] / "config.json")
    assert not is_tied(weights_to_float64(load_llama_weights(cfg_u, model_dirs["untied"])))


def test_untie_and_preconditions(model_dirs):
    cfg, w = load64(model_dirs["llama_gqa_tied"])
    with pytest.raises(ValueError, match="fold_norms"):
        rotate_residual(w, hadamard(cfg.hidden_size))
    untie_embeddings(w)
    assert not is_tied(w) and np.array_equal(w.lm_head.weight, w.embed_tokens)
    fold_norms(w)
    with pytest.raises(ValueError, match="shape"):
        rotate_residual(w, hadamard(12))
    with pytest.raises(ValueError, match="shape"):
        rotate_heads_vo(cfg, w, hadamard(4))
    w32 = load_llama_weights(cfg, model_dirs["llama_gqa_tied"])
    with pytest.raises(TypeError, match="float64"):
        rotate_model(cfg, w32)
