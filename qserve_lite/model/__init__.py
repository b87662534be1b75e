"""model: the Llama-family model on both backends, over the kernels below it.

weights (host weight dataclasses), linear / quant_linear (float and exactly-emulated W4A8 / W8A8 linears),
llama (the numpy fp32 reference forward: the oracle), attention / kv_cache / paged_kv_cache (the reference's
KV backends), gpu_model (the GPU model: device weights and the fused forward GPULlama over StepInputs),
random_weights (random device weights of a real shape, for benchmarks and load tests), tokenizer.
"""
