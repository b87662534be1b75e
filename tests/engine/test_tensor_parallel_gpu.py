"""Tensor parallelism on GPUs (pytest -m gpu; skipped without cupy or a device).

On one GPU: tp = 1 through the whole TP code path (TPGroup, TPModelRunner, an NCCL communicator of one rank
whose all-reduces and token broadcasts run eagerly in prefill and inside the captured decode graphs) gives
the plain GPUModelRunner's logits bit for bit. With two or more GPUs, tp = 2 against tp = 1 on the same
random model (model/tp_split.py's tolerances: float models to fp16 roundings, quantized ones to one int8
re-quantization per row-split linear)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cupy_or_skip, teacher_forced, tiny_config

pytestmark = pytest.mark.gpu

cp = cupy_or_skip()

from qserve_lite.core.model_config import ModelConfig  # noqa: E402
from qserve_lite.core.precision import Precision  # noqa: E402
from qserve_lite.engine.config import EngineConfig  # noqa: E402
from qserve_lite.engine.gpu_model_runner import GPUModelRunner  # noqa: E402
from qserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from qserve_lite.engine.tensor_parallel import RandomSource, TPGroup, TPModelRunner  # noqa: E402
from qserve_lite.model.gpu_model import DeviceWeights  # noqa: E402
from qserve_lite.model.random_weights import random_host_weights  # noqa: E402

CFG = ModelConfig.from_dict(tiny_config(
    hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    num_hidden_layers=3, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False))
CONFIG = EngineConfig(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=512, num_pages=64,
                      device="gpu")
PROMPTS = [np.random.default_rng(1).integers(0, 512, size=n).tolist() for n in (3, 40, 64, 65, 130, 7)]
STEPS = 24


def plain_rows(precision: str, forced=None):
    p = Precision.parse(precision)
    weights = DeviceWeights.from_host(CFG, random_host_weights(CFG, p, 128, seed=2), p, cp)
    runner = GPUModelRunner(weights, CONFIG, xp=cp)
    engine = LLMEngine(None, CONFIG.replace(num_pages=None), runner=runner)
    out = teacher_forced(engine, PROMPTS, forced, STEPS)
    assert runner.graphs  # decode ran as CUDA graphs
    runner.release_graphs()
    return out


def tp_rows(precision: str, tp: int, forced=None):
    group = TPGroup(RandomSource(CFG, precision, 128, seed=2), tp, "gpu")
    try:
        runner = TPModelRunner(group, CONFIG)
        engine = LLMEngine(None, CONFIG.replace(num_pages=None), runner=runner)
        rows, own = teacher_forced(engine, PROMPTS, forced, STEPS)
        assert runner.graphs and runner.cuda_graphs
        runner.release_graphs()
        return rows, own
    finally:
        group.close()


@pytest.mark.parametrize("precision", ["w4a8kv4", "w16a16"])
def test_tp1_over_nccl_is_the_plain_runner(precision):
    ref, own = plain_rows(precision)
    forced = [[own[(i, j)] for j in range(STEPS)] for i in range(len(PROMPTS))]
    rows, _ = tp_rows(precision, 1, forced)
    assert all(np.array_equal(rows[k], ref[k]) for k in ref)


needs_two = pytest.mark.skipif(cp.cuda.runtime.getDeviceCount() < 2, reason="needs 2 GPUs")


@needs_two
@pytest.mark.parametrize("precision,min_agree,max_err", [("w16a16", 0.99, 0.01), ("w4a8kv4", 0.8, 0.15)])
def test_tp2_follows_tp1(precision, min_agree, max_err):
    ref, own = plain_rows(precision)
    forced = [[own[(i, j)] for j in range(STEPS)] for i in range(len(PROMPTS))]
    rows, _ = tp_rows(precision, 2, forced)
    agree = np.mean([np.argmax(rows[k]) == np.argmax(ref[k]) for k in ref])
    err = max(float(np.abs(rows[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
    print(f"{precision} tp2 vs tp1: agreement {agree:.4f}, max rel logits difference {err:.4f}")
    assert agree >= min_agree and err < max_err, (agree, err)
