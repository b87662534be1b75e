"""io: model references and file formats.

Resolving an alias / directory / .gguf / hub id (loader, default_models, shipped_configs and configs/);
loading a model as a LoadedModel (loader.load_model: config, host weights, tokenizer, precision,
k_hadamard); host weights from Hugging Face safetensors (hf_weights, safetensors_reader); torch pickles read
without torch (torch_pickle); our QServe-layout checkpoints (checkpoint/); GGUF import (gguf/); atomic output
directories (atomic_dir).
"""
