"""Turn a llama-architecture GGUF file into a Hugging Face model directory.

``import_gguf`` reads a GGUF file (as written by llama.cpp's converters) and writes

* ``model.safetensors`` - the weights, dequantized, with Hugging Face names and layout;
* ``config.json`` - a ``LlamaForCausalLM`` config;
* ``tokenizer.json`` / ``tokenizer_config.json`` - the tokenizer rebuilt from the GGUF vocabulary;
* ``generation_config.json`` - BOS/EOS ids.

Everything is written to a temporary directory next to ``out_dir`` and renamed into place at the
end, so a failed import never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qserve_lite.errors import GGUFImportError
from qserve_lite.io.atomic_dir import atomic_output_dir
from qserve_lite.io.gguf.config import build_config
from qserve_lite.io.gguf.reader import field_value, open_reader
from qserve_lite.io.gguf.tensors import (
    DTYPE_ALIASES,
    SUPPORTED_DTYPES,
    check_shapes,
    tensor_table,
    write_plan,
    write_safetensors,
)
from qserve_lite.io.gguf.tokenizer import build_tokenizer, eos_ids, tokenizer_config

log = logging.getLogger(__name__)


def _write_json(p: Path, obj: dict) -> None:
    p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_arguments(gguf_path: Path, out_dir: Path, dtype: str, overwrite: bool) -> str:
    """The canonical dtype name, after checking dtype and that out_dir can receive the model."""
    dt = DTYPE_ALIASES.get(str(dtype).lower())
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
    return dt


def _check_architecture(reader, gguf_path: Path) -> None:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise GGUFImportError(
            f"GGUF file {gguf_path} has general.architecture = {arch!r}; only 'llama' models (Llama, "
            "SmolLM, TinyLlama, Mistral-7B, ...) can be imported."
        )


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
    dt = _check_arguments(gguf_path, out_dir, dtype, overwrite)
    reader = open_reader(gguf_path)
    _check_architecture(reader, gguf_path)
    tensors = tensor_table(reader, gguf_path)

    warns: list[str] = []
    cfg = build_config(reader, gguf_path, tensors, dt, warns)
    check_shapes(tensors, cfg, gguf_path)
    plan = write_plan(tensors, cfg["num_hidden_layers"], gguf_path)

    tok, info = build_tokenizer(reader, gguf_path, warns)
    if cfg["vocab_size"] != len(info["tokens"]):
        warns.append(
            f"the tokenizer has {len(info['tokens'])} tokens but the embedding has {cfg['vocab_size']} rows."
        )
    chat_template = field_value(reader, "tokenizer.chat_template")
    tok_cfg = tokenizer_config(info, cfg["max_position_embeddings"], chat_template)
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos_ids(reader, info, chat_template)}

    with atomic_output_dir(out_dir, GGUFImportError, "the model") as tmp:
        write_safetensors(tmp / "model.safetensors", plan, cfg, dt, progress, gguf_path)
        _write_json(tmp / "config.json", cfg)
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        _write_json(tmp / "generation_config.json", gen_cfg)
    for w in warns:
        log.warning("import-gguf: %s", w)
    return out_dir
