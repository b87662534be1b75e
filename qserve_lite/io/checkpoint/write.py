"""Write a quantized model as a QServe-format checkpoint (layout.py): safetensors shards, config.json with
quantization_config, and the tokenizer files, all written atomically.

Every linear is checked against the config and quantization_config before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.pack import TILE, pack_w4, to_qserve_group_params
from qserve_lite.errors import ConfigError, WeightsError
from qserve_lite.io.atomic_dir import atomic_output_dir
from qserve_lite.io.checkpoint.layout import LINEARS, PRODUCER, linear_shapes, padded_k, validate_quant_config
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.model.weights import LlamaWeights

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")


# ------------------------------------------------------------------------------------------- checks


def _w4_weight(name: str, q, w_bit: int, group_size: int):
    """The W4A8 linear's weight, after checking it matches quantization_config's w_bit and group_size."""
    if w_bit != 4:
        raise ConfigError(f"{name} is a W4A8 linear but quantization_config has w_bit={w_bit}")
    if isinstance(q, W4Group) and group_size != q.group_size:
        raise ConfigError(
            f"{name} is quantized per group of {q.group_size} but quantization_config has "
            f"group_size={group_size}"
        )
    if isinstance(q, W4PerChannel) and group_size != -1:
        raise ConfigError(
            f"{name} is quantized per channel but quantization_config has group_size={group_size}"
        )
    if not isinstance(q, (W4Group, W4PerChannel)):
        raise WeightsError(
            f"{name}: W4A8Linear holds a {type(q).__name__}, expected W4PerChannel or W4Group"
        )
    return q


def _w8_weight(name: str, q, w_bit: int):
    """The W8A8 linear's weight, after checking quantization_config has w_bit 8."""
    if w_bit != 8:
        raise ConfigError(f"{name} is a W8A8 linear but quantization_config has w_bit={w_bit}")
    if not isinstance(q, W8PerChannel):
        raise WeightsError(f"{name}: W8A8Linear holds a {type(q).__name__}, expected W8PerChannel")
    return q


def _quantized_weight(name: str, lin, qc: dict):
    """The linear's quantized weight (W4PerChannel, W4Group or W8PerChannel), matching quantization_config."""
    if isinstance(lin, W4A8Linear):
        return _w4_weight(name, lin.qweight, qc["w_bit"], qc["group_size"])
    if isinstance(lin, W8A8Linear):
        return _w8_weight(name, lin.qweight, qc["w_bit"])
    raise WeightsError(
        f"{name} is not quantized ({type(lin).__name__}); quantize every decoder linear before saving"
    )


def _check_shapes(name: str, q, bias, n: int, k: int) -> None:
    """Codes [n, >= k], per-channel vectors [n] and the bias [n] match the config's shape."""
    codes = np.asarray(q.codes)
    if codes.ndim != 2 or codes.shape[0] != n or q.in_features != k or codes.shape[1] < k:
        raise WeightsError(
            f"{name} has {codes.shape[0]} x {q.in_features} weights (codes {list(codes.shape)}), "
            f"expected {n} x {k} from config.json"
        )
    vectors = {"s1": q.s1} if isinstance(q, W4Group) else {"scales": q.scales}
    if isinstance(q, W4PerChannel):
        vectors["szeros"] = q.szeros
    for attr, v in vectors.items():
        if np.shape(v) != (n,):
            raise WeightsError(f"{name}: {attr} has shape {list(np.shape(v))}, expected [{n}]")
    if bias is not None and np.shape(bias) != (n,):
        raise WeightsError(f"{name}.bias has shape {list(np.shape(bias))}, expected [{n}]")


def _check_w4_layout(name: str, q, n: int, k: int, group_size: int) -> None:
    """The W4 weight fits QServe's packed layout: n a multiple of TILE, g128 codes and s2 cover padded K."""
    if n % TILE:
        raise WeightsError(
            f"{name} has {n} output channels; QServe's packed W4 layout needs a multiple of {TILE}. "
            "This model cannot be stored as W4A8 (use W8A8)"
        )
    kp = padded_k(k, group_size)
    codes = np.asarray(q.codes)
    if isinstance(q, W4Group) and (codes.shape[1] != kp or q.s2.shape != (n, kp // group_size)
                                   or q.zeros.shape != q.s2.shape):
        raise WeightsError(
            f"{name}: g{group_size} codes {list(codes.shape)} / s2 {list(q.s2.shape)} do not cover K={k} "
            f"padded to {kp}"
        )


def _check_linear(name: str, lin, n: int, k: int, qc: dict):
    """The linear's quantized weight, after checking it fits the config and quantization_config."""
    q = _quantized_weight(name, lin, qc)
    _check_shapes(name, q, lin.bias, n, k)
    if not isinstance(q, W8PerChannel):
        _check_w4_layout(name, q, n, k, qc["group_size"])
    return q


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(
            f"output path {out_dir} exists and is not a directory; choose another output directory"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise WeightsError(
            f"output directory {out_dir} already exists and is not empty; remove it, choose another "
            "directory or pass overwrite=True"
        )


def _check_weights(cfg: ModelConfig, weights: LlamaWeights, qc: dict) -> None:
    """Every decoder linear and lm_head can be stored (so that a failure happens before writing anything)."""
    shapes = linear_shapes(cfg)
    for i, layer in enumerate(weights.layers):
        for block, lname in LINEARS:
            n, k = shapes[f"{block}.{lname}"]
            _check_linear(f"model.layers.{i}.{block}.{lname}", getattr(layer, lname), n, k, qc)
    if not isinstance(weights.lm_head, Linear):
        raise WeightsError(
            "lm_head must be an unquantized Linear for QServe checkpoints, got "
            f"{type(weights.lm_head).__name__}"
        )


def _warn_unfolded_norms(weights: LlamaWeights, qc: dict, out_dir: Path) -> None:
    if qc["w_bit"] != 4:
        return
    norms = [weights.final_norm]
    norms += [x for lw in weights.layers for x in (lw.input_norm, lw.post_attn_norm)]
    if not all(np.all(np.asarray(a) == 1) for a in norms):
        log.warning(
            "saving W4A8 checkpoint %s with norm weights that are not all ones: qserve-lite applies "
            "them, but QServe's W4A8 runtime ignores norm weights (fold them into the linears first "
            "for a QServe-compatible checkpoint)", out_dir,
        )


# ------------------------------------------------------------------------------------------- tensors


def _encode_linear(name: str, lin, n: int, k: int, qc: dict) -> dict[str, np.ndarray]:
    q = _check_linear(name, lin, n, k, qc)
    codes = np.asarray(q.codes)
    out: dict[str, np.ndarray] = {}
    if isinstance(q, W8PerChannel):
        out["weight"] = np.ascontiguousarray(codes[:, :k], dtype=np.int8)
        out["dequant_scale"] = np.asarray(q.scales, np.float16)
    else:
        kp = padded_k(k, qc["group_size"])
        if isinstance(q, W4Group):
            packed_codes = codes
            out["s1_scales"] = np.asarray(q.s1, np.float16)
            out["s2_scales"], out["s2_zeros"] = to_qserve_group_params(q.s2, q.zeros)
        else:
            packed_codes = np.zeros((n, kp), np.uint8)  # padding columns meet zero activations
            packed_codes[:, :k] = codes[:, :k]
            out["s1_scales"] = np.asarray(q.scales, np.float16)
            out["s1_szeros"] = np.asarray(q.szeros, np.float16)
        out["qweight"] = pack_w4(packed_codes)
    if lin.bias is not None:
        out["bias"] = np.asarray(lin.bias).astype(np.float16)
    return {f"{name}.{key}": v for key, v in out.items()}


def _float_tensor(name: str, arr, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != shape:
        raise WeightsError(f"{name} has shape {list(a.shape)}, expected {list(shape)} from config.json")
    return a.astype(np.float16)


def _tensor_stream(cfg: ModelConfig, weights: LlamaWeights, qc: dict):
    h = cfg.hidden_size
    yield "model.embed_tokens.weight", _float_tensor("model.embed_tokens.weight", weights.embed_tokens,
                                                     (cfg.vocab_size, h))
    shapes = linear_shapes(cfg)
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}"
        out = {}
        for norm_name, arr in (("input_layernorm", layer.input_norm),
                               ("post_attention_layernorm", layer.post_attn_norm)):
            out[f"{p}.{norm_name}.weight"] = _float_tensor(f"{p}.{norm_name}.weight", arr, (h,))
        for (block, lname) in LINEARS:
            n, k = shapes[f"{block}.{lname}"]
            out.update(_encode_linear(f"{p}.{block}.{lname}", getattr(layer, lname), n, k, qc))
        yield from out.items()
    yield "model.norm.weight", _float_tensor("model.norm.weight", weights.final_norm, (h,))
    yield "lm_head.weight", _float_tensor("lm_head.weight", weights.lm_head.weight, (cfg.vocab_size, h))


def _write_shards(tmp: Path, stream, max_shard_bytes: int) -> None:
    from safetensors.numpy import save_file

    meta = {"format": "pt"}
    shard: dict[str, np.ndarray] = {}
    size = 0
    parts: list[list[str]] = []
    total = 0

    def flush():
        nonlocal shard, size
        if shard:
            save_file(shard, str(tmp / f".part-{len(parts):05d}.safetensors"), metadata=meta)
            parts.append(list(shard))
            shard, size = {}, 0

    for name, arr in stream:
        if shard and size + arr.nbytes > max_shard_bytes:
            flush()
        shard[name] = np.ascontiguousarray(arr)
        size += arr.nbytes
        total += arr.nbytes
    flush()
    if len(parts) == 1:
        os.replace(tmp / ".part-00000.safetensors", tmp / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(tmp / f".part-{i:05d}.safetensors", tmp / fname)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- config.json


def _padding_record(cfg: ModelConfig, qc: dict) -> dict:
    if qc["w_bit"] == 8:
        return {}
    rec = {}
    for key, (_n, k) in linear_shapes(cfg).items():
        kp = padded_k(k, qc["group_size"])
        if kp != k:
            rec[f"model.layers.*.{key}"] = {"in_features": k, "padded_in_features": kp}
    return rec


def _output_config(config: dict, cfg: ModelConfig, qc: dict) -> dict:
    """config.json of the checkpoint: the model's config with the completed quantization_config."""
    qc["k_padding"] = ("codes zero-padded along K to a multiple of group_size (g128) or of 32 (per-channel); "
                       "true K from hidden_size, intermediate_size, num_attention_heads * head_dim")
    qc["padded_in_features"] = _padding_record(cfg, qc)
    qc["producer"] = PRODUCER
    qc["checkpoint_format"] = "qserve"
    return dict(config, tie_word_embeddings=False, torch_dtype="float16", quantization_config=qc)


def _tokenizer_files(tokenizer_dir: str | Path | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    tok_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
    if not tok_files:
        log.warning("no tokenizer files (%s) in %s; the checkpoint will need a separate tokenizer",
                    ", ".join(TOKENIZER_FILES), tokenizer_dir)
    return tok_files


def save_quantized(out_dir: str | Path, config: dict, weights: LlamaWeights, quant_config: dict,
                   tokenizer_dir: str | Path | None, *, overwrite: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a QServe-format quantized checkpoint (safetensors + config.json + tokenizer files) to out_dir.

    config: the model's HF config dict; quant_config: at least quant_method 'qoq', w_bit, a_bit, group_size,
    kv_bit (other keys are kept). Written atomically: a temp directory renamed into place. An existing
    non-empty out_dir is replaced only with overwrite=True. Returns out_dir.
    """
    out_dir = Path(out_dir).expanduser()
    qc = validate_quant_config(quant_config)
    cfg = ModelConfig.from_dict(config, source="config")
    if len(weights.layers) != cfg.num_layers:
        raise WeightsError(f"weights have {len(weights.layers)} layers but the config says {cfg.num_layers}")
    _check_out_dir(out_dir, overwrite)
    _check_weights(cfg, weights, qc)
    _warn_unfolded_norms(weights, qc, out_dir)
    cfg_out = _output_config(config, cfg, qc)
    tok_files = _tokenizer_files(tokenizer_dir)

    with atomic_output_dir(out_dir, WeightsError, "the checkpoint") as tmp:
        _write_shards(tmp, _tensor_stream(cfg, weights, qc), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)
    return out_dir
