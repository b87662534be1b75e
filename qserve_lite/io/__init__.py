"""io: model references and file formats. Resolving an alias / directory / .gguf / hub id (loader,
default_models, shipped_configs and configs/), loading a model as a LoadedModel (loader.load_model: config, host
weights, tokenizer, precision, k_hadamard), reading safetensors and torch pickles without torch, our QServe-layout
checkpoints (checkpoint), GGUF import, atomic output directories.
"""
