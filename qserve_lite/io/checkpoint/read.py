"""Read quantized checkpoints (ours, safetensors, and QServe zoo ones, zoo.py) into LlamaWeights.

read_quant_config resolves the checkpoint's quantization_config (inferring it from the tensor names when
config.json has none), read_quantized_weights loads the weights (decoder linears as W4A8Linear / W8A8Linear),
is_quantized_checkpoint tells quantized checkpoints from float models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.core.model_config import ModelConfig, json_kind
from qserve_lite.core.pack import TILE, from_qserve_group_params, unpack_w4
from qserve_lite.errors import ConfigError, WeightsError
from qserve_lite.io.checkpoint.layout import (
    LINEARS,
    granularity_name,
    linear_shapes,
    padded_k,
    validate_quant_config,
)
from qserve_lite.io.checkpoint.zoo import NormReader, inferred_quant_config, open_torch_index
from qserve_lite.io.hf_weights import TensorIndex
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.model.weights import LayerWeights, LlamaWeights

# ------------------------------------------------------------------------------------------- format


def _open_tensors(model_dir: Path):
    if not model_dir.is_dir():
        raise WeightsError(f"quantized checkpoint directory not found: {model_dir}")
    if (model_dir / "model.safetensors.index.json").is_file() or any(model_dir.glob("*.safetensors")):
        return TensorIndex(model_dir)
    idx = open_torch_index(model_dir)
    if idx is None:
        raise WeightsError(
            f"no quantized weights in {model_dir}: expected *.safetensors (qserve-lite) or pytorch_model.bin "
            "(QServe model zoo)"
        )
    return idx


def _detect_format(idx, model_dir: Path) -> tuple[int, int]:
    """(w_bit, group_size) from the tensors of layer 0's q_proj."""
    p = "model.layers.0.self_attn.q_proj"
    if f"{p}.qweight" in idx:
        if f"{p}.s2_scales" in idx:
            return 4, 128
        if f"{p}.s1_szeros" in idx:
            return 4, -1
        raise WeightsError(
            f"{model_dir}: {p}.qweight has neither s2_scales (g128) nor s1_szeros (per-channel) next to it; "
            "the checkpoint is incomplete"
        )
    if f"{p}.dequant_scale" in idx:
        return 8, -1
    if f"{p}.weight" in idx:
        raise WeightsError(
            f"{model_dir} holds unquantized weights ({p}.weight, no qweight/dequant_scale); load it as a "
            "float model or quantize it first"
        )
    raise WeightsError(f"{model_dir}: no tensors for {p} (qweight or weight); not a Llama-family checkpoint?")


def _config_quant(model_dir: Path) -> dict | None:
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {json_kind(cfg)}")
    return cfg.get("quantization_config")


def _resolve_quant_config(qc_raw, idx, model_dir: Path, source: str) -> dict:
    w_bit, group_size = _detect_format(idx, model_dir)
    if qc_raw is None:
        return inferred_quant_config(w_bit, group_size)
    qc = validate_quant_config(qc_raw, source)
    if (qc["w_bit"], qc["group_size"]) != (w_bit, group_size):
        raise WeightsError(
            f"{model_dir}: {source} says {granularity_name(qc['w_bit'], qc['group_size'])} weights but "
            f"the tensors are {granularity_name(w_bit, group_size)}; the checkpoint is inconsistent "
            "(re-export it)"
        )
    return qc


def read_quant_config(model_dir: str | Path) -> dict:
    """The checkpoint's quantization_config (validated), or one inferred from the tensor names when
    config.json has none (zoo checkpoints): then kv_bit defaults to 4 and the dict has 'inferred': True."""
    model_dir = Path(model_dir).expanduser()
    qc_raw = _config_quant(model_dir)
    idx = _open_tensors(model_dir)
    try:
        source = f"{model_dir / 'config.json'} quantization_config"
        return _resolve_quant_config(qc_raw, idx, model_dir, source)
    finally:
        idx.close()


def is_quantized_checkpoint(model_dir: str | Path) -> bool:
    """True when model_dir holds a quantized checkpoint: config.json has quantization_config, or (QServe zoo
    checkpoints, which have none) layer 0's q_proj is stored as qweight / dequant_scale."""
    model_dir = Path(model_dir).expanduser()
    if _config_quant(model_dir) is not None:
        return True
    try:
        idx = _open_tensors(model_dir)
    except WeightsError:
        return False
    try:
        p = "model.layers.0.self_attn.q_proj"
        return f"{p}.qweight" in idx or f"{p}.dequant_scale" in idx
    finally:
        idx.close()


# ------------------------------------------------------------------------------------------- tensors


def _get_int8(idx, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = idx.get(name, shape, dtype=None)
    if a.dtype not in (np.int8, np.uint8):
        raise WeightsError(f"tensor '{name}' has dtype {a.dtype}, expected int8 (a quantized checkpoint)")
    return a.view(np.int8)


def _get_vector(idx, name: str, n: int) -> np.ndarray:
    """An fp16 [n] vector; [n, 1] and [1, n] (older exports) are accepted."""
    if name in idx and idx.shape(name) in ((n, 1), (1, n)):
        return idx.get(name, None, dtype=np.float16).reshape(n)
    return idx.get(name, (n,), dtype=np.float16)


def _require(idx, name: str, granularity: str) -> None:
    if name not in idx:
        raise WeightsError(
            f"tensor '{name}' is missing from {idx.model_dir}: the checkpoint is not uniformly {granularity}"
        )


def _read_w4(idx, name: str, n: int, k: int, group_size: int):
    if n % TILE:
        raise WeightsError(
            f"{name}: {n} output channels is not a multiple of {TILE}, so it cannot be packed W4"
        )
    kp = padded_k(k, group_size)
    codes = unpack_w4(_get_int8(idx, f"{name}.qweight", (n, kp // 2)))
    s1 = _get_vector(idx, f"{name}.s1_scales", n)
    if group_size > 0:
        for part in ("s2_scales", "s2_zeros"):
            _require(idx, f"{name}.{part}", "per-group (g128)")
        g = kp // group_size
        s2, zeros = from_qserve_group_params(_get_int8(idx, f"{name}.s2_scales", (g, n)),
                                             _get_int8(idx, f"{name}.s2_zeros", (g, n)))
        return W4Group(codes, s1, s2, zeros, group_size, in_features=k)
    _require(idx, f"{name}.s1_szeros", "per-channel")
    szeros = _get_vector(idx, f"{name}.s1_szeros", n)
    return W4PerChannel(codes, s1, szeros, in_features=k)


def _read_linear(idx, name: str, n: int, k: int, qc: dict, bias_required: bool):
    bias = None
    if bias_required or f"{name}.bias" in idx:
        bias = idx.get(f"{name}.bias", (n,), dtype=np.float32)
    if qc["w_bit"] == 8:
        codes = _get_int8(idx, f"{name}.weight", (n, k))
        scales = _get_vector(idx, f"{name}.dequant_scale", n)
        return W8A8Linear(W8PerChannel(codes, scales, in_features=k), bias)
    return W4A8Linear(_read_w4(idx, name, n, k, qc["group_size"]), bias)


def _read_layer(idx, cfg: ModelConfig, i: int, qc: dict, norm: NormReader) -> LayerWeights:
    p = f"model.layers.{i}"
    shapes = linear_shapes(cfg)
    lin = {}
    for block, lname in LINEARS:
        n, k = shapes[f"{block}.{lname}"]
        need_bias = cfg.qkv_bias and lname in ("q_proj", "k_proj", "v_proj")
        lin[lname] = _read_linear(idx, f"{p}.{block}.{lname}", n, k, qc, need_bias)
    return LayerWeights(input_norm=norm(f"{p}.input_layernorm.weight"),
                        post_attn_norm=norm(f"{p}.post_attention_layernorm.weight"), **lin)


def _read_lm_head(idx, cfg: ModelConfig, embed: np.ndarray, model_dir: Path) -> Linear:
    if "lm_head.weight" in idx:
        return Linear(idx.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), dtype=np.float32))
    if cfg.tie_word_embeddings:
        return Linear(embed)
    raise WeightsError(
        f"tensor 'lm_head.weight' is missing from {model_dir} and config.json does not set "
        "tie_word_embeddings"
    )


def _read_weights(idx, cfg: ModelConfig, qc: dict, norm: NormReader, model_dir: Path) -> LlamaWeights:
    embed = idx.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), dtype=np.float32)
    layers = [_read_layer(idx, cfg, i, qc, norm) for i in range(cfg.num_layers)]
    final_norm = norm("model.norm.weight")
    lm_head = _read_lm_head(idx, cfg, embed, model_dir)
    return LlamaWeights(embed_tokens=embed, layers=layers, final_norm=final_norm, lm_head=lm_head,
                        extra={"quantization_config": qc})


def _quant_config_source(cfg: ModelConfig, model_dir: Path):
    """(raw quantization_config, where it came from): the loaded config's, else config.json's (maybe None)."""
    qc_raw = cfg.extra.get("quantization_config") if isinstance(cfg.extra, dict) else None
    if qc_raw is not None:
        return qc_raw, "config quantization_config"
    return _config_quant(model_dir), f"{model_dir / 'config.json'} quantization_config"


def _check_group_size(qc: dict, group_size: int | None, model_dir: Path) -> None:
    if group_size is None or group_size == qc["group_size"]:
        return
    have = granularity_name(qc["w_bit"], qc["group_size"])
    if qc["w_bit"] == 8:
        hint = "omit the group size (W8A8 has no groups)"
    else:
        hint = f"use group size {qc['group_size']} (or omit it)"
    raise WeightsError(f"checkpoint {model_dir} is {have} but group_size={group_size} was requested; {hint}")


def read_quantized_weights(cfg: ModelConfig, model_dir: str | Path,
                           group_size: int | None = None) -> LlamaWeights:
    """Load a QServe-format quantized checkpoint (ours or a QServe zoo one) into LlamaWeights.

    Decoder linears become W4A8Linear / W8A8Linear; embeddings, norms and lm_head are float32. group_size
    (the user's --group-size, -1 or 128) must match the checkpoint's granularity when given.
    weights.extra["quantization_config"] holds the resolved quantization config.
    """
    model_dir = Path(model_dir).expanduser()
    qc_raw, source = _quant_config_source(cfg, model_dir)
    idx = _open_tensors(model_dir)
    try:
        qc = _resolve_quant_config(qc_raw, idx, model_dir, source)
        _check_group_size(qc, group_size, model_dir)
        norm = NormReader(idx, cfg.hidden_size, qc)
        weights = _read_weights(idx, cfg, qc, norm, model_dir)
    finally:
        idx.close()
    norm.warn(model_dir)
    return weights
