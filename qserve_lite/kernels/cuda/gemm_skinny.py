"""Launcher of cuda/gemm_skinny.cu: the W4 GEMM of decode (M <= 16 tokens), with its tile and split-K
heuristics. Reached through gemm.gemm (which checks the arguments and routes W4 with M <= SKINNY_MAX_M here)
unless a caller names a SkinnyConfig."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qserve_lite.kernels.cuda.args import ptr_or_null
from qserve_lite.kernels.cuda.device import sm_count
from qserve_lite.kernels.cuda.jit import get_kernel
from qserve_lite.kernels.cuda.workspace import gemm_workspace

SKINNY_MAX_M = 16


@dataclass(frozen=True)
class SkinnyConfig:
    """cuda/gemm_skinny.cu: cb 32-channel blocks per block, kw warps along K for each, depth chunks of 128
    k per warp and round (double-buffered)."""

    cb: int = 1
    kw: int = 8
    depth: int = 2

    @property
    def threads(self) -> int:
        return 32 * self.cb * self.kw


SKINNY_SMEM_MAX = 200 * 1024


def _skinny_smem(cfg: SkinnyConfig, mpad: int, chunks_per_split: int) -> int:
    return max(chunks_per_split * mpad * 128, cfg.kw * cfg.cb * (8 * mpad // 8) * 32 * 4)


def choose_skinny(m: int, n: int, k_pad: int) -> SkinnyConfig:
    """Skinny tile from --tune on an H100 and an H200: wider blocks (fewer activation re-reads) for wide
    layers and for 9-16 tokens on long or wide rows; otherwise 16 warps along K, the most weight bytes in
    flight per block."""
    if n >= 16384:
        return SkinnyConfig(1, 8, 2) if m <= 8 else SkinnyConfig(4, 4, 2)
    if m > 8 and (k_pad > 8192 or n > 4096):
        return SkinnyConfig(2, 8, 2)
    return SkinnyConfig(1, 16, 1)


def skinny_splits(cfg: SkinnyConfig, m: int, n: int, k_pad: int) -> int:
    """Split K across blocks when the channel blocks alone leave SMs idle, or the staged activations of a
    split would not fit in shared memory."""
    blocks = -(-n // (32 * cfg.cb))
    chunks = -(-k_pad // 128)
    mpad = 8 if m <= 8 else 16
    need = -(-chunks * mpad * 128 // SKINNY_SMEM_MAX)
    want = 1 if blocks >= 0.7 * sm_count() else round(sm_count() / blocks)
    return int(max(need, min(want, max(1, chunks // cfg.kw), 8)))


def gemm_skinny(mode_id, q_x, w, n, kw, lda, out, cfg, splits, s2_scales, s2_zeros, w_scales, w_szeros,
                x_scales, x_sums, bias):
    """Runs qs_gemm_skinny (mode_id 0 or 1) on arguments gemm.gemm has already checked and converted."""
    m, k = q_x.shape
    if m > SKINNY_MAX_M:
        raise ValueError(f"the skinny W4 GEMM handles at most {SKINNY_MAX_M} tokens, got {m}")
    aligned = lda % 16 == 0 and k % 16 == 0 and q_x.data.ptr % 16 == 0
    nj = 1 if m <= 8 else 2
    mpad = 8 * nj
    defines = {"QS_MODE": mode_id, "QS_SK_NJ": nj, "QS_SK_CB": cfg.cb, "QS_SK_KW": cfg.kw,
               "QS_SK_DEPTH": cfg.depth, "QS_ALIGNED": int(aligned)}
    chunks = -(-(kw // 32) // 4)
    nsplit = splits if splits is not None else skinny_splits(cfg, m, n, kw)
    nsplit = max(nsplit, -(-chunks * mpad * 128 // SKINNY_SMEM_MAX))
    per_split = -(-chunks // nsplit)
    nsplit = -(-chunks // per_split)
    smem = _skinny_smem(cfg, mpad, per_split)
    kern = get_kernel("gemm_skinny.cu", "qs_gemm_skinny", defines, dynamic_smem=smem)
    blocks = -(-n // (32 * cfg.cb))
    elems = cfg.cb * 2 * nj * 4 * 32
    ws, counters = gemm_workspace.get(blocks * nsplit * elems, blocks) if nsplit > 1 else (None, None)
    args = (q_x, np.int64(lda), w, ptr_or_null(s2_scales), ptr_or_null(s2_zeros), w_scales,
            ptr_or_null(w_szeros), x_scales, ptr_or_null(x_sums), ptr_or_null(bias), out,
            np.int64(out.strides[0] // out.itemsize if m > 1 else n), np.int32(m), np.int32(n), np.int32(k),
            np.int32(kw), ptr_or_null(ws), ptr_or_null(counters), np.int32(per_split))
    kern((blocks, nsplit), (cfg.threads,), args, shared_mem=smem)
    return out
