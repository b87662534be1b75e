"""Quantized checkpoints in QServe's model-zoo format: write ours, read ours and QServe's.

Tensor names (per decoder layer i, linear L in self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj):

- W4A8 per-channel:  model.layers.i.L.qweight (int8 [n, k_pad / 2], packed, see core/pack.py),
                     .s1_scales fp16 [n], .s1_szeros fp16 [n] (= zero * scale)
- W4A8 g128:         .qweight, .s1_scales fp16 [n],
                     .s2_scales int8 [k_pad / 128, n], .s2_zeros int8 [k_pad / 128, n]
- W8A8:              .weight int8 [n, k], .dequant_scale fp16 [n]
- all:               .bias fp16 [n] when the linear has one

plus model.embed_tokens.weight, lm_head.weight (always written, fp16) and the norm weights (fp16).

K padding: the packed layout needs K to be a multiple of 32 (per-channel) or of the group size (g128, so
K = 576 becomes 640); padded code columns meet zero activations. The true K always comes from the model
config (hidden_size, intermediate_size, num_heads * head_dim); quantization_config["padded_in_features"]
records the padded widths for readers that do not know this rule.

Reading accepts our safetensors checkpoints and QServe zoo checkpoints (``pytorch_model.bin``, read without
torch by torch_pickle.py). A zoo checkpoint may have no quantization_config: the granularity then comes from
the tensor names. QServe's W4A8 runtime ignores norm weights (QoQ folds them into the linears): for zoo W4A8
checkpoints we do the same and warn when the stored norms are not all ones.

quantization_config["k_hadamard"] (ours, written true by default by `qserve-lite quantize`): the runtime
multiplies q and k per head by the normalized Hadamard matrix after RoPE, before the KV cache (model/llama.py,
cuda/kv_writer.cu), which makes the KV4 K cache much more accurate. Such checkpoints are meant for
qserve-lite: QServe's own runtime does not know this key and never rotates (it would run the weights with the
less accurate K cache it was not calibrated for); `quantize --no-k-hadamard` writes false, for strict
QServe-runtime compatibility. Absent (QServe zoo checkpoints, older ones): false.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from qserve_lite.errors import ConfigError, WeightsError
from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.core.pack import TILE, from_qserve_group_params, pack_w4, to_qserve_group_params, unpack_w4
from qserve_lite.io.atomic_dir import atomic_output_dir
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.io.torch_pickle import TorchCheckpoint
from qserve_lite.model.weights import LayerWeights, LlamaWeights, TensorIndex

log = logging.getLogger(__name__)

PRODUCER = "qserve-lite"
MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
_REQUIRED_QC = ("quant_method", "w_bit", "a_bit", "group_size", "kv_bit")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, true in_features) of every decoder linear, keyed by 'self_attn.q_proj' etc."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    return {
        "self_attn.q_proj": (cfg.q_size, h), "self_attn.k_proj": (cfg.kv_size, h),
        "self_attn.v_proj": (cfg.kv_size, h), "self_attn.o_proj": (h, cfg.q_size),
        "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter),
    }


def padded_k(in_features: int, group_size: int) -> int:
    """Width of the stored W4 codes: K rounded up to the group size (g128) or to 32 (per-channel)."""
    return _round_up(in_features, group_size if group_size > 0 else TILE)


def validate_quant_config(qc, source: str = "quantization_config") -> dict:
    """Check the keys every reader relies on; returns a copy with ints normalized."""
    if not isinstance(qc, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(qc).__name__}")
    missing = [k for k in _REQUIRED_QC if k not in qc]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}; it needs {', '.join(_REQUIRED_QC)}")
    out = dict(qc)
    if out["quant_method"] != "qoq":
        raise ConfigError(f"{source}: quant_method {out['quant_method']!r} is not supported (only 'qoq')")
    allowed = {"w_bit": (4, 8), "a_bit": (8,), "group_size": (-1, 128), "kv_bit": (4, 8)}
    for key, values in allowed.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v not in values:
            raise ConfigError(f"{source}: {key} = {v!r} is not supported; use one of {list(values)}")
    if out["w_bit"] == 8 and out["group_size"] != -1:
        raise ConfigError(
            f"{source}: W8A8 weights are per-channel; group_size must be -1, got {out['group_size']}"
        )
    if "k_hadamard" in out and not isinstance(out["k_hadamard"], bool):
        raise ConfigError(f"{source}: k_hadamard must be true or false, got {out['k_hadamard']!r}")
    return out


def _granularity_name(w_bit: int, group_size: int) -> str:
    if w_bit == 8:
        return "W8A8 (per-channel int8)"
    return "per-group (g128)" if group_size > 0 else "per-channel"


# ---------------------------------------------------------------------------------------------- writing


def _check_linear(name: str, lin, n: int, k: int, qc: dict):
    """The linear's quantized weight, after checking it fits the config and quantization_config."""
    w_bit, group_size = qc["w_bit"], qc["group_size"]
    if isinstance(lin, W4A8Linear):
        q = lin.qweight
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
    elif isinstance(lin, W8A8Linear):
        q = lin.qweight
        if w_bit != 8:
            raise ConfigError(f"{name} is a W8A8 linear but quantization_config has w_bit={w_bit}")
        if not isinstance(q, W8PerChannel):
            raise WeightsError(f"{name}: W8A8Linear holds a {type(q).__name__}, expected W8PerChannel")
    else:
        raise WeightsError(
            f"{name} is not quantized ({type(lin).__name__}); quantize every decoder linear before saving"
        )
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
    if lin.bias is not None and np.shape(lin.bias) != (n,):
        raise WeightsError(f"{name}.bias has shape {list(np.shape(lin.bias))}, expected [{n}]")
    if isinstance(q, W8PerChannel):
        return q
    if n % TILE:
        raise WeightsError(
            f"{name} has {n} output channels; QServe's packed W4 layout needs a multiple of {TILE}. "
            "This model cannot be stored as W4A8 (use W8A8)"
        )
    kp = padded_k(k, group_size)
    if isinstance(q, W4Group) and (codes.shape[1] != kp or q.s2.shape != (n, kp // group_size)
                                   or q.zeros.shape != q.s2.shape):
        raise WeightsError(
            f"{name}: g{group_size} codes {list(codes.shape)} / s2 {list(q.s2.shape)} do not cover K={k} "
            f"padded to {kp}"
        )
    return q


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
    shapes = _linear_shapes(cfg)
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


def _padding_record(cfg: ModelConfig, qc: dict) -> dict:
    if qc["w_bit"] == 8:
        return {}
    rec = {}
    for key, (_n, k) in _linear_shapes(cfg).items():
        kp = padded_k(k, qc["group_size"])
        if kp != k:
            rec[f"model.layers.*.{key}"] = {"in_features": k, "padded_in_features": kp}
    return rec


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
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(
            f"output path {out_dir} exists and is not a directory; choose another output directory"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise WeightsError(
            f"output directory {out_dir} already exists and is not empty; remove it, choose another "
            "directory or pass overwrite=True"
        )
    shapes = _linear_shapes(cfg)
    for i, layer in enumerate(weights.layers):  # fail before writing anything
        for block, lname in LINEARS:
            n, k = shapes[f"{block}.{lname}"]
            _check_linear(f"model.layers.{i}.{block}.{lname}", getattr(layer, lname), n, k, qc)
    if not isinstance(weights.lm_head, Linear):
        raise WeightsError(
            "lm_head must be an unquantized Linear for QServe checkpoints, got "
            f"{type(weights.lm_head).__name__}"
        )
    if qc["w_bit"] == 4:
        norms = [weights.final_norm]
        norms += [x for lw in weights.layers for x in (lw.input_norm, lw.post_attn_norm)]
        if not all(np.all(np.asarray(a) == 1) for a in norms):
            log.warning(
                "saving W4A8 checkpoint %s with norm weights that are not all ones: qserve-lite applies "
                "them, but QServe's W4A8 runtime ignores norm weights (fold them into the linears first "
                "for a QServe-compatible checkpoint)", out_dir,
            )

    qc["k_padding"] = ("codes zero-padded along K to a multiple of group_size (g128) or of 32 (per-channel); "
                       "true K from hidden_size, intermediate_size, num_attention_heads * head_dim")
    qc["padded_in_features"] = _padding_record(cfg, qc)
    qc["producer"] = PRODUCER
    qc["checkpoint_format"] = "qserve"
    cfg_out = dict(config, tie_word_embeddings=False, torch_dtype="float16", quantization_config=qc)

    tok_files = []
    if tokenizer_dir is not None:
        tok_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
        if not tok_files:
            log.warning("no tokenizer files (%s) in %s; the checkpoint will need a separate tokenizer",
                        ", ".join(TOKENIZER_FILES), tokenizer_dir)

    with atomic_output_dir(out_dir, WeightsError, "the checkpoint") as tmp:
        _write_shards(tmp, _tensor_stream(cfg, weights, qc), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)
    return out_dir


# ---------------------------------------------------------------------------------------------- reading


class _TorchIndex(TensorIndex):
    """TensorIndex over torch zip checkpoints (pytorch_model.bin, sharded or not, or *.pt)."""

    def __init__(self, model_dir: Path, files: list[Path]):
        self.model_dir = model_dir
        self._files: dict[str, TorchCheckpoint] = {}
        self._where: dict[str, str] = {}
        try:
            for path in files:
                ck = TorchCheckpoint(path)
                self._files[path.name] = ck
                for name in ck.keys():
                    self._where[name] = path.name
        except BaseException:
            self.close()
            raise


def _open_tensors(model_dir: Path):
    if not model_dir.is_dir():
        raise WeightsError(f"quantized checkpoint directory not found: {model_dir}")
    if (model_dir / "model.safetensors.index.json").is_file() or any(model_dir.glob("*.safetensors")):
        return TensorIndex(model_dir)
    index = model_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, AttributeError):
            raise WeightsError(f"{index}: not a valid checkpoint index (needs a 'weight_map')") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise WeightsError(f"{index} names shard '{missing[0]}', which is missing from {model_dir}")
        return _TorchIndex(model_dir, [model_dir / s for s in shards])
    files = sorted(model_dir.glob("*.bin")) or sorted(model_dir.glob("*.pt"))
    if not files:
        raise WeightsError(
            f"no quantized weights in {model_dir}: expected *.safetensors (qserve-lite) or pytorch_model.bin "
            "(QServe model zoo)"
        )
    return _TorchIndex(model_dir, files)


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
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc


def _resolve_quant_config(qc_raw, idx, model_dir: Path, source: str) -> dict:
    w_bit, group_size = _detect_format(idx, model_dir)
    if qc_raw is None:
        return {"quant_method": "qoq", "w_bit": w_bit, "a_bit": 8, "group_size": group_size, "kv_bit": 4,
                "inferred": True}
    qc = validate_quant_config(qc_raw, source)
    if (qc["w_bit"], qc["group_size"]) != (w_bit, group_size):
        raise WeightsError(
            f"{model_dir}: {source} says {_granularity_name(qc['w_bit'], qc['group_size'])} weights but "
            f"the tensors are {_granularity_name(w_bit, group_size)}; the checkpoint is inconsistent "
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


def _read_linear(idx, name: str, n: int, k: int, qc: dict, bias_required: bool):
    bias = None
    if bias_required or f"{name}.bias" in idx:
        bias = idx.get(f"{name}.bias", (n,), dtype=np.float32)
    if qc["w_bit"] == 8:
        codes = _get_int8(idx, f"{name}.weight", (n, k))
        scales = _get_vector(idx, f"{name}.dequant_scale", n)
        return W8A8Linear(W8PerChannel(codes, scales, in_features=k), bias)
    group_size = qc["group_size"]
    if n % TILE:
        raise WeightsError(
            f"{name}: {n} output channels is not a multiple of {TILE}, so it cannot be packed W4"
        )
    kp = padded_k(k, group_size)
    codes = unpack_w4(_get_int8(idx, f"{name}.qweight", (n, kp // 2)))
    s1 = _get_vector(idx, f"{name}.s1_scales", n)
    if group_size > 0:
        for part in ("s2_scales", "s2_zeros"):
            if f"{name}.{part}" not in idx:
                raise WeightsError(
                    f"tensor '{name}.{part}' is missing from {idx.model_dir}: the checkpoint is not "
                    "uniformly per-group (g128)"
                )
        g = kp // group_size
        s2, zeros = from_qserve_group_params(_get_int8(idx, f"{name}.s2_scales", (g, n)),
                                             _get_int8(idx, f"{name}.s2_zeros", (g, n)))
        return W4A8Linear(W4Group(codes, s1, s2, zeros, group_size, in_features=k), bias)
    if f"{name}.s1_szeros" not in idx:
        raise WeightsError(
            f"tensor '{name}.s1_szeros' is missing from {idx.model_dir}: the checkpoint is not uniformly "
            "per-channel"
        )
    szeros = _get_vector(idx, f"{name}.s1_szeros", n)
    return W4A8Linear(W4PerChannel(codes, s1, szeros, in_features=k), bias)


def read_quantized_weights(cfg: ModelConfig, model_dir: str | Path,
                           group_size: int | None = None) -> LlamaWeights:
    """Load a QServe-format quantized checkpoint (ours or a QServe zoo one) into LlamaWeights.

    Decoder linears become W4A8Linear / W8A8Linear; embeddings, norms and lm_head are float32. group_size
    (the user's --group-size, -1 or 128) must match the checkpoint's granularity when given.
    weights.extra["quantization_config"] holds the resolved quantization config.
    """
    model_dir = Path(model_dir).expanduser()
    qc_raw = cfg.extra.get("quantization_config") if isinstance(cfg.extra, dict) else None
    source = "config quantization_config"
    if qc_raw is None:
        qc_raw = _config_quant(model_dir)
        source = f"{model_dir / 'config.json'} quantization_config"
    idx = _open_tensors(model_dir)
    try:
        qc = _resolve_quant_config(qc_raw, idx, model_dir, source)
        if group_size is not None and group_size != qc["group_size"]:
            have = _granularity_name(qc["w_bit"], qc["group_size"])
            if qc["w_bit"] == 8:
                hint = "omit the group size (W8A8 has no groups)"
            else:
                hint = f"use group size {qc['group_size']} (or omit it)"
            raise WeightsError(
                f"checkpoint {model_dir} is {have} but group_size={group_size} was requested; {hint}"
            )
        h = cfg.hidden_size
        shapes = _linear_shapes(cfg)
        zoo_w4 = qc["w_bit"] == 4 and qc.get("producer") != PRODUCER
        not_ones: list[str] = []

        def norm(name: str) -> np.ndarray:
            w = idx.get(name, (h,), dtype=np.float32)
            if zoo_w4:
                if not np.all(w == 1):
                    not_ones.append(name)
                return np.ones(h, np.float32)
            return w

        embed = idx.get("model.embed_tokens.weight", (cfg.vocab_size, h), dtype=np.float32)
        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            lin = {}
            for block, lname in LINEARS:
                n, k = shapes[f"{block}.{lname}"]
                need_bias = cfg.qkv_bias and lname in ("q_proj", "k_proj", "v_proj")
                lin[lname] = _read_linear(idx, f"{p}.{block}.{lname}", n, k, qc, need_bias)
            layers.append(LayerWeights(input_norm=norm(f"{p}.input_layernorm.weight"),
                                       post_attn_norm=norm(f"{p}.post_attention_layernorm.weight"), **lin))
        final_norm = norm("model.norm.weight")
        if "lm_head.weight" in idx:
            lm_head = Linear(idx.get("lm_head.weight", (cfg.vocab_size, h), dtype=np.float32))
        elif cfg.tie_word_embeddings:
            lm_head = Linear(embed)
        else:
            raise WeightsError(
                f"tensor 'lm_head.weight' is missing from {model_dir} and config.json does not set "
                "tie_word_embeddings"
            )
    finally:
        idx.close()
    if not_ones:
        log.warning(
            "%s: %d norm weight(s) are not all ones (e.g. %s); QServe's W4A8 runtime ignores norm weights "
            "(QoQ folds them into the linears), so qserve-lite uses ones as well", model_dir, len(not_ones),
            not_ones[0],
        )
    return LlamaWeights(embed_tokens=embed, layers=layers, final_norm=final_norm, lm_head=lm_head,
                        extra={"quantization_config": qc})
