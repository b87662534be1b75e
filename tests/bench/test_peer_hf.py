"""benchmarks/peer_hf.py: argument parsing and config resolution (the GPU run itself is not tested here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from qserve_lite.io.shipped_configs import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def peer(tmp_path, monkeypatch):
    """The benchmark module (results pointed at a temporary folder)."""
    torch_loaded = "torch" in sys.modules
    spec = importlib.util.spec_from_file_location("peer_hf", ROOT / "benchmarks" / "peer_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert torch_loaded or "torch" not in sys.modules  # importing the benchmark must not import torch
    monkeypatch.setattr(module, "ROOT", tmp_path)
    return module


def test_defaults_and_shipped_name(peer):
    """A shipped name resolves to the config the CLI uses (qserve_lite/io/configs)."""
    args = peer.parse_args(["--model", "llama-3-8b"])
    assert args.batch == [64, 128, 256] and args.prompt_len == 1024 and args.gen == 512
    assert args.attn == "sdpa" and args.config == CONFIG_DIR / "llama-3-8b.json" and args.name == "llama-3-8b"
    args = peer.parse_args(["--model", "llama-3-8b", "--batch", "8", "16", "--gen", "32", "--no-save"])
    assert args.batch == [8, 16] and args.gen == 32 and args.no_save


def test_config_paths(peer, tmp_path):
    model_dir = tmp_path / "some-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(tiny_config()))
    assert peer.resolve_config(str(model_dir)) == model_dir / "config.json"
    assert peer.resolve_config(str(model_dir / "config.json")) == model_dir / "config.json"
    assert peer.parse_args(["--model", str(model_dir)]).name == "some-model"


def test_unknown_model_names_the_shipped_ones(peer):
    with pytest.raises(SystemExit) as exc:
        peer.parse_args(["--model", "no-such-model"])
    assert "no-such-model" in str(exc.value.code) and "llama-3-8b" in str(exc.value.code)


def test_bad_sizes_are_refused(peer):
    with pytest.raises(SystemExit):
        peer.parse_args(["--model", "llama-3-8b", "--batch", "0"])


def test_hf_config_from_a_config_json(peer, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg_json = tiny_config(quantization_config={"quant_method": "qoq", "w_bit": 4})
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    cfg = peer.load_hf_config(peer.resolve_config(str(tmp_path)))
    assert cfg.model_type == "llama" and cfg.hidden_size == 48 and cfg.head_dim == 12
    assert getattr(cfg, "quantization_config", None) is None
