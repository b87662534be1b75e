"""Tiny VILA1.5 checkpoints and WebDataset shards for the VLM tests, built without torch.

The vision tower is the issue's tiny SigLIP: hidden 32, 2 heads, 3 layers (select layer -2: 2 run), MLP 40,
70-pixel images -> 5x5 patches -> zero-padded to 6x6 -> 9 merged tokens (the odd-grid path of 27x27).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from conftest import random_weights, tiny_config, write_model

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.io.checkpoint import LINEARS, save_quantized
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.io.images import encode_png
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.quant.quantizers import quantize_w4_per_channel, quantize_w8_per_channel

VISION = {"model_type": "siglip_vision_model", "architectures": ["SiglipVisionModel"], "hidden_size": 32,
          "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 2, "patch_size": 14,
          "image_size": 70, "num_channels": 3, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}


def llm_config(**over) -> dict:
    cfg = tiny_config(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=32, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.update(over)
    return cfg


def vila_config(llm: dict, vision: dict = VISION, **over) -> dict:
    cfg = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
           "hidden_size": llm["hidden_size"], "mm_hidden_size": vision["hidden_size"],
           "image_aspect_ratio": "resize",
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "s2": False,
           "llm_cfg": llm, "vision_tower_cfg": vision,
           "mm_projector_cfg": {"model_type": "v2l_projector", "mm_projector_type": "mlp_downsample"}}
    cfg.update(over)
    return cfg


def vision_tensors(vision: dict, llm_hidden: int, seed: int = 0) -> tuple[dict, dict]:
    """(vision tower tensors with HF SigLIP names incl. the unused post_layernorm / head, projector tensors
    with VILA's names), float32."""
    rng = np.random.default_rng(seed)
    h, i = vision["hidden_size"], vision["intermediate_size"]
    p, c = vision["patch_size"], vision["num_channels"]
    n = (vision["image_size"] // p) ** 2

    def mat(o, k):
        return (rng.standard_normal((o, k)) / np.sqrt(k)).astype(np.float32)

    def vec(o, scale=0.1, base=0.0):
        return (base + scale * rng.standard_normal(o)).astype(np.float32)

    e = "vision_model.embeddings"
    tower = {f"{e}.patch_embedding.weight": mat(h, c * p * p).reshape(h, c, p, p),
             f"{e}.patch_embedding.bias": vec(h), f"{e}.position_embedding.weight": vec((n, h), 0.3),
             "vision_model.post_layernorm.weight": vec(h, 0.1, 1.0),
             "vision_model.post_layernorm.bias": vec(h),
             "vision_model.head.probe": vec((1, 1, h))}
    for layer in range(vision["num_hidden_layers"]):
        q = f"vision_model.encoder.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tower[f"{q}.self_attn.{name}.weight"], tower[f"{q}.self_attn.{name}.bias"] = mat(h, h), vec(h)
        for ln in ("layer_norm1", "layer_norm2"):
            tower[f"{q}.{ln}.weight"], tower[f"{q}.{ln}.bias"] = vec(h, 0.1, 1.0), vec(h)
        tower[f"{q}.mlp.fc1.weight"], tower[f"{q}.mlp.fc1.bias"] = mat(i, h), vec(i)
        tower[f"{q}.mlp.fc2.weight"], tower[f"{q}.mlp.fc2.bias"] = mat(h, i), vec(h)
    m = 4 * h
    projector = {"layers.1.weight": vec(m, 0.1, 1.0), "layers.1.bias": vec(m),
                 "layers.2.weight": mat(llm_hidden, m), "layers.2.bias": vec(llm_hidden),
                 "layers.4.weight": mat(llm_hidden, llm_hidden) * 4, "layers.4.bias": vec(llm_hidden)}
    return tower, projector


# ---- torch zip checkpoints without torch ----

def _bin_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _bin_int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


_EMPTY_ORDERED_DICT = b"ccollections\nOrderedDict\n)R"
_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage"}


def write_torch_checkpoint(path: Path, tensors: dict[str, np.ndarray], prefix: str = "") -> Path:
    """torch.save(state_dict)'s zip layout: archive/data.pkl (protocol 2, tensors rebuilt by
    torch._utils._rebuild_tensor_v2 over persistent storages) + archive/data/<key> + archive/byteorder."""
    pkl = bytearray(b"\x80\x02" + _EMPTY_ORDERED_DICT + b"(")
    storages = {}
    for key, (name, arr) in enumerate(tensors.items()):
        arr = np.ascontiguousarray(arr)
        strides = [s // arr.itemsize for s in arr.strides]
        pkl += _bin_str(prefix + name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        pkl += (b"(" + _bin_str("storage") + b"ctorch\n" + _STORAGES[arr.dtype].encode() + b"\n"
                + _bin_str(str(key)) + _bin_str("cpu") + _bin_int(arr.size) + b"tQ")
        pkl += _bin_int(0) + b"(" + b"".join(map(_bin_int, arr.shape)) + b"t"
        pkl += b"(" + b"".join(map(_bin_int, strides)) + b"t" + b"\x89" + _EMPTY_ORDERED_DICT + b"tR"
        storages[str(key)] = arr.tobytes()
    pkl += b"u."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", bytes(pkl))
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def _save(folder: Path, tensors: dict, fmt: str, prefix: str = "") -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({prefix + k: v for k, v in tensors.items()}, str(folder / "model.safetensors"))
    else:
        write_torch_checkpoint(folder / "pytorch_model.bin", tensors, prefix)


def write_vila(root: Path, llm: dict | None = None, fmt: str = "safetensors", seed: int = 0,
               prefixed: bool = False, tokenizer_from: Path | None = None, **config_over) -> Path:
    """A VILA1.5 checkpoint root: config.json, llm/ (a float Llama), vision_tower/, mm_projector/."""
    llm = llm or llm_config()
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(vila_config(llm, **config_over)))
    weights = random_weights(llm, seed=seed)
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] *= 4.0  # clear argmax winners
    write_model(root / "llm", llm, weights, tokenizer_from=tokenizer_from)
    tower, projector = vision_tensors(VISION, llm["hidden_size"], seed=seed + 1)
    _save(root / "vision_tower", tower, fmt, "vision_tower.vision_tower." if prefixed else "")
    (root / "vision_tower" / "config.json").write_text(json.dumps(VISION))
    (root / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 70, "width": 70}}))
    _save(root / "mm_projector", projector, fmt, "mm_projector." if prefixed else "")
    (root / "mm_projector" / "config.json").write_text(json.dumps(vila_config(llm)["mm_projector_cfg"]))
    return root


# ---- shards ----

def png(seed: int, h: int = 60, w: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, 3))
    grad = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    return encode_png(((base + grad + rng.integers(0, 30, (h, w, 3))) % 256).astype(np.uint8))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (name, bytes) members in order (a name ending in '/' is a directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def caption_shard_members(first: int, count: int,
                          bad: dict[int, str] | None = None) -> list[tuple[str, bytes]]:
    """Samples first..first+count-1: a png image, a txt and a json each; bad: index -> 'corrupt' (a PNG with
    broken image data), 'missing' (no image member)."""
    bad = bad or {}
    members = []
    for i in range(first, first + count):
        key = f"{i:06d}"
        kind = bad.get(i)
        if kind == "corrupt":
            data = png(i)
            members.append((f"{key}.png", data[:40] + b"\x00" * 20 + data[60:]))
        elif kind != "missing":
            members.append((f"{key}.png", png(i)))
        members.append((f"{key}.txt", f"alt text {i}".encode()))
        members.append((f"{key}.json", json.dumps({"id": i}).encode()))
    return members


def quantize_llm(src: Path, out: Path, w_bit: int) -> Path:
    """src's float Llama as a quantized checkpoint: W4A8KV4 per-channel or W8A8KV8 (round to nearest)."""
    cfg = json.loads((src / "config.json").read_text())
    weights = load_llama_weights(ModelConfig.from_dict(cfg), src)
    for layer in weights.layers:
        for _, name in LINEARS:
            w = np.asarray(getattr(layer, name).weight, np.float64)
            if w_bit == 4:
                setattr(layer, name, W4A8Linear(quantize_w4_per_channel(w)))
            else:
                setattr(layer, name, W8A8Linear(quantize_w8_per_channel(w)))
    qc = {"quant_method": "qoq", "w_bit": w_bit, "a_bit": 8, "group_size": -1, "kv_bit": w_bit}
    return save_quantized(out, cfg, weights, qc, src)
