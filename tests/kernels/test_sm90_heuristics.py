"""The Hopper GEMM's host-side choices (kernels/cuda/gemm_sm90.py), without a GPU: shared-memory fit of every
tile, the tile rules, and the split-K model."""

from __future__ import annotations

import pytest

import qserve_lite.kernels.cuda.gemm_sm90 as g

LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.fixture(autouse=True)
def h200(monkeypatch):
    monkeypatch.setattr(g, "sm_count", lambda: 132)


@pytest.mark.parametrize("name", sorted(g.SM90_CONFIGS))
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_every_tile_fits_shared_memory(name, mode):
    cfg = g.SM90_CONFIGS[name]
    stages = cfg.stages_for(mode)
    assert (3 if cfg.minb == 1 else 2) <= stages <= cfg.stages
    assert cfg.smem_bytes(mode, stages) <= cfg.smem_limit <= g.SMEM_MAX
    assert cfg.minb * (cfg.smem_bytes(mode, stages) + 1024) <= g.SMEM_SM  # the blocks fit on one SM
    if stages < cfg.stages:  # trimmed only because one more stage would not fit
        assert cfg.smem_bytes(mode, stages + 1) > cfg.smem_limit
    assert cfg.defines(mode)["QS_STAGES"] == stages and cfg.threads == 128 * (cfg.nwg + 1)


def test_tile_rules():
    pick = g.choose_sm90
    assert pick(1, 8, 6144, 4096).bm == 16
    assert (pick(1, 64, 4096, 4096).bm, pick(1, 64, 4096, 4096).bn) == (64, 128)
    assert (pick(1, 64, 28672, 4096).bm, pick(1, 64, 28672, 4096).bn) == (64, 256)
    qkv256 = pick(1, 256, 6144, 4096)
    assert (qkv256.bm, qkv256.bn, qkv256.kwg) == (128, 128, 2)  # both warpgroups on one tile
    assert pick(1, 256, 4096, 14336).kwg == 2  # long K
    assert (pick(1, 256, 4096, 4096).bm, pick(1, 256, 4096, 4096).bn) == (64, 128)
    for n, k in LLAMA3_8B.values():
        c = pick(1, 4096, n, k)
        assert (c.bm, c.bn, c.minb) == ((128, 128, 2) if n >= 16384 else (128, 256, 1))
        assert pick(1, 1000, n, k).bm >= 64  # no token tile is taller than needed, none far too short


def test_no_split_when_the_tiles_fill_the_gpu():
    for n, k in LLAMA3_8B.values():
        cfg = g.choose_sm90(1, 4096, n, k)
        assert g.sm90_splits(cfg, 4096, n, k) == 1


def test_split_k_for_few_tiles_and_long_k():
    """down (K = 14336) at 64 tokens has 32 tiles of 64 x 128 on 132 SMs: split, each split keeping stages;
    no split leaves more than one round of units, and a split never exceeds the stage count."""
    cfg = g.SM90_CONFIGS["h64x128"]
    ns = g.sm90_splits(cfg, 64, 4096, 14336)
    assert 2 <= ns <= 8
    assert 32 * ns <= 132
    tiny_k = g.sm90_splits(cfg, 64, 4096, 256)  # 2 stages of K
    assert tiny_k <= 2


def test_partial_traffic_discourages_splitting_big_tiles():
    """A 128 x 256 tile's int32 partials (128 KB) cost 4 stages each: at 256 tokens of qkv (48 tiles), the
    model splits at most in two, where the sweep measured 2-8 splits as slower than 2."""
    cfg = g.SM90_CONFIGS["h128x256"]
    assert g.sm90_splits(cfg, 256, 6144, 4096) <= 2
