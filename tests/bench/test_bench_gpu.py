"""The benchmark's random device weights on the GPU (pytest -m gpu; skipped without cupy or a device): built
with cuRAND in the kernels' value ranges, run by GPUModelRunner like its numpy twin, through the throughput
protocol and the decode step split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import cupy_or_skip

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()

from test_bench import PRECISIONS  # noqa: E402
from test_bench import tiny as tiny_llama  # noqa: E402

from qserve_lite.bench.measure import measure  # noqa: E402
from qserve_lite.bench.step_split import measure_decode_steps, prefill_batch  # noqa: E402
from qserve_lite.core.model_config import ModelConfig  # noqa: E402
from qserve_lite.core.pack import from_qserve_group_params  # noqa: E402
from qserve_lite.engine.gpu_model_runner import GPUModelRunner  # noqa: E402
from qserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from qserve_lite.io.shipped_configs import load_config  # noqa: E402
from qserve_lite.model.gpu_model import DeviceLayer, DeviceLinear, DeviceWeights  # noqa: E402
from qserve_lite.model.random_weights import build_random_weights  # noqa: E402
from qserve_lite.sampling_params import SamplingParams  # noqa: E402


def tiny(**over) -> ModelConfig:
    """The CPU tests' tiny shape as Qwen2 (q/k/v biases on)."""
    return tiny_llama(architectures=["Qwen2ForCausalLM"], **over)


def to_device(w: DeviceWeights) -> DeviceWeights:
    """The same (numpy-built) weights as cupy arrays."""

    def dev(a):
        return None if a is None else cp.asarray(a)

    def lin(x: DeviceLinear) -> DeviceLinear:
        return dataclasses.replace(x, weight=dev(x.weight), scales=dev(x.scales), szeros=dev(x.szeros),
                                   s2_scales=dev(x.s2_scales), s2_zeros=dev(x.s2_zeros), bias=dev(x.bias))

    layers = [DeviceLayer(dev(la.input_norm), dev(la.post_attn_norm), lin(la.qkv), lin(la.o_proj),
                          lin(la.gate_up), lin(la.down)) for la in w.layers]
    embed = dev(w.embed)
    return dataclasses.replace(w, layers=layers, embed=embed, final_norm=dev(w.final_norm),
                               lm_head=embed if w.lm_head is w.embed else dev(w.lm_head))


def _prefill_logits(weights, xp, prompts):
    runner = GPUModelRunner(weights, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=128,
                            num_pages=16, xp=xp, cuda_graphs=False)
    engine = LLMEngine(None, runner=runner, max_num_seqs=8, max_model_len=128)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True))
    batch = engine.scheduler.schedule()
    logits = runner.run(batch.seqs, True)
    return logits.get() if xp is cp else logits


@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_random_weights_run_like_the_twin(precision, group):
    w = build_random_weights(tiny(), precision, group, xp=np, seed=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 320, size=n).tolist() for n in (1, 17, 64, 100)]
    ref = _prefill_logits(w, np, prompts)
    got = _prefill_logits(to_device(w), cp, prompts)
    assert np.isfinite(got).all()
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err < 0.1, err


@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_random_weights_built_on_the_device(precision, group):
    w = build_random_weights(tiny(), precision, group, xp=cp, seed=3)
    layer = w.layers[0]
    assert isinstance(layer.qkv.weight, cp.ndarray) and layer.qkv.weight.flags.c_contiguous
    if group == 128 and precision.startswith("w4"):
        s2, zeros = from_qserve_group_params(layer.gate_up.s2_scales.get(), layer.gate_up.s2_zeros.get())
        assert s2.min() == 8 and s2.max() == 15 and np.array_equal(zeros, (15 * s2.astype(np.int16)) // 2)
    if precision.startswith("w8"):
        codes = layer.down.weight.get()
        assert codes.min() == -127 and codes.max() == 127
    row = measure(w, cp, batch=4, prompt_len=16, gen_len=4)
    assert row["generated_tokens"] == 16 and row["all_admitted_before_decode"] and row["cuda_graphs"]


def test_llama3_shape_static_batch():
    cfg = dataclasses.replace(load_config("llama-3-8b"), num_layers=2)
    w = build_random_weights(cfg, "w4a8kv4", 128, xp=cp)
    assert w.nbytes() > 2 * 128256 * 4096 * 2  # embed + lm_head + 2 layers
    row = measure(w, cp, batch=16, prompt_len=256, gen_len=8, max_num_batched_tokens=2048)
    assert row["generated_tokens"] == 128 and row["prefill_steps"] == 2 and row["all_admitted_before_decode"]
    assert row["gpu_mem_used_gib"] > 0


def test_decode_step_split_both_modes():
    w = build_random_weights(tiny(), "w4a8kv4", 128, xp=cp)
    runner = GPUModelRunner(w, max_num_batched_tokens=256, max_num_seqs=4, max_model_len=64, num_pages=4,
                            xp=cp, cuda_graphs=True)
    engine = LLMEngine(None, runner=runner, max_num_seqs=4, max_model_len=64, watermark=0.0)
    prefill_batch(engine, 4, 16, max_tokens=20)
    times = measure_decode_steps(engine, runner, steps=4, warmup=2)
    assert sorted(times) == [False, True] and 4 in runner.graphs
    for t in times.values():
        assert len(t.gpu_ms) == 4 and all(g is not None and g > 0 for g in t.gpu_ms)
        assert all(0 < h <= wall for h, wall in zip(t.host_ms, t.wall_ms, strict=True))
    assert runner.cuda_graphs and "run" not in vars(runner)
