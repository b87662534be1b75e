"""The Hugging Face ``config.json`` (a ``LlamaForCausalLM`` config) of a llama-architecture GGUF file, built
from its metadata: model shape, normalization, RoPE (with linear, YaRN or Llama-3 scaling, the last recovered
from the ``rope_freqs.weight`` tensor) and the BOS/EOS ids.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qserve_lite.errors import GGUFImportError
from qserve_lite.io.gguf.reader import field_value
from qserve_lite.io.gguf.tensors import dequantize

_ARCH = "llama"  # the prefix of the architecture's metadata keys


def _require_int(reader, key: str, path: Path) -> int:
    v = field_value(reader, key)
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


def _head_dim(reader, path: Path, hidden: int, heads: int) -> int:
    """The attention head size: key_length, else rope.dimension_count, else hidden / heads. The rotary
    dimension must be the whole head."""
    a = _ARCH
    head_dim = field_value(reader, f"{a}.attention.key_length")
    if head_dim is None:
        head_dim = field_value(reader, f"{a}.rope.dimension_count")
    if head_dim is None:
        if hidden % heads:
            raise GGUFImportError(
                f"GGUF file {path}: embedding_length {hidden} is not divisible by head_count {heads} and "
                "no rope.dimension_count is given; cannot work out head_dim."
            )
        head_dim = hidden // heads
    head_dim = int(head_dim)
    rope_dim = field_value(reader, f"{a}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise GGUFImportError(
            f"GGUF file {path}: rope.dimension_count ({rope_dim}) differs from the head size ({head_dim}); "
            "partial-rotary models are not llama models and cannot be imported."
        )
    return head_dim


def _vocab_size(reader, tensors: dict) -> int | None:
    """Rows of the token embedding, else the vocab_size metadata field."""
    emb = tensors.get("token_embd.weight")
    vocab_size = int(emb.shape[1]) if emb is not None else None
    gguf_vocab = field_value(reader, f"{_ARCH}.vocab_size")
    if vocab_size is None:
        vocab_size = int(gguf_vocab) if gguf_vocab is not None else None
    return vocab_size


def _rope_scaling_from_metadata(reader, path: Path) -> dict | None:
    """HF rope_scaling from the rope.scaling.* (or old rope.scale_linear) fields: linear or YaRN."""
    a = _ARCH
    rope_scaling = None
    scaling_type = field_value(reader, f"{a}.rope.scaling.type")
    scaling_factor = field_value(reader, f"{a}.rope.scaling.factor")
    if scaling_factor is None:
        scaling_factor = field_value(reader, f"{a}.rope.scale_linear")  # old key, always linear
        if scaling_factor is not None and scaling_type is None:
            scaling_type = "linear"
    if scaling_type == "linear" and scaling_factor is not None and float(scaling_factor) != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": float(scaling_factor)}
    elif scaling_type == "yarn" and scaling_factor is not None:
        rope_scaling = {"rope_type": "yarn", "factor": float(scaling_factor)}
        orig = field_value(reader, f"{a}.rope.scaling.original_context_length")
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    elif scaling_type not in (None, "none", "linear"):
        raise GGUFImportError(
            f"GGUF file {path} uses rope scaling type {scaling_type!r}; only 'linear', 'yarn' and Llama-3 "
            "(rope_freqs) scaling can be imported."
        )
    return rope_scaling


def _rope_scaling(reader, path: Path, tensors: dict, theta, head_dim: int, warnings_out: list[str]):
    """HF rope_scaling: from the metadata, else Llama-3 scaling recovered from rope_freqs.weight."""
    rope_scaling = _rope_scaling_from_metadata(reader, path)
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None and rope_scaling is None:
        ff = dequantize(freqs, "rope_freqs.weight").reshape(-1)
        rope_scaling = infer_llama3_rope_scaling(ff, float(theta), head_dim)
        if rope_scaling is None and not np.allclose(ff, 1.0):
            warnings_out.append(
                "the GGUF file has a rope_freqs.weight tensor (Llama-3 rope scaling) whose parameters could "
                "not be recovered; config.json gets rope_scaling=null, so outputs on long contexts (beyond "
                "the original training length) will differ from llama.cpp."
            )
    return rope_scaling


def _optional_int(v) -> int | None:
    return int(v) if v is not None else None


def build_config(reader, path: Path, tensors: dict, dtype: str, warnings_out: list[str]) -> dict:
    """config.json for the GGUF file (``tensors``: its tensors by name); ``dtype`` is the torch_dtype.
    Problems that do not stop the import are appended to ``warnings_out``."""
    a = _ARCH
    hidden = _require_int(reader, f"{a}.embedding_length", path)
    layers = _require_int(reader, f"{a}.block_count", path)
    inter = _require_int(reader, f"{a}.feed_forward_length", path)
    heads = _require_int(reader, f"{a}.attention.head_count", path)
    kv_heads = field_value(reader, f"{a}.attention.head_count_kv")
    kv_heads = int(kv_heads) if kv_heads is not None else heads
    head_dim = _head_dim(reader, path, hidden, heads)
    if heads % kv_heads:
        raise GGUFImportError(
            f"GGUF file {path}: head_count {heads} is not a multiple of head_count_kv {kv_heads}."
        )
    eps = field_value(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    theta = field_value(reader, f"{a}.rope.freq_base", 10000.0)
    ctx = field_value(reader, f"{a}.context_length", 2048)
    vocab_size = _vocab_size(reader, tensors)
    rope_scaling = _rope_scaling(reader, path, tensors, theta, head_dim, warnings_out)
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
        "bos_token_id": _optional_int(field_value(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": _optional_int(field_value(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": dtype,
        "hidden_act": "silu",
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
    }
