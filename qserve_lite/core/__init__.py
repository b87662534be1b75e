"""core: the vocabulary every layer shares, importing nothing of the package but errors.

model_config (ModelConfig from a Hugging Face config.json), precision (Precision: w4a8kv4, ...), formats (the
quantized weight formats W4Group / W4PerChannel / W8PerChannel), pack (QServe's W4 packing and g128 group
parameters), rope (RoPE frequencies, cos/sin and rotation), hadamard (Hadamard matrices), kv_layout (PAGE_SIZE
and the byte layout of a KV page), backend (cpu / gpu / auto, and the one is_cupy / array_module / to_host),
threads (the CPU engine's BLAS thread policy).
"""
