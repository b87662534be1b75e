"""Resolve a model reference (built-in alias, local directory, .gguf file, or hub id) and load it."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.precision import Precision
from qserve_lite.errors import DownloadError, GGUFImportError, ModelNotFoundError, QServeLiteError
from qserve_lite.io.checkpoint import is_quantized_checkpoint, read_quant_config, read_quantized_weights
from qserve_lite.io.default_models import ALIASES, cache_dir, ensure_default_model, writable_cache_dir
from qserve_lite.io.gguf import import_gguf
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.kernels.kv_quant import KVFakeQuantizer
from qserve_lite.model.llama import LlamaModel
from qserve_lite.model.tokenizer import Tokenizer
from qserve_lite.model.weights import LlamaWeights

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFImportError(
            "reading GGUF files needs the 'gguf' package: "
            "pip install 'qserve-lite[gguf]' (or pip install gguf)"
        )


def _import_gguf_cached(path: Path) -> Path:
    """A .gguf file is imported once into the cache, keyed by its absolute path, size and mtime."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        require_gguf()
        writable_cache_dir("gguf")
        import_gguf(path, out)
    return out


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # network errors, missing repos, gated repos all surface differently
        raise DownloadError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Download it elsewhere and pass the local directory, or use a built-in alias "
            f"({', '.join(ALIASES)})"
        ) from None


def resolve_model(ref: str | Path) -> Path:
    """Return a local HF-layout directory for `ref`."""
    ref_s = str(ref)
    if ref_s in ALIASES:
        require_gguf()
        return ensure_default_model(ref_s)
    path = Path(ref_s).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; it is not a Hugging Face model directory")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _import_gguf_cached(path)
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a model directory nor a .gguf file")
    if _HUB_ID.match(ref_s) and not ref_s.startswith((".", "/")):
        return _download_from_hub(ref_s)
    raise ModelNotFoundError(
        f"model '{ref_s}' not found: give a built-in alias ({', '.join(ALIASES)}), a model directory, "
        "a .gguf file or a Hugging Face hub id (org/name)"
    )


@dataclass
class LoadedModel:
    """A model as loaded: what it is (config, host weights, tokenizer) and how it runs (precision, group
    size, k_hadamard), as values. The GPU engine reads these fields and never builds the numpy reference;
    `model` builds that reference (the CPU engine, perplexity, calibration) on first use."""

    path: Path
    config: ModelConfig
    weights: LlamaWeights  # numpy, on the host: float linears, or quantized ones (core/formats.py)
    tokenizer: Tokenizer
    precision: Precision = field(default_factory=Precision)  # what the model runs at
    k_hadamard: bool = False  # q and k rotated per head by H_D after RoPE (the checkpoint's flag)
    group_size: int | None = None  # W4: 128 (progressive g128) or -1 (per-channel); None otherwise

    @cached_property
    def model(self) -> LlamaModel:
        """The numpy reference forward over these weights at this precision (built once, on first use).
        Quantized models run with fp16_activations: activations rounded to fp16 where the GPU engine stores
        them (model/llama.py)."""
        p = self.precision
        kv_quantizer = KVFakeQuantizer(p.kv_bits) if p.kv_bits < 16 else None
        model = LlamaModel(self.config, self.weights, np, kv_quantizer=kv_quantizer)
        model.k_hadamard = self.k_hadamard
        model.fp16_activations = p.a_bits < 16 or p.w_bits < 16
        return model


def is_quantized_model(path: Path, cfg: ModelConfig) -> bool:
    """config.json has a quantization_config, or (QServe zoo checkpoints, which have none) the tensors are
    stored quantized."""
    return "quantization_config" in cfg.extra or is_quantized_checkpoint(path)


def load_model(ref: str | Path, dtype=np.float32, precision: str | None = None) -> LoadedModel:
    """Load config, weights (numpy, `dtype`) and tokenizer for the reference forward.

    precision (see quant.precision; None = the model's own): a float model runs only at w16a16,
    w16a16kv4 or w16a16kv8 (the KV cache fake-quantized to 4/8 bits); a quantized checkpoint (config.json
    with `quantization_config`, or a QServe zoo checkpoint) runs at its own weight bits (default: the
    checkpoint's w{w_bit}a8kv{kv_bit}), and the KV bits may be overridden. The model's k_hadamard (the
    per-head Hadamard rotation of q and k after RoPE) comes from the checkpoint's quantization_config
    ("k_hadamard", absent = off); float models run without it. No model object is built here (see
    LoadedModel.model for the numpy reference).
    """
    requested = Precision.parse(precision) if precision is not None else None  # before any download
    path = resolve_model(ref)
    cfg = ModelConfig.from_file(path / "config.json")
    tokenizer = Tokenizer(path)
    k_hadamard, group_size = False, None
    if is_quantized_model(path, cfg):
        qc = read_quant_config(path)
        k_hadamard = bool(qc.get("k_hadamard", False))  # absent (QServe zoo, older checkpoints): off
        w_bit, kv_bit = int(qc["w_bit"]), int(qc.get("kv_bit") or 16)
        group_size = int(qc.get("group_size", 128)) if w_bit == 4 else None
        if requested is None:
            requested = Precision(w_bit, 8, kv_bit if kv_bit in (4, 8) else 16)
        elif requested.w_bits != w_bit:
            valid = ", ".join(f"w{w_bit}a8{kv}" for kv in ("kv4", "kv8", ""))
            raise QServeLiteError(
                f"{path} is a {w_bit}-bit-weight quantized checkpoint; it cannot run at precision "
                f"{requested.name}. Use one of: {valid} (or load the original float model for w16a16)"
            )
        weights = read_quantized_weights(cfg, path, group_size=None)
    else:
        if requested is None:
            requested = Precision()
        elif not requested.is_float:
            raise QServeLiteError(
                f"{path} holds float weights; precision {requested.name} needs quantized weights. Run "
                "`qserve-lite quantize` on it first and load the output, or use w16a16, w16a16kv4 or "
                "w16a16kv8"
            )
        weights = load_llama_weights(cfg, path, dtype=dtype)
    return LoadedModel(path, cfg, weights, tokenizer, requested, k_hadamard, group_size)
