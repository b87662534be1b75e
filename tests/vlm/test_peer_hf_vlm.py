"""benchmarks/peer_hf_vlm.py on the CPU: importing it needs no torch, and its arguments resolve our VILA
shapes (the GPU run itself is a device benchmark)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_peer_arguments(tmp_path):
    torch_loaded = "torch" in sys.modules
    spec = importlib.util.spec_from_file_location("peer_hf_vlm", ROOT / "benchmarks" / "peer_hf_vlm.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    assert torch_loaded or "torch" not in sys.modules
    args = peer.parse_args([])
    assert args.name == "vila1.5-13b" and args.batch == [32, 64, 128] and args.gen == 300
    assert args.config["llm_cfg"]["hidden_size"] == 5120
    assert args.config["vision_tower_cfg"]["image_size"] == 384
    args = peer.parse_args(["--vlm", "vila1.5-8b", "--batch", "4", "--gen", "7", "--no-save"])
    assert args.config["llm_cfg"]["vocab_size"] == 128256 and args.batch == [4] and args.no_save
    with pytest.raises(SystemExit):
        peer.parse_args(["--vlm", "nope"])
    with pytest.raises(SystemExit):
        peer.parse_args(["--gen", "0"])
