"""qserve-lite bench on the CPU: shipped configs, random device weights (numpy twin), the throughput protocol
through the real LLMEngine / scheduler / GPUModelRunner twin, batch-size parsing and the --max-batch sums."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qserve_lite.bench import throughput
from qserve_lite.bench.max_batch import batch_bytes, kv_bytes_per_sequence, max_batch, runner_bytes
from qserve_lite.bench.measure import measure
from qserve_lite.bench.step_split import measure_decode_steps, prefill_batch
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.pack import from_qserve_group_params, unpack_w4
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.errors import ModelNotFoundError, QServeLiteError
from qserve_lite.io.shipped_configs import load_config, resolve_config_path, shipped_config_names
from qserve_lite.kernels.w4a8_gemm import group_level1
from qserve_lite.model import random_weights as random_model
from qserve_lite.model.gpu_model import GPULlama
from qserve_lite.model.random_weights import build_random_weights
from qserve_lite.sampling_params import SamplingParams

PARAMETERS = {  # the public figures (model cards / HF parameter counts)
    "llama-3-8b": 8.03e9, "llama-2-7b": 6.74e9, "llama-2-13b": 13.02e9, "mistral-7b": 7.24e9,
    "llama-30b": 32.5e9, "yi-34b": 34.39e9, "llama-2-70b": 68.98e9, "qwen1.5-72b": 72.29e9,
}
PRECISIONS = [("w4a8kv4", 128), ("w4a8kv4", -1), ("w4a8kv8", 128), ("w8a8kv8", -1), ("w8a8kv4", -1),
              ("w16a16", -1)]


def tiny(**over) -> ModelConfig:
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
           "vocab_size": 320, "max_position_embeddings": 512, "eos_token_id": 2}
    return ModelConfig.from_dict(cfg | over)


@pytest.fixture
def finite_logits(monkeypatch):
    """Every logits array the runner returns is checked finite; yields the count of checked calls."""
    calls = []
    run = GPUModelRunner.run

    def checked(self, seqs, is_prefill):
        logits = run(self, seqs, is_prefill)
        assert logits.shape == (len(seqs), self.cfg.vocab_size) and np.isfinite(logits).all()
        calls.append(is_prefill)
        return logits

    monkeypatch.setattr(GPUModelRunner, "run", checked)
    return calls


# ---- shipped configs ----

def test_shipped_configs_have_the_known_sizes():
    assert sorted(PARAMETERS) == shipped_config_names()
    for name, params in PARAMETERS.items():
        cfg = load_config(name)
        assert cfg.head_dim == 128 and cfg.num_heads % cfg.num_kv_heads == 0
        assert math.isclose(cfg.num_parameters(), params, rel_tol=0.01), (name, cfg.num_parameters())
    qwen = load_config("qwen1.5-72b")
    assert qwen.architecture == "Qwen2ForCausalLM" and qwen.qkv_bias
    assert (qwen.num_heads, qwen.num_kv_heads) == (64, 64)
    assert (qwen.vocab_size, qwen.intermediate_size) == (152064, 24576)
    assert load_config("llama-3-8b").num_kv_heads == 8 and load_config("llama-2-70b").num_layers == 80


def test_configs_are_package_data():
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"io/configs/*.json"' in pyproject


def test_config_references_resolve(tmp_path):
    shipped = resolve_config_path("llama-3-8b")
    assert resolve_config_path("Llama-3-8B.json") == shipped and shipped.is_file()
    (tmp_path / "config.json").write_text(shipped.read_text())
    assert resolve_config_path(tmp_path) == tmp_path / "config.json"
    assert resolve_config_path(tmp_path / "config.json") == tmp_path / "config.json"
    with pytest.raises(ModelNotFoundError, match="llama-2-70b"):
        resolve_config_path("llama-9b")


# ---- random device weights ----

@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_random_weights_are_runner_layouts(precision, group):
    cfg = tiny(architectures=["Qwen2ForCausalLM"], num_key_value_heads=4)
    w = build_random_weights(cfg, precision, group, xp=np, seed=1)
    mode = {"w4": "w4_g128" if group == 128 else "w4_per_channel", "w8": "w8", "w1": "f16"}[precision[:2]]
    assert w.mode == mode and w.kv_bits == (int(precision.split("kv")[1]) if "kv" in precision else 16)
    layer = w.layers[1]
    qkv_n = cfg.q_size + 2 * cfg.kv_size
    assert (layer.qkv.n, layer.gate_up.n, layer.down.n) == (qkv_n, 2 * cfg.intermediate_size, cfg.hidden_size)
    assert layer.qkv.bias.dtype == np.float16 and layer.o_proj.bias is None
    if mode.startswith("w4"):
        assert layer.down.weight.shape == (256, 256) and layer.down.weight.dtype == np.int8
        assert layer.down.scales.dtype == np.float16
    if mode == "w4_g128":
        s2, zeros = from_qserve_group_params(layer.gate_up.s2_scales, layer.gate_up.s2_zeros)
        assert s2.min() >= 8 and s2.max() <= 15 and np.array_equal(zeros, (15 * s2.astype(np.int16)) // 2)
        level1 = group_level1(unpack_w4(layer.gate_up.weight), s2, zeros)  # raises outside the kernel's range
        assert abs(float(level1.mean())) < 2 and 40 < float(level1.std()) < 70
    if mode == "w4_per_channel":
        np.testing.assert_allclose(layer.qkv.szeros, 7.5 * layer.qkv.scales.astype(np.float32), rtol=1e-3)
    if mode == "w8":
        assert layer.o_proj.weight.dtype == np.int8 and layer.o_proj.weight.min() >= -127
    if mode == "f16":
        assert layer.gate_up.weight.dtype == np.float16 and layer.gate_up.weight.shape == (1024, 256)
    assert w.embed.dtype == np.float16 and w.lm_head is not w.embed and w.nbytes() > 0


@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_short_bench_run_through_the_engine(precision, group, finite_logits):
    w = build_random_weights(tiny(), precision, group, xp=np)
    row = measure(w, np, batch=3, prompt_len=16, gen_len=4)
    assert row["generated_tokens"] == 12 and row["all_admitted_before_decode"]
    assert row["prefill_steps"] == 1 and row["decode_steps"] == 3 and row["num_preemptions"] == 0
    assert row["kv_pages"] == 3 and row["tok_s"] > 0 and row["wall_s"] >= row["decode_s"] > 0
    assert len(finite_logits) == 2 + 4  # warm-up (prefill, decode), then prefill + 3 decodes


def test_activations_stay_finite_through_80_layers(monkeypatch):
    w = build_random_weights(tiny(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                  num_key_value_heads=1, num_hidden_layers=80), "w8a8kv8", xp=np)
    forward, streams = GPULlama.forward, []

    def watched(self, *args):
        x, residual = forward(self, *args)
        streams.append(x.astype(np.float32) + residual.astype(np.float32))
        return x, residual

    monkeypatch.setattr(GPULlama, "forward", watched)
    runner = GPUModelRunner(w, max_num_batched_tokens=64, max_num_seqs=2, max_model_len=32, num_pages=2,
                            xp=np)
    engine = LLMEngine(None, runner=runner, max_num_seqs=2, max_model_len=32, watermark=0.0)
    for prompt in np.random.default_rng(0).integers(0, 320, size=(2, 16)):
        engine.add_request(prompt.tolist(), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # one prefill of both sequences through the 80 layers
    assert len(streams) == 1
    for s in streams:
        assert np.isfinite(s).all() and 1 < float(np.sqrt((s**2).mean())) < 30 and np.abs(s).max() < 1000


def test_static_batch_admits_everything_before_the_first_decode():
    w = build_random_weights(tiny(), "w4a8kv4", 128, xp=np)
    # 40 tokens per prefill step: two 16-token prompts each, so 5 sequences take 3 prefill steps
    row = measure(w, np, batch=5, prompt_len=16, gen_len=3, max_num_batched_tokens=40)
    assert row["prefill_steps"] == 3 and row["decode_steps"] == 2 and row["all_admitted_before_decode"]
    assert row["generated_tokens"] == 15


def test_ifb_refills_slots_as_sequences_finish():
    w = build_random_weights(tiny(), "w8a8kv8", xp=np)
    row = measure(w, np, batch=2, mode="ifb", num_requests=6, prompt_len=16, gen_len=6, seed=3)
    assert row["num_requests"] == 6 and row["prefill_steps"] >= 3 and not row["all_admitted_before_decode"]
    rng = np.random.default_rng(3)
    from qserve_lite.bench.protocol import generation_lengths

    assert row["generated_tokens"] == sum(generation_lengths("ifb", 6, 6, rng))


def test_static_batch_needs_its_pages():
    w = build_random_weights(tiny(), "w4a8kv4", 128, xp=np)
    with pytest.raises(QServeLiteError, match="NUM_GPU_PAGE_BLOCKS=2 holds fewer than 3 sequences"):
        measure(w, np, batch=3, prompt_len=16, gen_len=4, num_pages=2)
    with pytest.raises(QServeLiteError, match="max-num-batched-tokens 10 is below"):
        measure(w, np, batch=3, prompt_len=16, gen_len=4, max_num_batched_tokens=10)


def test_engine_without_tokenizer_takes_token_ids_only():
    w = build_random_weights(tiny(), "w16a16", -1, xp=np)
    runner = GPUModelRunner(w, max_num_batched_tokens=64, max_num_seqs=2, max_model_len=32, num_pages=2,
                            xp=np)
    engine = LLMEngine(None, runner=runner, max_num_seqs=2, max_model_len=32)
    assert engine.block_manager.num_pages == 2
    with pytest.raises(QServeLiteError, match="no tokenizer"):
        engine.add_request("hello")
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert len(outs[-1].outputs[0].token_ids) == 3 and outs[-1].outputs[0].text == ""
    with pytest.raises(QServeLiteError, match="needs a loaded model"):
        LLMEngine(None)


def test_decode_step_split_on_the_twin():
    w = build_random_weights(tiny(), "w4a8kv4", 128, xp=np)
    runner = GPUModelRunner(w, max_num_batched_tokens=64, max_num_seqs=3, max_model_len=32, num_pages=3,
                            xp=np)
    engine = LLMEngine(None, runner=runner, max_num_seqs=3, max_model_len=32, watermark=0.0)
    prefill_batch(engine, 3, 16, max_tokens=10)
    times = measure_decode_steps(engine, runner, steps=3, warmup=1)
    assert list(times) == [False]  # numpy: no graphs
    t = times[False]
    assert len(t.wall_ms) == len(t.host_ms) == 3 and t.gpu_ms == [None] * 3
    assert all(0 < h <= wall for h, wall in zip(t.host_ms, t.wall_ms, strict=True))
    assert t.summary()["gpu_ms_median"] is None and "run" not in vars(runner)  # the timing hook is gone


# ---- sizes ----

def test_batch_sizes_from_flag_and_environment():
    assert throughput.batch_sizes(None, {}) == [throughput.DEFAULT_BATCH]
    assert throughput.batch_sizes(None, {"GLOBAL_BATCH_SIZE": " "}) == [throughput.DEFAULT_BATCH]
    assert throughput.batch_sizes(None, {"GLOBAL_BATCH_SIZE": "128"}) == [128]
    assert throughput.batch_sizes(None, {"GLOBAL_BATCH_SIZE": "32, 64,256"}) == [32, 64, 256]
    assert throughput.batch_sizes("8", {"GLOBAL_BATCH_SIZE": "128"}) == [8]
    for bad in ("abc", "0", "-4", "64,", "1.5"):
        with pytest.raises(QServeLiteError, match=f"GLOBAL_BATCH_SIZE must be a positive integer.*{bad!r}"):
            throughput.batch_sizes(None, {"GLOBAL_BATCH_SIZE": bad})
    with pytest.raises(QServeLiteError, match="--batch must be"):
        throughput.batch_sizes("x", {})


def test_max_batch_arithmetic():
    cfg = load_config("llama-3-8b")
    # QServe's figure: 34,816 bytes per KV4 page of Llama-3-8B (8 kv heads x 64 tokens x (64 + 4) bytes)
    assert kv_bytes_per_sequence(cfg, 4, 1536) == 24 * 32 * 2 * 34816
    assert kv_bytes_per_sequence(cfg, 4, 1537) == 25 * 32 * 2 * 34816
    assert kv_bytes_per_sequence(cfg, 16, 64) == 32 * 2 * 8 * 64 * 128 * 2
    budget = 60 << 30
    b = max_batch(budget, cfg, 4, 1536, 8192)
    assert batch_bytes(cfg, 4, 1536, b, 8192) <= budget < batch_bytes(cfg, 4, 1536, b + 1, 8192)
    assert 900 < b < 1200
    assert max_batch(runner_bytes(cfg, 1, 8192), cfg, 4, 1536, 8192) == 0
    assert max_batch(1 << 50, cfg, 4, 1536, 8192, limit=300) == 300
    assert max_batch(budget, cfg, 8, 1536, 8192) < b  # KV8 pages are larger


# ---- the command ----

def test_bench_command_on_the_cpu(tmp_path, capsys):
    from qserve_lite.cli import main

    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(tiny().extra))
    out = tmp_path / "bench.jsonl"
    rc = main(["bench", "--device", "cpu", "--model", str(cfg_path), "--batch", "2,3", "--prompt-len", "16",
               "--gen", "4", "--json-out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in rows] == [2, 3] and [r["generated_tokens"] for r in rows] == [8, 12]
    for key in ("date", "gpu", "git_sha", "model", "precision", "group_size", "prompt_len", "gen_len",
                "wall_s", "tok_s", "prefill_s", "decode_s", "kv_pages", "gpu_mem_used_gib"):
        assert key in rows[0]
    assert rows[0]["precision"] == "w4a8kv4" and rows[0]["group_size"] == 128 and rows[0]["gpu"] == "cpu"
    assert "tok/s" in capsys.readouterr().out
    assert main(["bench", "--device", "cpu", "--model", str(cfg_path), "--batch", "2", "--max-batch"]) == 2
    assert main(["bench", "--device", "cpu", "--model", str(cfg_path), "--max-batch"]) == 2
    assert main(["bench", "--device", "cpu", "--model", "llama-2-70b"]) == 2
    err = capsys.readouterr().err
    assert "not both" in err and "--device gpu" in err and "numpy twin" in err


def test_bench_needs_cupy_for_the_gpu(tmp_path, capsys):
    from qserve_lite.core.backend import gpu_unavailable_reason

    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is available here")
    assert throughput.main(["--device", "gpu", "--model", "llama-3-8b"]) == 2
    assert "--device gpu needs cupy" in capsys.readouterr().err


# ---- out of GPU memory (faked on the CPU) ----

CUPY_OOM = "Out of memory allocating 201,326,592 bytes (allocated so far: 84,270,825,472 bytes)."


class FakeCupyOutOfMemory(MemoryError):
    """What cupy.cuda.memory.OutOfMemoryError looks like (it is a MemoryError)."""


def _bench_oom(tmp_path, capsys, batches: str, *extra: str) -> tuple[int, list[dict], str]:
    from qserve_lite.cli import main

    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(tiny().extra))
    out = tmp_path / "bench.jsonl"
    rc = main(["bench", "--device", "cpu", "--model", str(cfg_path), "--batch", batches, "--prompt-len", "16",
               "--gen", "4", "--json-out", str(out), *extra])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return rc, rows, capsys.readouterr().err


@pytest.mark.parametrize("phase", ["allocating the runner", "in the warm-up", "in the timed run"])
def test_bench_out_of_memory_is_one_line_and_other_batches_run(phase, tmp_path, capsys, monkeypatch):
    import gc
    import weakref

    init, run = GPUModelRunner.__init__, GPUModelRunner.run
    runners = []

    def failing_init(self, weights, config, **kw):
        if phase == "allocating the runner" and config.max_num_seqs == 3:
            raise FakeCupyOutOfMemory(CUPY_OOM)
        init(self, weights, config, **kw)
        self.calls = 0
        runners.append(weakref.ref(self))

    def failing_run(self, seqs, is_prefill):
        self.calls += 1  # warm-up: calls 1 (prefill) and 2 (decode); the timed run from call 3
        if self.engine_config.max_num_seqs == 3 and self.calls == (1 if phase == "in the warm-up" else 4):
            raise FakeCupyOutOfMemory(CUPY_OOM)
        return run(self, seqs, is_prefill)

    monkeypatch.setattr(GPUModelRunner, "__init__", failing_init)
    monkeypatch.setattr(GPUModelRunner, "run", failing_run)
    rc, rows, err = _bench_oom(tmp_path, capsys, "2,3,4")
    assert rc == 1 and [r["batch"] for r in rows] == [2, 4]  # the batch after the failed one still ran
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err and "FakeCupy" not in err
    line = lines[0]
    for part in ("config.json w4a8kv4 g128", "batch 3", phase, "192 MiB more did not fit",
                 "78.48 GiB already allocated", "lower --batch / NUM_GPU_PAGE_BLOCKS", "--max-batch"):
        assert part in line, (part, line)
    if phase != "allocating the runner":
        assert "KV pool" not in line
    else:
        assert "KV pool of 3 pages" in line
    assert "batch 3 did not fit" in err
    gc.collect()
    assert all(r() is None for r in runners)  # the failed runner (its KV pool) was let go


def test_bench_out_of_memory_everywhere(tmp_path, capsys, monkeypatch):
    def oom(*args, **kw):
        raise FakeCupyOutOfMemory(CUPY_OOM)

    monkeypatch.setattr(GPUModelRunner, "run", oom)
    rc, rows, err = _bench_oom(tmp_path, capsys, "2,3")
    assert rc == 1 and rows == [] and err.count("out of GPU memory in the warm-up") == 2
    monkeypatch.setattr(throughput, "build_random_weights", oom)
    rc, rows, err = _bench_oom(tmp_path, capsys, "2")
    assert rc == 2 and rows == [] and "Traceback" not in err
    assert "w4a8kv4 g128: out of GPU memory building the random weights (192 MiB more did not fit" in err


def test_bench_says_when_the_weights_alone_do_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(random_model, "free_device_memory", lambda xp: (100 << 20, 80 << 30))
    built = []
    monkeypatch.setattr(throughput, "build_random_weights", lambda *a, **k: built.append(1))
    rc, rows, err = _bench_oom(tmp_path, capsys, "2", "--precision", "w16a16")
    assert rc == 2 and not built and rows == []
    assert "config.json w16a16: the weights alone do not fit" in err
    assert "GiB are free" in err and "80.00 GiB" in err and "--precision w4a8kv4" in err
    cfg = load_config("qwen1.5-72b")
    with pytest.raises(QServeLiteError, match=r"qwen1.5-72b: the weights alone do not fit: 72.3B parameters "
                       r"at w16a16 take 1\d\d.\d\d GiB"):
        random_model.check_weights_fit(cfg, "w16a16", -1, np, name="qwen1.5-72b")


def test_out_of_memory_recognised_through_chains():
    from qserve_lite.bench.measure import OutOfMemory, describe_oom, is_out_of_memory
    from qserve_lite.errors import DeviceError

    try:
        try:
            raise FakeCupyOutOfMemory(CUPY_OOM)
        finally:  # a failed graph capture: ending the capture raises too
            raise RuntimeError("cudaErrorStreamCaptureInvalidated: operation failed due to a previous error")
    except RuntimeError as e:
        chained = e
    assert is_out_of_memory(chained)
    assert describe_oom(chained) == "192 MiB more did not fit, 78.48 GiB already allocated"
    kv = DeviceError("the KV pool of 900 pages does not fit in GPU memory; lower NUM_GPU_PAGE_BLOCKS")
    assert is_out_of_memory(kv) and describe_oom(kv) == "the KV pool of 900 pages does not fit in GPU memory"
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(ValueError("shapes do not match"))
    e = OutOfMemory(7, "in the timed run", "1.00 GiB more did not fit")
    assert is_out_of_memory(e) and str(e).startswith("batch 7: out of GPU memory in the timed run: 1.00 GiB")
