"""engine: requests in, tokens out. config (EngineConfig), llm_engine (LLMEngine: one step = schedule, run,
sample, append), scheduler + block_manager (in-flight batching over 64-token pages, preemption), sequence,
batch (a scheduled batch packed for the model: PackedBatch, and StepInputs on the device), model_runner (the
numpy reference runner), gpu_model_runner (the CuPy runner: KV pool sizing, the GPU model, decode steps
replayed as CUDA graphs), sampler, random_engine (an engine over random weights of a real shape), reference
(a plain generate loop used by tests).
"""
