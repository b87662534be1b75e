"""Import llama-architecture GGUF files (llama.cpp's format) as Hugging Face model directories.

- reader.py: opening and validating GGUF files, decoding metadata fields, read_gguf_summary;
- config.py: config.json from the metadata (RoPE scaling included);
- tensors.py: tensor names, dequantization, the q/k un-permutation, writing model.safetensors;
- tokenizer.py: the tokenizer (tokenizer.json, tokenizer_config.json, EOS ids) from the GGUF vocabulary;
- importer.py: import_gguf, which ties them together and writes the directory atomically.

The ``gguf`` package is an optional dependency (``pip install 'qserve-lite[gguf]'``); it is imported
lazily, when a file is read.
"""

from __future__ import annotations

from qserve_lite.io.gguf.config import infer_llama3_rope_scaling
from qserve_lite.io.gguf.importer import import_gguf
from qserve_lite.io.gguf.reader import read_gguf_summary
from qserve_lite.io.gguf.tensors import SUPPORTED_DTYPES, SUPPORTED_TENSOR_TYPES, permute_qk, unpermute_qk

__all__ = [
    "SUPPORTED_DTYPES", "SUPPORTED_TENSOR_TYPES", "import_gguf", "infer_llama3_rope_scaling", "permute_qk",
    "read_gguf_summary", "unpermute_qk",
]
