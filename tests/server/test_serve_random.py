"""`qserve-lite serve --random-weights SHAPE --tokenizer DIR`: random weights of a config's shape with a real
tokenizer's vocabulary, served over HTTP. On the CPU (the GPU runner's numpy twin) with a tiny config: the
server starts, /v1/models says what it serves, completions and chat completions return text, and
benchmarks/serve_load.py runs against it unchanged."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tokenizer

from qserve_lite.cli import main as cli_main
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.random_engine import build_random_engine, load_tokenizer, with_vocab_size
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.shipped_configs import load_config
from qserve_lite.model.random_weights import build_random_weights, weight_bytes
from qserve_lite.sampling_params import SamplingParams
from qserve_lite.server import missing_server_deps

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 1000, "max_position_embeddings": 1024, "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny config.json whose vocabulary differs from the tokenizer's, a tokenizer-only directory)."""
    root = tmp_path_factory.mktemp("random-serve")
    (root / "tiny-shape.json").write_text(json.dumps(TINY))
    tok = root / "tokenizer"
    tok.mkdir()
    build_tokenizer(tok)
    return root / "tiny-shape.json", tok


def test_weight_bytes_match_the_built_weights():
    cfg = ModelConfig.from_dict(TINY | {"architectures": ["Qwen2ForCausalLM"], "intermediate_size": 208})
    for precision, group in (("w4a8kv4", 128), ("w4a8kv4", -1), ("w8a8kv8", -1), ("w16a16", -1)):
        built = build_random_weights(cfg, precision, group, xp=np)
        assert weight_bytes(cfg, precision, group) == built.nbytes(), (precision, group)
    # Llama-3-8B's shape at W4 g128 with SmolLM2's 49,152-token vocabulary: ~3.5 GiB of layers + embeddings
    shape = with_vocab_size(load_config("llama-3-8b"), 49152)
    assert shape.num_layers == 32 and shape.vocab_size == 49152
    assert 3.9 < weight_bytes(shape, "w4a8kv4", 128) / 2**30 < 4.6


def test_random_engine_speaks_text(tiny_shape):
    cfg_path, tok_dir = tiny_shape
    built = build_random_engine(cfg_path, tok_dir, config=EngineConfig(device="cpu", max_num_seqs=4, seed=1))
    engine, tok = built.engine, load_tokenizer(tok_dir)[0]
    assert built.vocab_size == tok.vocab_size == engine.vocab_size and built.config_vocab_size == 1000
    assert engine.config.num_layers == 2 and engine.config.extra["vocab_size"] == tok.vocab_size
    assert built.precision.name == "w4a8kv4" and built.group_size == 128 and built.device == "cpu"
    assert built.default_name == "random-tiny-shape-w4a8kv4"
    meta = built.metadata()
    assert meta["weights"] == "random" and meta["config_vocab_size"] == 1000
    assert meta["tokenizer"] == str(tok_dir)
    assert "1000 -> " in built.describe() and "RANDOM" in built.describe()
    engine.add_request("The capital of France is", SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request(tok.encode_chat([{"role": "user", "content": "hi"}]), SamplingParams(max_tokens=6))
    done = []
    while engine.has_unfinished():
        done += [o for o in engine.step() if o.finished]
    assert len(done) == 2 and all(0 < len(o.outputs[0].token_ids) <= 6 for o in done)
    assert len(done[0].outputs[0].text) > 0  # random, but text
    with pytest.raises(QServeLiteError, match="group size 128 or -1"):
        build_random_engine(cfg_path, tok_dir, group_size=64, config=EngineConfig(device="cpu"))
    with pytest.raises(QServeLiteError, match="numpy twin"):
        build_random_engine("llama-3-8b", tok_dir, config=EngineConfig(device="cpu"))


def _free_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_cli_serves_random_weights(tiny_shape, tmp_path, monkeypatch, capsys):
    """The command builds the app; it is then served for real on a free port, and serve_load runs on it."""
    if missing_server_deps() or importlib.util.find_spec("httpx") is None:
        pytest.skip("needs pip install '.[server,test]'")
    import httpx
    import uvicorn

    cfg_path, tok_dir = tiny_shape
    seen = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets=None: seen.setdefault("config", self.config)
    )
    argv = ["serve", "--random-weights", str(cfg_path), "--tokenizer", str(tok_dir), "--device", "cpu",
            "--max-num-seqs", "4", "--precision", "w4a8kv8", "--group-size", "-1", "--port", "0"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "vocab_size 1000 -> " in out
    assert "serving as 'random-tiny-shape-w4a8kv8'" in out
    monkeypatch.undo()

    app = seen["config"].app
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    sock = _free_port_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["random-tiny-shape-w4a8kv8"]
        meta = models[0]["metadata"]
        assert meta["weights"] == "random" and meta["precision"] == "w4a8kv8" and meta["group_size"] == -1
        assert meta["config_vocab_size"] == 1000 and meta["vocab_size"] < 1000
        body = {"model": models[0]["id"], "prompt": "The capital of France is", "max_tokens": 5,
                "ignore_eos": True, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert isinstance(choice["text"], str) and choice["text"]
        assert r.json()["usage"]["completion_tokens"] == 5
        chat = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5, "ignore_eos": True}
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] and r.json()["usage"]["completion_tokens"] == 5

        spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
        serve_load = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "serve_load", serve_load)  # its dataclasses look themselves up
        spec.loader.exec_module(serve_load)
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("Say something.\nThe capital of Italy is\nCount to three.\n")
        load_args = ["--url", url, "--rates", "inf", "20", "--num-requests", "4", "--max-tokens", "4",
                     "--warmup", "1", "--prompts", str(prompts), "--no-save", "--label", "test"]
        rc = serve_load.main(load_args)
        assert rc == 0
        table = capsys.readouterr().out
        assert "random-tiny-shape-w4a8kv8" in table and " 4/4 " in table
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def test_cli_serve_random_weights_engine_flags(tiny_shape, monkeypatch, capsys):
    """--max-num-batched-tokens, --gpu-memory-utilization and the other engine flags reach
    build_random_engine as one EngineConfig, and the engine it builds runs with them."""
    if missing_server_deps():
        pytest.skip("needs pip install '.[server]'")
    import uvicorn

    from qserve_lite.server import launch

    cfg_path, tok_dir = tiny_shape
    seen = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets=None: seen.setdefault("config", self.config)
    )
    real_build = launch.build_random_engine

    def build(shape, tokenizer, *, config: EngineConfig, **kw):
        seen["engine_config"] = config
        return real_build(shape, tokenizer, config=config, **kw)

    monkeypatch.setattr(launch, "build_random_engine", build)
    argv = ["serve", "--random-weights", str(cfg_path), "--tokenizer", str(tok_dir), "--device", "cpu",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "200", "--gpu-memory-utilization", "0.25",
            "--max-model-len", "128", "--seed", "3", "--port", "0"]
    assert cli_main(argv) == 0
    assert seen["engine_config"] == EngineConfig(
        device="cpu", max_num_seqs=4, max_num_batched_tokens=200, max_model_len=128,
        gpu_memory_utilization=0.25, seed=3, cuda_graphs=seen["engine_config"].cuda_graphs,
    )
    engine = seen["config"].app.state.server.engine.engine
    assert engine.scheduler.max_num_batched_tokens == 200 and engine.scheduler.max_num_seqs == 4
    assert engine.max_model_len == 128 and engine.runner.max_tokens == 200
    assert "max_model_len 128" in capsys.readouterr().out


def test_cli_serve_flags_that_need_random_weights(capsys):
    if missing_server_deps():
        pytest.skip("needs pip install '.[server]'")
    assert cli_main(["serve", "--tokenizer", "x"]) == 2
    assert "go with --random-weights" in capsys.readouterr().err


@pytest.mark.gpu
def test_random_engine_on_the_gpu(tiny_shape):
    from conftest import cupy_or_skip

    cupy_or_skip()
    cfg_path, tok_dir = tiny_shape
    built = build_random_engine(
        cfg_path, tok_dir, config=EngineConfig(device="gpu", max_num_seqs=4, num_pages=16)
    )
    engine = built.engine
    assert built.device == "gpu" and engine.runner.cuda_graphs and engine.block_manager.num_pages == 16
    for prompt in ("The capital of France is", "Count to three."):
        engine.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    done = []
    while engine.has_unfinished():
        done += [o for o in engine.step() if o.finished]
    assert len(done) == 2 and all(len(o.outputs[0].token_ids) == 8 and o.outputs[0].text for o in done)
