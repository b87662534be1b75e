"""Quantized checkpoints in QServe's model-zoo format: write ours, read ours and QServe's.

- layout.py: the tensor names, K padding and quantization_config keys (the format's description);
- write.py: save_quantized (safetensors shards + config.json + tokenizer files, written atomically);
- read.py: read_quant_config, read_quantized_weights, is_quantized_checkpoint;
- zoo.py: QServe zoo checkpoints (pytorch_model.bin read without torch; no quantization_config; W4A8 norms).
"""

from __future__ import annotations

from qserve_lite.io.checkpoint.layout import LINEARS, PRODUCER, padded_k, validate_quant_config
from qserve_lite.io.checkpoint.read import is_quantized_checkpoint, read_quant_config, read_quantized_weights
from qserve_lite.io.checkpoint.write import MAX_SHARD_BYTES, TOKENIZER_FILES, save_quantized

__all__ = [
    "LINEARS", "MAX_SHARD_BYTES", "PRODUCER", "TOKENIZER_FILES", "is_quantized_checkpoint", "padded_k",
    "read_quant_config", "read_quantized_weights", "save_quantized", "validate_quant_config",
]
