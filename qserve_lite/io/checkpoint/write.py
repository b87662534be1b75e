"""Write a quantized model as a QServe-format checkpoint (layout.py): safetensors shards, config.json with
quantization_config, and the tokenizer files, all written atomically.

Every linear is checked against the config and quantization_config before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.pack import TILE, pack_w4, to_qserve_group_params
from qserve_lite.errors import ConfigError, WeightsError
from qserve_lite.io.atomic_dir import atomic_output_dir, check_output_dir
from qserve_lite.io.checkpoint.layout import LINEARS, PRODUCER, linear_shapes, padded_k, validate_quant_config
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.model.weights import LlamaWeights

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")
_OWNED = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")


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


def _layer_tensors(cfg: ModelConfig, i: int, layer, qc: dict) -> dict[str, np.ndarray]:
    h = cfg.hidden_size
    shapes = linear_shapes(cfg)
    p = f"model.layers.{i}"
    out = {}
    for norm_name, arr in (("input_layernorm", layer.input_norm),
                           ("post_attention_layernorm", layer.post_attn_norm)):
        out[f"{p}.{norm_name}.weight"] = _float_tensor(f"{p}.{norm_name}.weight", arr, (h,))
    for (block, lname) in LINEARS:
        n, k = shapes[f"{block}.{lname}"]
        out.update(_encode_linear(f"{p}.{block}.{lname}", getattr(layer, lname), n, k, qc))
    return out


def _end_tensors(cfg: ModelConfig, weights: LlamaWeights) -> dict[str, np.ndarray]:
    h = cfg.hidden_size
    if not isinstance(weights.lm_head, Linear):
        raise WeightsError(
            "lm_head must be an unquantized Linear for QServe checkpoints, got "
            f"{type(weights.lm_head).__name__}"
        )
    return {"model.embed_tokens.weight": _float_tensor("model.embed_tokens.weight", weights.embed_tokens,
                                                       (cfg.vocab_size, h)),
            "model.norm.weight": _float_tensor("model.norm.weight", weights.final_norm, (h,)),
            "lm_head.weight": _float_tensor("lm_head.weight", weights.lm_head.weight, (cfg.vocab_size, h))}


class _ShardWriter:
    """Writes tensors into safetensors shards of at most max_shard_bytes as they arrive (hidden .part files
    while writing); `finish` names them model.safetensors or model-i-of-n.safetensors + the index."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.dir, self.max_bytes = directory, max_shard_bytes
        self.shard: dict[str, np.ndarray] = {}
        self.size = self.total = 0
        self.parts: list[list[str]] = []

    def add(self, name: str, arr: np.ndarray) -> None:
        if self.shard and self.size + arr.nbytes > self.max_bytes:
            self.flush()
        self.shard[name] = np.ascontiguousarray(arr)
        self.size += arr.nbytes
        self.total += arr.nbytes

    def flush(self) -> None:
        from safetensors.numpy import save_file

        if self.shard:
            save_file(self.shard, str(self.dir / f".part-{len(self.parts):05d}.safetensors"),
                      metadata={"format": "pt"})
            self.parts.append(list(self.shard))
            self.shard, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        tmp, parts = self.dir, self.parts
        if len(parts) == 1:
            os.replace(tmp / ".part-00000.safetensors", tmp / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(parts):
            fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            os.replace(tmp / f".part-{i:05d}.safetensors", tmp / fname)
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
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


def owned_by_checkpoint(name: str) -> bool:
    """True for the file names a checkpoint consists of (what --overwrite replaces; other files are kept)."""
    return bool(_OWNED.fullmatch(name)) or name in TOKENIZER_FILES


class CheckpointWriter:
    """Writes a QServe-format checkpoint as its parts arrive, so a quantizer can hand over each decoder layer
    when it is done and drop it (host memory holds one layer, not the model):

        with CheckpointWriter(out_dir, config, quant_config, tokenizer_dir) as w:
            w.add_layer(0, layer0) ...; w.add_ends(weights)

    The output target is checked when the writer is made (before any work); the files go to a temporary
    directory beside out_dir that becomes out_dir when the block ends without error (atomic_output_dir),
    and is removed on an error, Ctrl-C or SIGTERM.
    """

    def __init__(self, out_dir: str | Path, config: dict, quant_config: dict,
                 tokenizer_dir: str | Path | None, *, overwrite: bool = False,
                 max_shard_bytes: int = MAX_SHARD_BYTES, sources: tuple = (),
                 overwrite_flag: str = "overwrite=True", out_flag: str = "output directory"):
        self.qc = validate_quant_config(quant_config)
        self.cfg = ModelConfig.from_dict(config, source="config")
        self.out_dir = check_output_dir(out_dir, WeightsError, overwrite=overwrite, sources=sources,
                                        overwrite_flag=overwrite_flag, out_flag=out_flag)
        self.config, self.tokenizer_dir, self.max_shard_bytes = config, tokenizer_dir, max_shard_bytes
        self._stack: ExitStack | None = None
        self._shards: _ShardWriter | None = None
        self._layers: set[int] = set()
        self._ends = False
        self._unfolded = False

    def __enter__(self) -> CheckpointWriter:
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_output_dir(self.out_dir, WeightsError, "the checkpoint",
                                                        owned=owned_by_checkpoint))
            self._shards = _ShardWriter(tmp, self.max_shard_bytes)
            self._stack = stack.pop_all()
        return self

    def add_layer(self, i: int, layer) -> None:
        """Encode and write decoder layer i (every linear checked against the config first)."""
        if i in self._layers or not 0 <= i < self.cfg.num_layers:
            raise WeightsError(f"layer {i} given twice or out of range (the model has {self.cfg.num_layers})")
        for name, arr in _layer_tensors(self.cfg, i, layer, self.qc).items():
            self._shards.add(name, arr)
        self._layers.add(i)
        norms = (layer.input_norm, layer.post_attn_norm)
        self._unfolded |= not all(np.all(np.asarray(a) == 1) for a in norms)

    def add_ends(self, weights: LlamaWeights) -> None:
        """The embeddings, the final norm and lm_head."""
        for name, arr in _end_tensors(self.cfg, weights).items():
            self._shards.add(name, arr)
        self._ends = True
        self._unfolded |= not bool(np.all(np.asarray(weights.final_norm) == 1))

    def _finish(self) -> None:
        missing = sorted(set(range(self.cfg.num_layers)) - self._layers)
        if missing or not self._ends:
            raise WeightsError(f"checkpoint incomplete: layers {missing} missing"
                               if missing else "checkpoint incomplete: embeddings / lm_head missing")
        if self._unfolded and self.qc["w_bit"] == 4:
            log.warning(
                "saving W4A8 checkpoint %s with norm weights that are not all ones: qserve-lite applies "
                "them, but QServe's W4A8 runtime ignores norm weights (fold them into the linears first "
                "for a QServe-compatible checkpoint)", self.out_dir,
            )
        self._shards.finish()
        tmp = self._shards.dir
        (tmp / "config.json").write_text(json.dumps(_output_config(self.config, self.cfg, self.qc), indent=2)
                                         + "\n")
        for f in _tokenizer_files(self.tokenizer_dir):
            shutil.copyfile(f, tmp / f.name)

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                if not stack.__exit__(*sys.exc_info()):
                    raise
                return False
        return bool(stack.__exit__(exc_type, exc, tb))


def save_quantized(out_dir: str | Path, config: dict, weights: LlamaWeights, quant_config: dict,
                   tokenizer_dir: str | Path | None, *, overwrite: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES, overwrite_flag: str = "overwrite=True") -> Path:
    """Write a QServe-format quantized checkpoint (safetensors + config.json + tokenizer files) to out_dir.

    config: the model's HF config dict; quant_config: at least quant_method 'qoq', w_bit, a_bit, group_size,
    kv_bit (other keys are kept). Written atomically: a temp directory renamed into place. A non-empty
    out_dir is written to only with overwrite=True, which replaces the checkpoint's own files there and keeps
    every other file. Returns out_dir.
    """
    writer = CheckpointWriter(out_dir, config, quant_config, tokenizer_dir, overwrite=overwrite,
                              max_shard_bytes=max_shard_bytes, overwrite_flag=overwrite_flag,
                              sources=() if tokenizer_dir is None else (tokenizer_dir,))
    if len(weights.layers) != writer.cfg.num_layers:
        raise WeightsError(f"weights have {len(weights.layers)} layers but the config says "
                           f"{writer.cfg.num_layers}")
    _check_weights(writer.cfg, weights, writer.qc)
    with writer:
        writer.add_ends(weights)
        for i, layer in enumerate(weights.layers):
            writer.add_layer(i, layer)
    return Path(out_dir).expanduser()
