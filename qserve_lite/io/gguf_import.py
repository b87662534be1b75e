"""Turn a llama-architecture GGUF file into a Hugging Face model directory.

``import_gguf`` reads a GGUF file (as written by llama.cpp's converters) and writes

* ``model.safetensors`` - the weights, dequantized, with Hugging Face names and layout;
* ``config.json`` - a ``LlamaForCausalLM`` config;
* ``tokenizer.json`` / ``tokenizer_config.json`` - the tokenizer rebuilt from the GGUF vocabulary;
* ``generation_config.json`` - BOS/EOS ids.

Everything is written to a temporary directory next to ``out_dir`` and renamed into place at the
end, so a failed import never leaves a half-written model behind.

The ``gguf`` package is an optional dependency (``pip install 'qserve-lite[gguf]'``); it is imported
lazily.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qserve_lite.errors import GGUFImportError

from qserve_lite.io.atomic_dir import atomic_output_dir

__all__ = ["import_gguf", "read_gguf_summary", "SUPPORTED_TENSOR_TYPES", "SUPPORTED_DTYPES"]

log = logging.getLogger(__name__)

# GGML tensor types we can dequantize (through gguf.quants.dequantize).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# Output dtypes: name -> (safetensors dtype tag, bytes per element).
_DTYPES = {
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
}
_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
SUPPORTED_DTYPES = tuple(_DTYPES)

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regex used by Llama-3 style byte-level BPE vocabularies.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")

# Turn-end tokens that chat templates use in place of (or besides) the GGUF eos token.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")

_INSTALL_HINT = "install it with: pip install 'qserve-lite[gguf]' (or pip install gguf)"


# --------------------------------------------------------------------------------------------------
# GGUF reading helpers
# --------------------------------------------------------------------------------------------------


def _gguf_module():
    try:
        import gguf  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise GGUFImportError(f"reading GGUF files needs the 'gguf' package; {_INSTALL_HINT}") from e
    return gguf


def _open_reader(path: Path):
    """Open ``path`` with gguf.GGUFReader, turning every failure into GGUFImportError."""
    gguf = _gguf_module()
    if not path.exists():
        raise GGUFImportError(f"GGUF file not found: {path}. Check the path.")
    if not path.is_file():
        raise GGUFImportError(f"{path} is not a file; pass the path of a .gguf file.")
    size = path.stat().st_size
    if size < 24:
        raise GGUFImportError(
            f"{path} is too small ({size} bytes) to be a GGUF file; it is empty or truncated. "
            "Download it again."
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFImportError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
            "Pass a .gguf file produced by llama.cpp's converters."
        )
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise GGUFImportError(
            f"cannot read GGUF file {path}: {type(e).__name__}: {e}. The file is probably truncated or "
            "corrupt; download it again."
        ) from e
    if getattr(reader, "endianess", gguf.GGUFEndian.LITTLE) != gguf.GGUFEndian.LITTLE:
        raise GGUFImportError(
            f"{path} is a big-endian GGUF file; only little-endian GGUF files can be imported."
        )
    # The reader builds tensor views lazily from the memmap; check every tensor fits in the file.
    for t in reader.tensors:
        expected = int(t.n_bytes)
        got = int(t.data.nbytes)
        if got != expected:
            raise GGUFImportError(
                f"tensor {t.name!r} in {path} has {got} bytes of data, expected {expected}: the file is "
                "truncated or corrupt; download it again."
            )
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    """Value of GGUF metadata field ``key`` as a Python value (str, int, float, bool or list)."""
    gguf = _gguf_module()
    VT = gguf.GGUFValueType
    f = reader.fields.get(key)
    if f is None or not f.types:
        return default
    try:
        main = f.types[0]
        if main == VT.ARRAY:
            sub = f.types[-1]
            if sub == VT.STRING:
                return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
            if len(f.data) == 0:
                return []
            if sub == VT.ARRAY:
                raise GGUFImportError(f"GGUF field {key!r} is a nested array, which is not supported.")
            return np.concatenate([np.asarray(f.parts[i]).reshape(-1) for i in f.data]).tolist()
        if main == VT.STRING:
            return bytes(f.parts[-1]).decode("utf-8", errors="replace")
        value = f.parts[-1].tolist()[0]
        if main == VT.BOOL:
            return bool(value)
        return value
    except GGUFImportError:
        raise
    except Exception as e:
        raise GGUFImportError(f"cannot decode GGUF field {key!r}: {type(e).__name__}: {e}") from e


def _field_array(reader, key: str, dtype) -> np.ndarray | None:
    """Numeric array field as a numpy array (fast path, no Python list)."""
    f = reader.fields.get(key)
    if f is None or not f.types:
        return None
    if len(f.data) == 0:
        return np.zeros(0, dtype=dtype)
    try:
        return np.concatenate([np.asarray(f.parts[i]).reshape(-1) for i in f.data]).astype(dtype)
    except Exception as e:
        raise GGUFImportError(f"cannot decode GGUF array field {key!r}: {type(e).__name__}: {e}") from e


def _tensor_type_name(t) -> str:
    tt = t.tensor_type
    return getattr(tt, "name", str(tt))


def read_gguf_summary(path: str | os.PathLike) -> dict:
    """Short description of a GGUF file, for CLI output and error messages.

    Returns a dict with ``path``, ``architecture``, ``name``, ``layers``, ``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``context_length``, ``vocab_size``,
    ``tokenizer_model``, ``tokenizer_pre``, ``tensor_count``, ``tensor_types`` (type name -> count),
    ``n_params`` and ``file_size``. Raises GGUFImportError if the file cannot be read.
    """
    path = Path(path)
    reader = _open_reader(path)
    arch = _field(reader, "general.architecture")
    a = arch or "llama"
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{a}.vocab_size")
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)
    types = Counter(_tensor_type_name(t) for t in reader.tensors)
    return {
        "path": str(path),
        "architecture": arch,
        "name": _field(reader, "general.name"),
        "layers": _field(reader, f"{a}.block_count"),
        "hidden_size": _field(reader, f"{a}.embedding_length"),
        "num_attention_heads": _field(reader, f"{a}.attention.head_count"),
        "num_key_value_heads": _field(reader, f"{a}.attention.head_count_kv"),
        "context_length": _field(reader, f"{a}.context_length"),
        "vocab_size": vocab,
        "tokenizer_model": _field(reader, "tokenizer.ggml.model"),
        "tokenizer_pre": _field(reader, "tokenizer.ggml.pre"),
        "tensor_count": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "n_params": int(sum(int(t.n_elements) for t in reader.tensors)),
        "file_size": path.stat().st_size,
    }


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _require_int(reader, key: str, path: Path) -> int:
    v = _field(reader, key)
    if v is None:
        raise GGUFImportError(
            f"GGUF file {path} lacks the metadata field {key!r}; it was not written by a llama.cpp "
            "llama converter or is damaged. Re-convert the model with a recent llama.cpp."
        )
    try:
        iv = int(v)
    except (TypeError, ValueError) as e:
        raise GGUFImportError(f"GGUF field {key!r} in {path} should be an integer, got {v!r}") from e
    if iv <= 0:
        raise GGUFImportError(f"GGUF field {key!r} in {path} must be positive, got {iv}")
    return iv


def _llama3_freq_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, orig: float):
    """rope frequency divisors of Llama-3 style rope scaling for the given base frequencies."""
    wavelen = 2.0 * math.pi / inv_freq
    low_wl = orig / low
    high_wl = orig / high
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, mid))


def infer_llama3_rope_scaling(freq_factors, rope_theta: float, rotary_dim: int) -> dict | None:
    """Recover HF ``rope_scaling`` (rope_type llama3) from llama.cpp's ``rope_freqs.weight`` tensor.

    The tensor holds, for each rotary frequency, the divisor llama.cpp applies to it. Only the two
    combinations ``original_max_position_embeddings / (high - low)`` and ``low / (high - low)`` are
    observable, so ``low_freq_factor`` is fixed to 1 (as in every Llama 3.x release) unless the
    standard Llama 3.1 values already reproduce the tensor. Returns None when no parameters
    reproduce it (to within 1e-3 relative).
    """
    ff = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
    if ff.size == 0 or 2 * ff.size != rotary_dim or not np.all(np.isfinite(ff)) or np.any(ff <= 0):
        return None
    inv_freq = 1.0 / (float(rope_theta) ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    factor = float(ff.max())
    if factor <= 1.0 + 1e-6:
        return None

    def fits(low, high, orig):
        if not (high > low > 0 and orig > 0):
            return False
        expected = _llama3_freq_factors(inv_freq, factor, low, high, orig)
        return bool(np.allclose(expected, ff, rtol=1e-3, atol=0))

    def result(low, high, orig):
        return {
            "rope_type": "llama3",
            "factor": round(factor, 6),
            "low_freq_factor": round(float(low), 6),
            "high_freq_factor": round(float(high), 6),
            "original_max_position_embeddings": int(orig),
        }

    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 2.0, 8192)):
        if fits(low, high, orig):
            return result(low, high, orig)
    # Fit the linear "smooth" region: s = orig/(high-low) * (1/wavelen) - low/(high-low).
    mid = (ff > 1.0 + 1e-4) & (ff < factor * (1.0 - 1e-4))
    if int(mid.sum()) < 2:
        return None
    s = (1.0 / ff[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x = inv_freq[mid] / (2.0 * math.pi)
    a, negb = np.polyfit(x, s, 1)
    b = -negb
    if a <= 0 or b <= 0:
        return None
    low = 1.0
    orig = a / b
    high = 1.0 + 1.0 / b
    orig_int = int(round(orig))
    for o in (orig_int, orig):
        if fits(low, high, o):
            return result(low, round(high, 4) if fits(low, round(high, 4), orig_int) else high, orig_int)
    return None


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(v)))


def _build_config(reader, path: Path, tensors: dict, dtype: str, warnings_out: list[str]) -> dict:
    a = "llama"
    hidden = _require_int(reader, f"{a}.embedding_length", path)
    layers = _require_int(reader, f"{a}.block_count", path)
    inter = _require_int(reader, f"{a}.feed_forward_length", path)
    heads = _require_int(reader, f"{a}.attention.head_count", path)
    kv_heads = _field(reader, f"{a}.attention.head_count_kv")
    kv_heads = int(kv_heads) if kv_heads is not None else heads
    head_dim = _field(reader, f"{a}.attention.key_length")
    if head_dim is None:
        head_dim = _field(reader, f"{a}.rope.dimension_count")
    if head_dim is None:
        if hidden % heads:
            raise GGUFImportError(
                f"GGUF file {path}: embedding_length {hidden} is not divisible by head_count {heads} and "
                "no rope.dimension_count is given; cannot work out head_dim."
            )
        head_dim = hidden // heads
    head_dim = int(head_dim)
    rope_dim = _field(reader, f"{a}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise GGUFImportError(
            f"GGUF file {path}: rope.dimension_count ({rope_dim}) differs from the head size ({head_dim}); "
            "partial-rotary models are not llama models and cannot be imported."
        )
    if heads % kv_heads:
        raise GGUFImportError(
            f"GGUF file {path}: head_count {heads} is not a multiple of head_count_kv {kv_heads}."
        )
    eps = _field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    theta = _field(reader, f"{a}.rope.freq_base", 10000.0)
    ctx = _field(reader, f"{a}.context_length", 2048)

    emb = tensors.get("token_embd.weight")
    vocab_size = int(emb.shape[1]) if emb is not None else None
    gguf_vocab = _field(reader, f"{a}.vocab_size")
    if vocab_size is None:
        vocab_size = int(gguf_vocab) if gguf_vocab is not None else None

    # rope scaling
    rope_scaling = None
    scaling_type = _field(reader, f"{a}.rope.scaling.type")
    scaling_factor = _field(reader, f"{a}.rope.scaling.factor")
    if scaling_factor is None:
        scaling_factor = _field(reader, f"{a}.rope.scale_linear")  # old key, always linear
        if scaling_factor is not None and scaling_type is None:
            scaling_type = "linear"
    if scaling_type == "linear" and scaling_factor is not None and float(scaling_factor) != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": float(scaling_factor)}
    elif scaling_type == "yarn" and scaling_factor is not None:
        rope_scaling = {"rope_type": "yarn", "factor": float(scaling_factor)}
        orig = _field(reader, f"{a}.rope.scaling.original_context_length")
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    elif scaling_type not in (None, "none", "linear"):
        raise GGUFImportError(
            f"GGUF file {path} uses rope scaling type {scaling_type!r}; only 'linear', 'yarn' and Llama-3 "
            "(rope_freqs) scaling can be imported."
        )
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None and rope_scaling is None:
        ff = _dequantize(freqs, "rope_freqs.weight").reshape(-1)
        rope_scaling = infer_llama3_rope_scaling(ff, float(theta), head_dim)
        if rope_scaling is None and not np.allclose(ff, 1.0):
            warnings_out.append(
                "the GGUF file has a rope_freqs.weight tensor (Llama-3 rope scaling) whose parameters could "
                "not be recovered; config.json gets rope_scaling=null, so outputs on long contexts (beyond "
                "the original training length) will differ from llama.cpp."
            )

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(eps),
        "rope_theta": _f32(theta),
        "max_position_embeddings": int(ctx),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": int(bos) if bos is not None else None,
        "eos_token_id": int(eos) if eos is not None else None,
        "torch_dtype": dtype,
        "hidden_act": "silu",
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
    }


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SKIPPED = ("rope_freqs.weight",)  # folded into config.json's rope_scaling
_SKIPPED_LAYER = ("attn_rot_embd",)  # precomputed rotary tables of very old conversions


def _hf_name(name: str, n_layers: int, path: Path) -> str | None:
    """HF name for GGUF tensor ``name``; None for tensors that are dropped."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    if name in _SKIPPED:
        return None
    if name.startswith("blk."):
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            i, rest = int(parts[1]), parts[2]
            if any(rest.startswith(s) for s in _SKIPPED_LAYER):
                return None
            if rest in _LAYER_MAP and i < n_layers:
                return f"model.layers.{i}.{_LAYER_MAP[rest]}"
            if "exps" in rest or rest.startswith("ffn_gate_inp"):
                raise GGUFImportError(
                    f"GGUF file {path} has mixture-of-experts tensor {name!r}; only dense llama models "
                    "can be imported."
                )
    raise GGUFImportError(
        f"GGUF file {path} has tensor {name!r}, which has no place in a dense llama model "
        "(biases, extra projections and multimodal tensors are not supported)."
    )


def _dequantize(t, name: str) -> np.ndarray:
    """Dequantize GGUF tensor ``t`` to float32 with numpy (HF) axis order."""
    gguf = _gguf_module()
    tname = _tensor_type_name(t)
    if tname not in SUPPORTED_TENSOR_TYPES:
        raise GGUFImportError(
            f"tensor {name!r} has GGML type {tname}, which cannot be imported (supported: "
            f"{', '.join(SUPPORTED_TENSOR_TYPES)}). Use a GGUF quantized with one of these types."
        )
    try:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except Exception as e:
        raise GGUFImportError(
            f"cannot dequantize tensor {name!r} ({tname}): {type(e).__name__}: {e}"
        ) from e
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size != math.prod(shape):
        raise GGUFImportError(
            f"tensor {name!r} ({tname}) dequantized to {arr.size} values, expected {math.prod(shape)} "
            f"for shape {list(shape)}; the file is corrupt."
        )
    return arr.reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary halves -> interleaved pairs) on ``w`` [rows, cols]."""
    rows = w.shape[0]
    rest = w.shape[1:]
    if rows % (2 * n_head):
        raise GGUFImportError(
            f"cannot undo the q/k permutation: {rows} rows are not divisible by 2 * {n_head} heads."
        )
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of :func:`unpermute_qk`); used by tests."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept as NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def _cast(arr: np.ndarray, dtype: str, name: str) -> np.ndarray:
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=np.float16)
        if not np.all(np.isfinite(out)) and np.all(np.isfinite(arr)):
            raise GGUFImportError(
                f"tensor {name!r} has values beyond the float16 range (max |x| = "
                f"{float(np.abs(arr).max()):.4g}); import with dtype='float32' or 'bfloat16'."
            )
        return out
    return _to_bf16_bits(arr)


def _write_safetensors(dest: Path, plan: list[tuple[str, Any, str]], cfg: dict, dtype: str,
                       progress: bool, path: Path) -> None:
    """Stream the tensors of ``plan`` ([(hf_name, gguf_tensor, gguf_name)]) into ``dest``.

    The header is written first (all shapes are known from the GGUF tensor infos), then one tensor
    at a time, so peak memory is about one dequantized tensor rather than the whole model.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    tag, itemsize = _DTYPES[dtype]
    header: dict[str, Any] = {
        "__metadata__": {"format": "pt", "source": "qserve-lite import-gguf", "gguf_file": path.name},
    }
    offset = 0
    for hf, t, _ in plan:
        shape = [int(d) for d in reversed([int(x) for x in t.shape])]
        nbytes = math.prod(shape) * itemsize
        header[hf] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)

    heads = cfg["num_attention_heads"]
    kv_heads = cfg["num_key_value_heads"]
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        bar = tqdm(plan, desc="import-gguf", unit="tensor", disable=not progress, leave=False)
        try:
            for hf, t, gname in bar:
                arr = _dequantize(t, gname)
                if hf.endswith("self_attn.q_proj.weight"):
                    arr = unpermute_qk(arr, heads)
                elif hf.endswith("self_attn.k_proj.weight"):
                    arr = unpermute_qk(arr, kv_heads)
                out = _cast(arr, dtype, gname)
                f.write(memoryview(out.reshape(-1)).cast("B"))
        finally:
            bar.close()
        if f.tell() != 8 + len(hjson) + offset:
            raise GGUFImportError(f"internal error: wrote {f.tell()} bytes to {dest}, expected more")


def _check_shapes(tensors: dict, cfg: dict, path: Path) -> None:
    H, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    V = cfg["vocab_size"]
    want = {
        "token_embd.weight": (V, H),
        "output_norm.weight": (H,),
    }
    if "output.weight" in tensors:
        want["output.weight"] = (V, H)
    for i in range(L):
        want.update({
            f"blk.{i}.attn_norm.weight": (H,),
            f"blk.{i}.attn_q.weight": (nh * hd, H),
            f"blk.{i}.attn_k.weight": (nkv * hd, H),
            f"blk.{i}.attn_v.weight": (nkv * hd, H),
            f"blk.{i}.attn_output.weight": (H, nh * hd),
            f"blk.{i}.ffn_norm.weight": (H,),
            f"blk.{i}.ffn_gate.weight": (inter, H),
            f"blk.{i}.ffn_up.weight": (inter, H),
            f"blk.{i}.ffn_down.weight": (H, inter),
        })
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise GGUFImportError(
            f"GGUF file {path} lacks tensor(s) {', '.join(missing[:5])}{more} needed by a "
            f"{L}-layer llama model; the file is incomplete or not a llama model."
        )
    for n, shape in want.items():
        got = tuple(int(d) for d in reversed([int(x) for x in tensors[n].shape]))
        if got != shape:
            raise GGUFImportError(
                f"tensor {n!r} in {path} has shape {list(got)} (HF order), expected {list(shape)} from the "
                "GGUF metadata; the file is inconsistent."
            )


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce score-ordered SentencePiece BPE: every split of a normal token into
    two normal tokens is a merge, ranked by the merged token's score (descending), then piece ids."""
    ids: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if types[i] == _TT_NORMAL and tok not in ids:
            ids[tok] = i
    found = []
    for tok, i in ids.items():
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            ia, ib = ids.get(a), ids.get(b)
            if ia is not None and ib is not None:
                found.append((-scores[i], ia, ib, a, b))
    found.sort(key=lambda m: (m[0], m[1], m[2]))
    return [(a, b) for _, _, _, a, b in found]


def _split_merge(m: str, key: str) -> tuple[str, str]:
    # Like llama.cpp: split at the first space that is not the first character.
    k = m.find(" ", 1)
    if k <= 0:
        raise GGUFImportError(f"GGUF field {key!r} has a malformed merge {m!r} (expected 'left right').")
    return m[:k], m[k + 1:]


def _build_tokenizer(reader, path: Path, warnings_out: list[str]):
    """Rebuild a ``tokenizers.Tokenizer`` from the GGUF vocabulary. Returns (tokenizer, info dict)."""
    from tokenizers import (  # noqa: PLC0415
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tok_model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tok_model is None or tokens is None:
        raise GGUFImportError(
            f"GGUF file {path} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing); "
            "re-convert the model with its tokenizer."
        )
    n = len(tokens)
    types_arr = _field_array(reader, "tokenizer.ggml.token_type", np.int64)
    types = [int(x) for x in types_arr] if types_arr is not None else [_TT_NORMAL] * n
    if len(types) != n:
        raise GGUFImportError(
            f"GGUF file {path}: tokenizer.ggml.token_type has {len(types)} entries but "
            f"tokenizer.ggml.tokens has {n}."
        )
    pre = _field(reader, "tokenizer.ggml.pre") or "default"

    def tid(key):
        v = _field(reader, key)
        if v is None:
            return None
        v = int(v)
        if not 0 <= v < n:
            warnings_out.append(f"{key} = {v} is outside the vocabulary (size {n}); ignored.")
            return None
        return v

    bos_id, eos_id = tid("tokenizer.ggml.bos_token_id"), tid("tokenizer.ggml.eos_token_id")
    unk_id, pad_id = tid("tokenizer.ggml.unknown_token_id"), tid("tokenizer.ggml.padding_token_id")
    if unk_id is None:
        unk_id = next((i for i in range(n) if types[i] == _TT_UNKNOWN), None)

    vocab: dict[str, int] = {}
    dups = 0
    for i, t in enumerate(tokens):
        if t in vocab:
            dups += 1
            continue
        vocab[t] = i
    if dups:
        warnings_out.append(
            f"the GGUF vocabulary has {dups} duplicate token string(s); each keeps only its first id."
        )

    if tok_model == "gpt2":
        merges_raw = _field(reader, "tokenizer.ggml.merges")
        if merges_raw is None:
            raise GGUFImportError(
                f"GGUF file {path} has a gpt2 (byte-level BPE) tokenizer without tokenizer.ggml.merges."
            )
        merges = [_split_merge(m, "tokenizer.ggml.merges") for m in merges_raw]
        ignore_merges = pre in _LLAMA3_PRE
        try:
            model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
        except Exception as e:
            raise GGUFImportError(
                f"cannot build a BPE tokenizer from {path}'s tokenizer.ggml.tokens/merges: {e}"
            ) from e
        tok = Tokenizer(model)
        if pre in _DIGIT_SPLIT_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        elif pre in _LLAMA3_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        else:
            if pre not in ("default", "gpt-2", "gpt2"):
                warnings_out.append(
                    f"tokenizer.ggml.pre = {pre!r} is not known; using the GPT-2 byte-level pre-tokenizer, "
                    "so some texts may tokenize differently from llama.cpp."
                )
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        default_add_bos = False
    elif tok_model == "llama":
        scores_arr = _field_array(reader, "tokenizer.ggml.scores", np.float64)
        if scores_arr is None or len(scores_arr) != n:
            raise GGUFImportError(
                f"GGUF file {path} has a SentencePiece (llama) tokenizer without a tokenizer.ggml.scores "
                f"array of {n} entries; cannot rebuild the merges."
            )
        merges = _spm_merges(tokens, types, scores_arr.tolist())
        unk_tok = tokens[unk_id] if unk_id is not None else None
        try:
            model = models.BPE(vocab=vocab, merges=merges, unk_token=unk_tok, byte_fallback=True,
                               fuse_unk=True)
        except Exception as e:
            raise GGUFImportError(
                f"cannot build a BPE tokenizer from {path}'s SentencePiece vocabulary: {e}"
            ) from e
        tok = Tokenizer(model)
        add_space_prefix = _field(reader, "tokenizer.ggml.add_space_prefix", True)
        norm = [normalizers.Replace(" ", "\u2581")]
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            norm.insert(0, normalizers.Prepend("\u2581"))
            dec.append(decoders.Strip(" ", 1, 0))
        tok.normalizer = normalizers.Sequence(norm)
        tok.decoder = decoders.Sequence(dec)
        default_add_bos = True
    else:
        raise GGUFImportError(
            f"GGUF file {path} uses tokenizer model {tok_model!r}; only 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece) tokenizers can be imported."
        )

    added = []
    for i, t in enumerate(tokens):
        if vocab.get(t) != i:
            continue
        if types[i] in (_TT_CONTROL, _TT_UNKNOWN):
            added.append(AddedToken(t, special=True, normalized=False))
        elif types[i] == _TT_USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    if added:
        tok.add_tokens(added)

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if add_bos and bos_id is None:
        warnings_out.append("tokenizer.ggml.add_bos_token is set but there is no bos token id; ignored.")
        add_bos = False
    if add_eos and eos_id is None:
        add_eos = False
    if add_bos or add_eos:
        single, pair, specials = "$A:0", "$A:0 $B:1", []
        if add_bos:
            b = tokens[bos_id]
            single, pair = f"{b}:0 {single}", f"{b}:0 $A:0 {b}:1 $B:1"
            specials.append((b, bos_id))
        if add_eos:
            e = tokens[eos_id]
            single = f"{single} {e}:0"
            pair = pair.replace("$A:0", f"$A:0 {e}:0").replace("$B:1", f"$B:1 {e}:1")
            if e not in dict(specials):
                specials.append((e, eos_id))
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    elif tok_model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    info = {
        "bos_id": bos_id, "eos_id": eos_id, "unk_id": unk_id, "pad_id": pad_id,
        "add_bos": add_bos, "add_eos": add_eos, "tokens": tokens, "vocab": vocab,
    }
    return tok, info


def _eos_ids(reader, info: dict, chat_template: str | None) -> int | list[int] | None:
    ids: list[int] = []
    if info["eos_id"] is not None:
        ids.append(info["eos_id"])
    n = len(info["tokens"])
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = _field(reader, key)
        if v is not None and 0 <= int(v) < n and int(v) not in ids:
            ids.append(int(v))
    if chat_template:
        for t in _TURN_END_TOKENS:
            if t in chat_template and t in info["vocab"] and info["vocab"][t] not in ids:
                ids.append(info["vocab"][t])
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


# --------------------------------------------------------------------------------------------------
# Main entry point
# --------------------------------------------------------------------------------------------------


def _write_json(p: Path, obj: dict) -> None:
    p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
                progress: bool = True, overwrite: bool = False) -> Path:
    """Convert the llama-architecture GGUF file ``gguf_path`` into a Hugging Face model directory.

    ``dtype`` is the storage dtype of ``model.safetensors``: "float32" (default), "float16" or
    "bfloat16". ``progress`` shows a tqdm bar over tensors. An existing non-empty ``out_dir`` is
    an error unless ``overwrite`` is true. Returns the output directory. Raises GGUFImportError for
    every problem with the input; on failure nothing is left at ``out_dir``.
    """
    gguf_path = Path(gguf_path).expanduser()
    out_dir = Path(out_dir).expanduser()
    dt = _DTYPE_ALIASES.get(str(dtype).lower())
    if dt is None:
        raise GGUFImportError(
            f"unsupported dtype {dtype!r} for import-gguf; choose one of {', '.join(SUPPORTED_DTYPES)}."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise GGUFImportError(f"output path {out_dir} exists and is not a directory; choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GGUFImportError(
            f"output directory {out_dir} already exists and is not empty; remove it or choose another "
            "directory (or pass overwrite=True / --overwrite)."
        )

    if gguf_path.resolve().is_relative_to(out_dir.resolve()):
        raise GGUFImportError(
            f"the GGUF file {gguf_path} lies inside the output directory {out_dir}; choose an output "
            "directory that does not contain the input file."
        )

    reader = _open_reader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFImportError(
            f"GGUF file {gguf_path} has general.architecture = {arch!r}; only 'llama' models (Llama, "
            "SmolLM, TinyLlama, Mistral-7B, ...) can be imported."
        )

    tensors = {t.name: t for t in reader.tensors}
    if len(tensors) != len(reader.tensors):
        raise GGUFImportError(f"GGUF file {gguf_path} has duplicate tensor names; the file is corrupt.")
    for name, t in tensors.items():
        tname = _tensor_type_name(t)
        if tname not in SUPPORTED_TENSOR_TYPES:
            raise GGUFImportError(
                f"tensor {name!r} in {gguf_path} has GGML type {tname}, which cannot be imported "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)}). Use a GGUF quantized with one of these."
            )

    warns: list[str] = []
    cfg = _build_config(reader, gguf_path, tensors, dt, warns)
    _check_shapes(tensors, cfg, gguf_path)

    order = {"token_embd.weight": (0, 0, ""), "output_norm.weight": (2, 0, ""), "output.weight": (3, 0, "")}
    plan = []
    for name, t in tensors.items():
        hf = _hf_name(name, cfg["num_hidden_layers"], gguf_path)
        if hf is None:
            continue
        if name in order:
            key = order[name]
        else:
            key = (1, int(name.split(".")[1]), hf)
        plan.append((key, hf, t, name))
    plan.sort(key=lambda p: p[0])
    plan = [(hf, t, name) for _, hf, t, name in plan]

    tok, info = _build_tokenizer(reader, gguf_path, warns)
    if cfg["vocab_size"] != len(info["tokens"]):
        warns.append(
            f"the tokenizer has {len(info['tokens'])} tokens but the embedding has {cfg['vocab_size']} rows."
        )
    tokens = info["tokens"]
    chat_template = _field(reader, "tokenizer.chat_template")

    def tstr(i):
        return tokens[i] if i is not None else None

    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tstr(info["bos_id"]),
        "eos_token": tstr(info["eos_id"]),
        "pad_token": tstr(info["pad_id"]),
        "unk_token": tstr(info["unk_id"]),
        "add_bos_token": info["add_bos"],
        "add_eos_token": info["add_eos"],
        "model_max_length": cfg["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": _eos_ids(reader, info, chat_template)}

    with atomic_output_dir(out_dir, GGUFImportError, "the model") as tmp:
        _write_safetensors(tmp / "model.safetensors", plan, cfg, dt, progress, gguf_path)
        _write_json(tmp / "config.json", cfg)
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        _write_json(tmp / "generation_config.json", gen_cfg)
    for w in warns:
        log.warning("import-gguf: %s", w)
    return out_dir
