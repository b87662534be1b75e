"""The vision side on the CPU: the 2x2 merge against loop references in both token orders (odd grid), the
SigLIP tower + projector (numpy twin, fp16 and W8A8) against an independent float64 reference written from the
Hugging Face / VILA definitions, and loading a VILA1.5 root from safetensors and torch pickles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from vila_fixtures import VISION, llm_config, vision_tensors, write_vila

from qserve_lite.core.vision_config import VisionConfig, VLMConfig
from qserve_lite.errors import ConfigError, ModelNotFoundError, WeightsError
from qserve_lite.io.vila import load_vila, load_vlm_shape
from qserve_lite.model.random_vision import build_random_vision, vision_weight_bytes
from qserve_lite.model.vision import VisionEncoder, VisionWeights, merge_2x2


def tiny_vlm_config(order: str = "column", llm_hidden: int = 64) -> VLMConfig:
    return VLMConfig(VisionConfig.from_dict(VISION), llm_hidden, token_order=order)


# ---- the 2x2 merge ----

def merge_loop(x: np.ndarray, order: str) -> np.ndarray:
    """The definition, element by element: block (i, j) = [x(2i,2j) | x(2i,2j+1) | x(2i+1,2j) | x(2i+1,2j+1)]
    (zeros past the grid), token j * m + i (column) or i * m + j (row)."""
    B, g, _, C = x.shape
    m = -(-g // 2)
    out = np.zeros((B, m * m, 4 * C), x.dtype)
    for b in range(B):
        for i in range(m):
            for j in range(m):
                t = j * m + i if order == "column" else i * m + j
                for s, (di, dj) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                    r, c = 2 * i + di, 2 * j + dj
                    if r < g and c < g:
                        out[b, t, s * C : (s + 1) * C] = x[b, r, c]
    return out


def flat_square_vila(x: np.ndarray, permutes: int) -> np.ndarray:
    """VILA's flat_square in numpy views (1 permute: VILA1.5; 2: NVILA / TensorRT-LLM), then the reshape to
    tokens, as base_projector.py does it."""
    n, w, h, c = x.shape
    if w % 2:
        x = np.concatenate([x, np.zeros((n, 1, h, c), x.dtype)], axis=1)
        n, w, h, c = x.shape
    if h % 2:
        x = np.concatenate([x, np.zeros((n, w, 1, c), x.dtype)], axis=2)
        n, w, h, c = x.shape
    x = x.reshape(n, w, h // 2, c * 2).transpose(0, 2, 1, 3).reshape(n, h // 2, w // 2, c * 4)
    if permutes == 2:
        x = x.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(x).reshape(n, -1, 4 * c)


@pytest.mark.parametrize("g", [5, 6, 27])
@pytest.mark.parametrize("order", ["column", "row"])
def test_merge_matches_loop_reference(g, order):
    x = np.random.default_rng(g).standard_normal((2, g, g, 3)).astype(np.float32)
    got = merge_2x2(x, order, np)
    np.testing.assert_array_equal(got, merge_loop(x, order))
    np.testing.assert_array_equal(got, flat_square_vila(x, 1 if order == "column" else 2))
    m = -(-g // 2)
    assert got.shape == (2, m * m, 12)
    if g % 2:  # the padded last row / column of blocks holds zeros in its second half
        last = got[0, m * m - 1]
        assert np.all(last[3:] == 0) and np.any(last[:3] != 0)


def test_merge_orders_differ():
    x = np.arange(2 * 5 * 5 * 1, dtype=np.float32).reshape(2, 5, 5, 1)
    col, row = merge_2x2(x, "column", np), merge_2x2(x, "row", np)
    assert not np.array_equal(col, row)
    np.testing.assert_array_equal(col.reshape(2, 3, 3, 4).transpose(0, 2, 1, 3).reshape(2, 9, 4), row)


# ---- the tower and projector against a float64 reference ----

def layer_norm_ref(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def reference_embeds(tower: dict, projector: dict, pixels: np.ndarray, cfg: VLMConfig) -> np.ndarray:
    """SigLIP (HF SiglipVisionModel: conv patches, learned positions, pre-LN layers, tanh GELU) to the
    hidden state of layer select_layer, then VILA's mlp_downsample; float64, plain loops where it helps."""
    v = cfg.vision
    t = {k: a.astype(np.float64) for k, a in tower.items()}
    B, P, g, h = pixels.shape[0], v.patch_size, v.grid, v.hidden_size
    w = t["vision_model.embeddings.patch_embedding.weight"]
    x = np.zeros((B, g * g, h))
    for r in range(g):
        for c in range(g):
            patch = pixels[:, :, r * P : (r + 1) * P, c * P : (c + 1) * P].astype(np.float64)
            x[:, r * g + c] = np.einsum("bckl,hckl->bh", patch, w)
    e = "vision_model.embeddings"
    x += t[f"{e}.patch_embedding.bias"] + t[f"{e}.position_embedding.weight"]
    heads, d = v.num_heads, v.head_dim
    for i in range(cfg.layers_run):
        p = f"vision_model.encoder.layers.{i}"

        def lin(name, y, p=p):
            return y @ t[f"{p}.{name}.weight"].T + t[f"{p}.{name}.bias"]

        y = layer_norm_ref(x, t[f"{p}.layer_norm1.weight"], t[f"{p}.layer_norm1.bias"], v.layer_norm_eps)
        q, k, vv = (lin(f"self_attn.{n}_proj", y).reshape(B, -1, heads, d) for n in "qkv")
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + lin("self_attn.out_proj", np.einsum("bhqk,bkhd->bqhd", s, vv).reshape(B, -1, h))
        y = layer_norm_ref(x, t[f"{p}.layer_norm2.weight"], t[f"{p}.layer_norm2.bias"], v.layer_norm_eps)
        f = lin("mlp.fc1", y)
        f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f**3)))
        x = x + lin("mlp.fc2", f)
    merged = merge_loop(x.reshape(B, g, g, h), cfg.token_order)
    pr = {k: a.astype(np.float64) for k, a in projector.items()}
    y = layer_norm_ref(merged, pr["layers.1.weight"], pr["layers.1.bias"], cfg.projector_eps)
    y = y @ pr["layers.2.weight"].T + pr["layers.2.bias"]
    y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    return y @ pr["layers.4.weight"].T + pr["layers.4.bias"]


def _getter(tensors: dict):
    def get(name, shape):
        assert tuple(tensors[name].shape) == tuple(shape), name
        return tensors[name]
    return get


@pytest.mark.parametrize("order", ["column", "row"])
@pytest.mark.parametrize("mode,tol", [("f16", 0.005), ("w8", 0.06)])
def test_encoder_matches_reference(order, mode, tol):
    cfg = tiny_vlm_config(order)
    tower, projector = vision_tensors(VISION, 64, seed=3)
    weights = VisionWeights.from_tensors(cfg, _getter({**tower, **projector}), np, mode)
    assert len(weights.layers) == cfg.layers_run == 2 and cfg.tokens_per_image == 9
    pixels = np.random.default_rng(0).uniform(-1, 1, (3, 3, 70, 70)).astype(np.float32)
    got = VisionEncoder(weights, np, max_images=2).encode(pixels)  # two chunks
    want = reference_embeds(tower, projector, pixels, cfg)
    assert got.dtype == np.float16 and got.shape == want.shape == (3, 9, 64)
    err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
    assert err < tol, err
    # one image's embeddings do not depend on the others in its batch
    alone = VisionEncoder(weights, np).encode(pixels[1:2])
    np.testing.assert_array_equal(alone[0], got[1])


def test_random_vision_weights_and_bytes():
    cfg = tiny_vlm_config()
    for mode in ("f16", "w8"):
        w = build_random_vision(cfg, mode, xp=np, seed=0)
        assert w.nbytes() == vision_weight_bytes(cfg, mode)
        out = VisionEncoder(w, np).encode(np.zeros((1, 3, 70, 70), np.float32))
        assert np.isfinite(out).all() and out.std() > 0.05
    vcfg, llm, _ = load_vlm_shape("vila1.5-13b")
    assert (vcfg.tokens_per_image, vcfg.layers_run, vcfg.llm_hidden, llm.num_layers) == (196, 26, 5120, 40)
    assert abs(vision_weight_bytes(vcfg) / 2**30 - 0.87) < 0.05  # SigLIP-so400m (26 layers) + projector


# ---- loading ----

@pytest.mark.parametrize("fmt,prefixed", [("safetensors", False), ("torch", False), ("torch", True)])
def test_load_vila_formats(tmp_path, fmt, prefixed):
    root = write_vila(tmp_path / "VILA1.5-tiny", fmt=fmt, prefixed=prefixed)
    loaded = load_vila(root)
    assert loaded.name == "VILA1.5-tiny" and loaded.config.tokens_per_image == 9
    assert loaded.config.conv_template == "vicuna_v1" and loaded.llm.precision.name == "w16a16"
    assert not any("post_layernorm" in k or ".head." in k for k in loaded.vision_tensors)
    tower, projector = vision_tensors(VISION, 64, seed=1)
    for name, want in {**tower, **projector}.items():
        if name in loaded.vision_tensors:
            np.testing.assert_array_equal(loaded.vision_tensors[name], want.astype(np.float16))
    assert len(loaded.vision_tensors) == len(tower) - 3 + len(projector)


def test_load_vila_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="VILA1.5 checkpoint"):
        load_vila(tmp_path / "nowhere")
    root = write_vila(tmp_path / "v")
    with pytest.raises(ConfigError, match="plain language model"):
        load_vila(root / "llm")
    (root / "mm_projector" / "model.safetensors").rename(root / "mm_projector" / "weights.npz")
    with pytest.raises(WeightsError, match=r"no weights in .*mm_projector.*weights.npz"):
        load_vila(root)
    other = write_vila(tmp_path / "w", mm_projector_cfg={"mm_projector_type": "mlp2x_gelu"})
    with pytest.raises(ConfigError, match="mlp2x_gelu"):
        load_vila(other)
    patch = write_vila(tmp_path / "p", mm_vision_select_feature="patch")
    with pytest.raises(ConfigError, match="cls_patch"):
        load_vila(patch)
    bad = write_vila(tmp_path / "b", llm=llm_config(hidden_size=96, head_dim=48))
    (bad / "mm_projector").rename(tmp_path / "moved")
    write_vila(tmp_path / "b2")
    (tmp_path / "b2" / "mm_projector").rename(bad / "mm_projector")  # a projector for hidden 64, LLM of 96
    loaded = load_vila(bad)
    with pytest.raises(WeightsError, match=r"layers\.2\.weight.*expected \[96, 128\]"):
        VisionWeights.from_tensors(loaded.config, loaded.tensor, np)
