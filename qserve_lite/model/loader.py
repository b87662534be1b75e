"""Resolve a model reference (built-in alias, local directory, .gguf file, or hub id) and load it."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DownloadError, GGUFImportError, ModelNotFoundError
from .config import ModelConfig
from .default_models import ALIASES, cache_dir, ensure_default_model
from .llama import LlamaModel
from .tokenizer import Tokenizer
from .weights import load_llama_weights

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFImportError(
            "reading GGUF files needs the 'gguf' package: pip install 'qserve-lite[gguf]' (or pip install gguf)"
        )


def _import_gguf_cached(path: Path) -> Path:
    """A .gguf file is imported once into the cache, keyed by its absolute path, size and mtime."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        require_gguf()
        from .gguf_import import import_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
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
    path: Path
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer


def load_model(ref: str | Path, dtype=np.float32) -> LoadedModel:
    """Load config, weights (numpy, `dtype`) and tokenizer for the reference forward."""
    path = resolve_model(ref)
    cfg = ModelConfig.from_file(path / "config.json")
    tokenizer = Tokenizer(path)
    weights = load_llama_weights(cfg, path, dtype=dtype)
    return LoadedModel(path, cfg, LlamaModel(cfg, weights, np), tokenizer)
