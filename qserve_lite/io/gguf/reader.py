"""Reading GGUF files (as written by llama.cpp's converters): open and validate a file, decode its metadata
fields, and summarize it.

The ``gguf`` package is an optional dependency (``pip install 'qserve-lite[gguf]'``); it is imported
lazily, and every failure to read a file becomes a GGUFImportError.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qserve_lite.errors import GGUFImportError

_INSTALL_HINT = "install it with: pip install 'qserve-lite[gguf]' (or pip install gguf)"


def gguf_module():
    try:
        import gguf  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise GGUFImportError(f"reading GGUF files needs the 'gguf' package; {_INSTALL_HINT}") from e
    return gguf


def open_reader(path: Path):
    """Open ``path`` with gguf.GGUFReader, turning every failure into GGUFImportError."""
    gguf = gguf_module()
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


def field_value(reader, key: str, default: Any = None) -> Any:
    """Value of GGUF metadata field ``key`` as a Python value (str, int, float, bool or list)."""
    gguf = gguf_module()
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


def field_array(reader, key: str, dtype) -> np.ndarray | None:
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


def tensor_type_name(t) -> str:
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
    reader = open_reader(path)
    arch = field_value(reader, "general.architecture")
    a = arch or "llama"
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field_value(reader, f"{a}.vocab_size")
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)
    types = Counter(tensor_type_name(t) for t in reader.tensors)
    return {
        "path": str(path),
        "architecture": arch,
        "name": field_value(reader, "general.name"),
        "layers": field_value(reader, f"{a}.block_count"),
        "hidden_size": field_value(reader, f"{a}.embedding_length"),
        "num_attention_heads": field_value(reader, f"{a}.attention.head_count"),
        "num_key_value_heads": field_value(reader, f"{a}.attention.head_count_kv"),
        "context_length": field_value(reader, f"{a}.context_length"),
        "vocab_size": vocab,
        "tokenizer_model": field_value(reader, "tokenizer.ggml.model"),
        "tokenizer_pre": field_value(reader, "tokenizer.ggml.pre"),
        "tensor_count": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "n_params": int(sum(int(t.n_elements) for t in reader.tensors)),
        "file_size": path.stat().st_size,
    }
