"""The CuPy engine (engine/gpu_model_runner.py) against the numpy engine (the integer emulation) and against
its own op sequence on the kernels' numpy twins, on tiny random checkpoints built here (pytest -m gpu;
skipped without cupy or a device).

Greedy tokens are compared along the emulation's greedy path (teacher forcing: every engine sees the same
histories), over the first 32 generated tokens of 8 prompts; the free-running agreement and the logits'
relative error are printed (-s) as well. The model has its own lm_head, scaled up so that its logits have
clear winners (a random model with near-tied logits measures tie-breaking, not the engine).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compare_logits, cupy_or_skip, random_weights, teacher_forced, tiny_config, write_model

from qserve_lite.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()

from qserve_lite.core.model_config import ModelConfig  # noqa: E402
from qserve_lite.engine.gpu_model_runner import GPUModelRunner  # noqa: E402
from qserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from qserve_lite.errors import DeviceError  # noqa: E402
from qserve_lite.io.checkpoint import LINEARS, save_quantized  # noqa: E402
from qserve_lite.io.hf_weights import load_llama_weights  # noqa: E402
from qserve_lite.llm import LLM  # noqa: E402
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear  # noqa: E402
from qserve_lite.quant.quantizers import (  # noqa: E402
    quantize_w4_group,
    quantize_w4_per_channel,
    quantize_w8_per_channel,
)

QUANT = {
    "w4_g128": {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": 128, "kv_bit": 4},
    "w4_chn": {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": -1, "kv_bit": 4},
    "w8": {"quant_method": "qoq", "w_bit": 8, "a_bit": 8, "group_size": -1, "kv_bit": 8},
    # q / k rotated per head by H_D after RoPE (the KV writer's QS_KHAD; the emulation multiplies by H_D)
    "w4_g128_khad": {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": 128, "kv_bit": 4,
                     "k_hadamard": True},
}
NUM_TOKENS = 32
PROMPT_LENS = (1, 5, 17, 40, 64, 65, 100, 150)


def gpu_config() -> dict:
    # the kernels' limits: head_dim 64/128, packed W4 n and K multiples of 32 (g128: K of 128)
    return tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, num_hidden_layers=2, vocab_size=320, max_position_embeddings=512,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    cfg = gpu_config()
    tensors = random_weights(cfg, seed=11)
    tensors["lm_head.weight"] *= 4.0  # logits of std ~4: clear winners (see the module docstring)
    return write_model(tmp_path_factory.mktemp("gpu-float"), cfg, tensors)


def _quantized_dir(src, out, mode: str):
    cfg_dict = json.loads((src / "config.json").read_text())
    weights = load_llama_weights(ModelConfig.from_dict(cfg_dict), src)
    for layer in weights.layers:
        for _, name in LINEARS:
            w = np.asarray(getattr(layer, name).weight, np.float64)
            if mode.startswith("w4_g128"):
                q = W4A8Linear(quantize_w4_group(w, 128))
            elif mode == "w4_chn":
                q = W4A8Linear(quantize_w4_per_channel(w))
            else:
                q = W8A8Linear(quantize_w8_per_channel(w))
            setattr(layer, name, q)
    return save_quantized(out, cfg_dict, weights, QUANT[mode], src)


@pytest.fixture(scope="module")
def checkpoints(float_dir, tmp_path_factory):
    out = {"float": float_dir}
    for mode in QUANT:
        out[mode] = _quantized_dir(float_dir, tmp_path_factory.mktemp(mode) / "ckpt", mode)
    return out


def _prompts(n: int = len(PROMPT_LENS)) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, 320, size=PROMPT_LENS[i % len(PROMPT_LENS)]).tolist() for i in range(n)]


def _teacher_forced(engine, prompts, forced: list[list[int]] | None):
    """conftest.teacher_forced over NUM_TOKENS tokens."""
    return teacher_forced(engine, prompts, forced, NUM_TOKENS)


# (checkpoint, precision or None for its own, min teacher-forced agreement with the emulation, with the twin).
# Measured on an H200 (2026-11-21), GPU vs twin / GPU vs emulation: w4 g128 kv4 0.961 / 0.898, w4 per-channel
# kv4 0.855 / 0.809, w4a8kv8 0.961 / 0.945, w4a8 0.980 / 0.973, w8a8kv4 0.957 / 0.891, w8a8kv8 0.984 / 0.980,
# w16a16 0.996 / 0.996, w16a16kv8 0.996 / 0.980. The A8 and KV4 pipelines of this random (unsmoothed) model
# turn tiny differences (attention rounding, fp16 vs fp32 activations) into flipped int8 / int4 codes; the
# twin itself agrees with the emulation no better than the GPU does.
CASES = [
    ("w4_g128", None, 0.8, 0.9),  # w4a8kv4
    ("w4_chn", None, 0.75, 0.8),
    ("w4_g128", "w4a8kv8", 0.9, 0.93),
    ("w4_g128", "w4a8", 0.93, 0.95),
    ("w8", "w8a8kv4", 0.8, 0.9),
    ("w8", None, 0.93, 0.95),  # w8a8kv8
    ("float", "w16a16", 0.95, 0.97),
    ("float", "w16a16kv8", 0.95, 0.97),
    ("w4_g128_khad", None, 0.8, 0.9),  # w4a8kv4 with k_hadamard (not yet measured; the w4a8kv4 bounds)
]


@pytest.mark.parametrize("mode,precision,min_agree,min_twin", CASES)
def test_greedy_matches_cpu(checkpoints, mode, precision, min_agree, min_twin):
    """Three engines on the same checkpoint: the CPU emulation (model/llama.py, fp32 between integer GEMMs),
    the GPU runner, and the GPU runner's own op sequence on the kernels' numpy twins. Along the emulation's
    greedy path (teacher forcing), the GPU must match its twin (what the kernels promise) and agree with the
    emulation on most tokens; the free-running agreement is reported too."""
    prompts = _prompts()
    gpu = LLM(str(checkpoints[mode]), precision=precision, device="gpu", max_num_seqs=16)
    cpu = LLM(str(checkpoints[mode]), precision=precision, device="cpu", max_num_seqs=16)
    assert gpu.engine.runner.xp is cp and gpu.precision == cpu.precision
    assert gpu.engine.runner.k_hadamard is cpu.loaded.model.k_hadamard is mode.endswith("khad")
    twin = LLMEngine(cpu.loaded, max_num_seqs=16, num_pages=64, runner=GPUModelRunner(
        cpu.loaded, max_num_batched_tokens=1024, max_num_seqs=16, max_model_len=512, num_pages=64, xp=np))
    ref_rows, ref_own = _teacher_forced(cpu.engine, prompts, None)
    forced = [[ref_own[(i, j)] for j in range(NUM_TOKENS)] for i in range(len(prompts))]
    gpu_rows, _ = _teacher_forced(gpu.engine, prompts, forced)
    twin_rows, _ = _teacher_forced(twin, prompts, forced)
    free = gpu.generate(prompts, SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)
    free_agree = np.mean([a == b for o, f in zip(free, forced, strict=True)
                          for a, b in zip(o.outputs[0].token_ids, f, strict=True)])
    vs_twin, err_twin = compare_logits(gpu_rows, twin_rows)
    vs_emul, err_emul = compare_logits(gpu_rows, ref_rows)
    twin_emul, _ = compare_logits(twin_rows, ref_rows)
    name = f"{mode}/{gpu.precision}"
    print(f"\n{name}: GPU vs twin argmax {vs_twin:.3f} (logits err {err_twin:.4f}); GPU vs emulation, "
          f"teacher-forced {vs_emul:.3f} (twin {twin_emul:.3f}), free-running {free_agree:.3f} (logits err "
          f"{err_emul:.4f}) over {len(ref_rows)} tokens")
    assert vs_twin >= min_twin, f"{name}: the GPU's greedy tokens match its twin's on {vs_twin:.1%} only"
    assert vs_emul >= min_agree, f"{name}: GPU and emulation greedy tokens agree on {vs_emul:.1%} only"


def test_sampling_on_device(checkpoints):
    """Sampled requests (top-k/p, min-p, penalties, logprobs) run on the device with seeds respected."""
    gpu = LLM(str(checkpoints["w4_g128"]), device="gpu", max_num_seqs=8)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=7,
                            repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, logprobs=3,
                            ignore_eos=True)
    prompts = _prompts(4)
    first = gpu.generate(prompts, params, use_tqdm=False)
    again = gpu.generate(prompts, params, use_tqdm=False)
    for a, b in zip(first, again, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].token_ids) == 12
        for tok, lp in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, strict=True):
            assert tok in lp and len(lp) >= 3 and all(v <= 1e-4 for v in lp.values())


def test_preemption_and_many_requests(checkpoints):
    """A small page pool forces preemption by recompute; greedy outputs equal an unconstrained run."""
    prompts = _prompts(24)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    roomy = LLM(str(checkpoints["w4_g128"]), device="gpu", max_num_seqs=32)
    tight = LLM(str(checkpoints["w4_g128"]), device="gpu", max_num_seqs=32, num_pages=8)
    a = roomy.generate(prompts, params, use_tqdm=False)
    b = tight.generate(prompts, params, use_tqdm=False)
    assert sum(o.num_preemptions for o in b) > 0
    same = sum(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(a, b, strict=True))
    assert same >= 0.9 * len(prompts)


def test_pool_sizing(checkpoints, monkeypatch):
    monkeypatch.setenv("NUM_GPU_PAGE_BLOCKS", "13")
    assert LLM(str(checkpoints["w4_g128"]), device="gpu").engine.runner.num_pages == 13
    monkeypatch.delenv("NUM_GPU_PAGE_BLOCKS")
    with pytest.raises(DeviceError, match="KV cache does not fit"):
        LLM(str(checkpoints["w4_g128"]), device="gpu", gpu_memory_utilization=1e-6)


def test_auto_picks_gpu(checkpoints):
    assert LLM(str(checkpoints["w4_g128"]), device="auto").device == "gpu"


def test_auto_falls_back_to_cpu_for_models_the_kernels_cannot_run(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="auto")  # head_dim 12: no GPU attention kernel
    assert llm.device == "cpu"
    with pytest.raises(DeviceError, match="head_dim"):
        LLM(str(tiny_model_dir), device="gpu")


@pytest.mark.parametrize("mode,precision", [("w4_g128", None), ("w8", None), ("float", "w16a16"),
                                            ("w4_g128_khad", None)])
def test_graph_replay_matches_eager(checkpoints, monkeypatch, mode, precision):
    """Decode steps replayed as CUDA graphs (padded batch buckets, static inputs) against the eager runner,
    along the same greedy path, with batches that shrink as requests of different lengths finish."""
    prompts = _prompts()
    monkeypatch.setenv("QSERVE_LITE_CUDA_GRAPHS", "0")
    eager = LLM(str(checkpoints[mode]), precision=precision, device="gpu", max_num_seqs=16)
    monkeypatch.setenv("QSERVE_LITE_CUDA_GRAPHS", "1")
    graphs = LLM(str(checkpoints[mode]), precision=precision, device="gpu", max_num_seqs=16)
    assert graphs.engine.runner.cuda_graphs and not eager.engine.runner.cuda_graphs
    ref_rows, ref_own = _teacher_forced(eager.engine, prompts, None)
    forced = [[ref_own[(i, j)] for j in range(NUM_TOKENS)] for i in range(len(prompts))]
    rows, _ = _teacher_forced(graphs.engine, prompts, forced)
    assert graphs.engine.runner.graphs, "no decode step ran as a graph"
    agree, err = compare_logits(rows, ref_rows)
    params = [SamplingParams(max_tokens=4 + 4 * i, ignore_eos=True) for i in range(len(prompts))]
    a = eager.generate(prompts, params, use_tqdm=False)
    b = graphs.generate(prompts, params, use_tqdm=False)
    same = np.mean([x == y for o, p in zip(a, b, strict=True)
                    for x, y in zip(o.outputs[0].token_ids, p.outputs[0].token_ids, strict=True)])
    print(f"\n{mode}/{graphs.precision}: graphs vs eager argmax {agree:.3f} (logits err {err:.5f}), "
          f"free-running {same:.3f}; buckets captured {sorted(graphs.engine.runner.graphs)}")
    assert agree >= 0.97 and err < 0.02
    assert same >= 0.9


@pytest.mark.parametrize("mode,precision", [("w4_g128", None), ("float", "w16a16")])
def test_overlapped_steps_equal_the_synchronous_loop(checkpoints, mode, precision):
    """Async scheduling on the GPU (tokens chosen and fed back on the device, the host one step behind) gives
    the synchronous loop's tokens exactly: greedy and seeded sampling, stop tokens, max_tokens."""
    prompts = _prompts()
    sync = LLM(str(checkpoints[mode]), precision=precision, device="gpu", max_num_seqs=16,
               async_scheduling=False)
    overlap = LLM(str(checkpoints[mode]), precision=precision, device="gpu", max_num_seqs=16)
    assert overlap.engine.engine_config.async_scheduling and not sync.engine.engine_config.async_scheduling
    free = sync.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    params[1] = SamplingParams(max_tokens=24, stop_token_ids=[free[1].outputs[0].token_ids[5]])
    params[2] = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, top_k=50, seed=3, ignore_eos=True)
    a = sync.generate(prompts, params, use_tqdm=False)
    b = overlap.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].finish_reason for o in a] == [o.outputs[0].finish_reason for o in b]
    assert a[1].outputs[0].finish_reason == "stop" and len(a[1].outputs[0].token_ids) <= 5
