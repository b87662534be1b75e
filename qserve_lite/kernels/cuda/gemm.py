"""Launcher of cuda/gemm.cu, the tensor-core GEMM of every device linear (W4A8 per-channel and g128, W8A8,
fp16), with its tile and split-K heuristics: `gemm()` checks the arguments, picks a GemmConfig
(`choose_config`, `choose_splits`) and launches; W4 with M <= 16 tokens goes to the skinny kernel
(gemm_skinny.py, cuda/gemm_skinny.cu) and, on Hopper, the other int8 GEMMs to the TMA + wgmma kernel
(gemm_sm90.py, cuda/gemm_sm90.cu), unless `config` names a GemmConfig.

Public entry points over CuPy arrays: kernels/linear.py (one device linear), kernels/w4a8_gemm.py,
kernels/w8a8_gemm.py and kernels/fp16_gemm.py, which dispatch here when given CuPy arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import aligned16, c_rows, ptr_or_null, vector
from qserve_lite.kernels.cuda.blas import fp16_matmul_cublas, stream_is_capturing
from qserve_lite.kernels.cuda.device import sm_count, wgmma_available
from qserve_lite.kernels.cuda.gemm_skinny import SKINNY_MAX_M, SkinnyConfig, choose_skinny, gemm_skinny
from qserve_lite.kernels.cuda.gemm_sm90 import Sm90Config, choose_sm90, gemm_sm90, sm90_supported
from qserve_lite.kernels.cuda.jit import get_sized_kernel
from qserve_lite.kernels.cuda.workspace import gemm_workspace

MODES = {"w4_per_channel": 0, "w4_g128": 1, "w8": 2, "f16": 3}
# The Hopper kernel (cuda/gemm_sm90.cu) serves the int8 modes on sm_90 unless QSERVE_LITE_SM90_GEMM=0 (a
# measuring switch: before/after comparisons in one process tree).
USE_SM90 = os.environ.get("QSERVE_LITE_SM90_GEMM", "1") != "0"
# fp16 GEMMs that ask for it (`cublas=True`: the vision tower, which never runs inside a CUDA graph) of at
# least CUBLAS_F16_MIN_M tokens outside graph capture go to cuBLAS (cuda/blas.py) unless
# QSERVE_LITE_CUBLAS_F16=0. Not the default: a step whose eager warm-up ran cuBLAS would first load our kernel
# (and its split-K workspace) inside the capture that follows, which CuPy refuses.
USE_CUBLAS_F16 = os.environ.get("QSERVE_LITE_CUBLAS_F16", "1") != "0"
CUBLAS_F16_MIN_M = 256


@dataclass(frozen=True)
class GemmConfig:
    """One tile configuration of cuda/gemm.cu (all sizes as the .cu macros; bk in bytes of K)."""

    bn: int  # output channels per block
    bm: int  # tokens per block
    bk: int  # bytes of K per pipeline stage
    wn: int  # warps along channels
    wm: int  # warps along tokens
    wk: int  # warps along K (in-block split-K)
    stages: int
    splitk: bool  # compile the cross-block split-K path
    minb: int = 1  # minimum resident blocks per SM (caps registers)
    wgmma: bool = False  # Hopper warpgroup MMA (sm_90a, int8 modes only)

    @property
    def threads(self) -> int:
        return 32 * self.wn * self.wm * self.wk

    def smem_bytes(self, mode: int, out_f32: bool = False) -> int:
        """Approximate dynamic shared memory (the launcher uses the module's own figure)."""
        x_stage = self.bm * self.bk
        w_stage = self.bn * self.bk // 2 if mode in (0, 1) else self.bn * self.bk
        ng = (self.bk // 128 if self.bk >= 128 else 1) if mode == 1 else 0
        align = 1024 if self.wgmma else 16
        stage = -(-(x_stage + w_stage + 2 * ng * self.bn) // align) * align
        red = (self.wk - 1) * self.bn * self.bm * 4
        out_elem = 4 if out_f32 else 2
        out = self.bm * (self.bn + 16 // out_elem) * out_elem
        return max(self.stages * stage, red, out) + (1024 if self.wgmma else 0)

    def defines(self, mode: int, aligned: bool, out_f32: bool = False) -> dict[str, int]:
        return {
            "QS_MODE": mode, "QS_BN": self.bn, "QS_BM": self.bm, "QS_BK": self.bk, "QS_WN": self.wn,
            "QS_WM": self.wm, "QS_WK": self.wk, "QS_STAGES": self.stages, "QS_SPLITK": int(self.splitk),
            "QS_ALIGNED": int(aligned), "QS_OUT_F32": int(out_f32), "QS_MINB": self.minb,
            "QS_WGMMA": int(self.wgmma),
        }


# Decode tiles (few tokens): M <= 16 streams weights through narrow 32-channel blocks whose 8 warps split
# each stage's K (no cross-block reduction needed for real widths); M <= 64 uses 128-channel blocks. Both
# keep two or more blocks per SM resident. Prefill tiles: 2-D warp grids with mma.sync (any sm_80+), or
# Hopper wgmma with the weights in registers.
DECODE_CONFIGS = {
    8: GemmConfig(32, 8, 256, 1, 1, 8, 6, True, minb=4),
    16: GemmConfig(32, 16, 256, 1, 1, 8, 6, True, minb=4),
    32: GemmConfig(128, 32, 128, 4, 1, 2, 4, True, minb=2),
    64: GemmConfig(128, 64, 128, 4, 1, 2, 4, True, minb=2),
}
PREFILL_CONFIGS = {
    "128x128": GemmConfig(128, 128, 128, 2, 4, 1, 3, False, minb=2),
    "256x128": GemmConfig(256, 128, 64, 4, 2, 1, 4, False),
}
WGMMA_CONFIGS = {
    "wg128x64": GemmConfig(128, 64, 128, 4, 1, 1, 4, True, wgmma=True),
    "wg256x64": GemmConfig(256, 64, 128, 8, 1, 1, 4, True, wgmma=True),
    "wg128x128": GemmConfig(128, 128, 128, 4, 1, 1, 4, True, wgmma=True),
    "wg256x128": GemmConfig(256, 128, 128, 8, 1, 1, 4, False, wgmma=True),
}
NAMED_CONFIGS = {f"decode{k}": v for k, v in DECODE_CONFIGS.items()} | PREFILL_CONFIGS | WGMMA_CONFIGS
# Alternatives the benchmark's --tune times against the heuristic (g128 mode only).
TUNE_CONFIGS = {
    "n64_16": GemmConfig(64, 16, 256, 2, 1, 4, 4, True, minb=3),
    "n128_8": GemmConfig(128, 8, 256, 4, 1, 2, 4, True),
    "n32_16k128": GemmConfig(32, 16, 128, 1, 1, 4, 8, True, minb=4),
    "n128_64k256": GemmConfig(128, 64, 256, 4, 1, 2, 3, True),
    "n128_64w2": GemmConfig(128, 64, 128, 2, 2, 1, 4, True, minb=2),
}


def choose_config(mode: int, m: int, n: int, kbytes: int) -> GemmConfig:
    """Heuristic tile choice, from benchmarks/kernels.py --tune on an H100 and an H200 (2026-11-21)."""
    if mode != 3 and m > 16 and wgmma_available():
        wide = n >= 16384
        if m <= 64:
            return WGMMA_CONFIGS["wg256x64" if wide else "wg128x64"]
        if m <= 512 and wide:
            return WGMMA_CONFIGS["wg256x128"]
        return WGMMA_CONFIGS["wg128x64" if m <= 128 else "wg128x128"]
    for bm, cfg in DECODE_CONFIGS.items():
        if m <= bm:
            return cfg
    if m <= 128:
        return DECODE_CONFIGS[64]
    return PREFILL_CONFIGS["128x128"]


def choose_splits(cfg: GemmConfig, mode: int, m: int, n: int, kbytes: int, out_f32: bool = False) -> int:
    """Cross-block split-K factor: split only when the tiles leave a quarter of the SMs idle; then aim for
    about 1.5 blocks per SM, each split keeping at least 2 stages (measured with --tune)."""
    if not cfg.splitk:
        return 1
    tiles = -(-n // cfg.bn) * -(-m // cfg.bm)
    stages = -(-kbytes // cfg.bk)
    if tiles >= 0.75 * sm_count():
        return 1
    return int(max(1, min(stages // 2, round(1.5 * sm_count() / tiles), 16)))


def _gemm_kernel(mode: int, cfg: GemmConfig, aligned: bool, out_f32: bool):
    """(kernel, dynamic shared memory bytes) of one configuration; the module states its own smem size."""
    return get_sized_kernel("gemm.cu", "qs_gemm", cfg.defines(mode, aligned, out_f32), cfg.threads)


def _output(out, m: int, n: int, out_f32: bool, cupy):
    """The output [m, n] (float32 if `out_f32` else float16): `out` checked (contiguous rows), or new."""
    out_dtype = cupy.float32 if out_f32 else cupy.float16
    if out is None:
        return cupy.empty((m, n), dtype=out_dtype)
    if out.shape != (m, n) or out.dtype != out_dtype or out.strides[1] != out.itemsize:
        raise ValueError(f"out: expected {(m, n)} {np.dtype(out_dtype)} with contiguous rows")
    return out


def _check_operands(mode: str, mode_id: int, q_x, w, n: int, kw: int, cupy) -> None:
    """The activations' and weight's dtype (fp16 or int8 by mode) and the weight's shape (W4: packed)."""
    want = cupy.float16 if mode_id == 3 else cupy.int8
    if q_x.dtype != want or w.dtype != want:
        raise ValueError(f"{mode}: expected {np.dtype(want)} activations and weights, "
                         f"got {q_x.dtype}, {w.dtype}")
    w_shape = (n, kw // 2) if mode_id in (0, 1) else (n, kw)
    if w.shape != w_shape:
        raise ValueError(f"{mode}: expected a weight of shape {w_shape}, got {w.shape}")


def _check_w4_layout(mode_id: int, w, n: int, kw: int) -> None:
    """The packed W4 weight: n % 32 == 0, K_pad % 32 (g128: 128) == 0, contiguous and 16-byte aligned."""
    if n % 32 or kw % (128 if mode_id == 1 else 32) or not w.flags.c_contiguous or not aligned16(w):
        raise ValueError(f"packed W4 weight: need n % 32 == 0, K_pad % 32 (g128: 128) == 0 and a "
                         f"contiguous 16-byte aligned array, got n={n}, K_pad={kw}")


def _operand_layout(mode_id: int, q_x, w, m: int, n: int, kw: int, kx_bytes: int, kw_bytes: int):
    """(w, lda, ldw, aligned): the weight (int8 / fp16 modes: with contiguous rows), the row strides in
    bytes (ldw 0 for the packed W4 weight, whose layout is checked) and whether every row is 16-byte
    aligned (the kernel's vector-load path)."""
    lda = q_x.strides[0] if m > 1 else kx_bytes
    ldw = 0
    aligned = lda % 16 == 0 and kx_bytes % 16 == 0 and aligned16(q_x)
    if mode_id in (0, 1):
        _check_w4_layout(mode_id, w, n, kw)
    else:
        w = c_rows(w, "weight")
        ldw = w.strides[0] if n > 1 else kw_bytes
        aligned = aligned and ldw % 16 == 0 and kw_bytes % 16 == 0 and aligned16(w)
    return w, lda, ldw, aligned


def _g128_group_scales(s2_scales, s2_zeros, n: int, kw: int, cupy):
    """g128 mode's level-2 (s2_scales, s2_zeros), contiguous, each [K_pad / 128, n]."""
    s2_scales = cupy.ascontiguousarray(s2_scales)
    s2_zeros = cupy.ascontiguousarray(s2_zeros)
    if s2_scales.shape != (kw // 128, n) or s2_zeros.shape != s2_scales.shape:
        raise ValueError(f"s2_scales / s2_zeros: expected {(kw // 128, n)}, got {s2_scales.shape}, "
                         f"{s2_zeros.shape}")
    return s2_scales, s2_zeros


def _epilogue_vectors(mode_id: int, m: int, n: int, x_scales, w_scales, x_sums, w_szeros, bias, cupy):
    """(x_scales, w_scales, x_sums, w_szeros, bias) as the mode's epilogue reads them: contiguous
    vectors of their length and dtype (int8 modes: the scales; per-channel W4: the sums and szeros)."""
    if mode_id != 3:
        x_scales = vector(x_scales, m, cupy.float16, "x_scales")
        w_scales = vector(w_scales, n, cupy.float16, "weight scales")
    if mode_id == 0:
        x_sums = vector(x_sums, m, cupy.float32, "x_sums")
        w_szeros = vector(w_szeros, n, cupy.float16, "s1_szeros")
    if bias is not None:
        bias = vector(bias, n, cupy.float16, "bias")
    return x_scales, w_scales, x_sums, w_szeros, bias


def _cublas_f16(mode_id: int, config, m: int, cublas: bool) -> bool:
    """The fp16 GEMM goes to cuBLAS: asked for, large enough, no configuration named, not inside capture."""
    return (cublas and mode_id == 3 and config is None and USE_CUBLAS_F16 and m >= CUBLAS_F16_MIN_M
            and not stream_is_capturing())


def gemm(mode: str, q_x, w, n: int, kw: int, *, x_scales=None, x_sums=None, w_scales=None, w_szeros=None,
         s2_scales=None, s2_zeros=None, bias=None, out_f32: bool = False, config=None,
         splits: int | None = None, out=None, cublas: bool = False):
    """Y [M, n] = epilogue(q_x [M, K] . W^T) on the GPU; see cuda/gemm.cu for the modes and epilogues.

    `kw` is W's K (int8 / fp16 elements; W4: K_pad of the packed weight), K <= kw (the rest is zero).
    W4 with M <= 16 runs cuda/gemm_skinny.cu unless `config` names a GemmConfig; `cublas`: an fp16 GEMM
    outside any CUDA graph may run on cuBLAS (see USE_CUBLAS_F16)."""
    cupy = import_cupy()
    mode_id = MODES[mode]
    elem = 2 if mode_id == 3 else 1
    q_x = c_rows(q_x, "activations")
    m, k = q_x.shape
    if k > kw:
        raise ValueError(f"activations have {k} input features, the weight only {kw}")
    out = _output(out, m, n, out_f32, cupy)
    if m == 0 or n == 0:
        return out
    if kw == 0:
        out[...] = 0
        return out
    _check_operands(mode, mode_id, q_x, w, n, kw, cupy)
    kx_bytes, kw_bytes = k * elem, kw * elem
    w, lda, ldw, aligned = _operand_layout(mode_id, q_x, w, m, n, kw, kx_bytes, kw_bytes)
    if mode_id == 1:
        s2_scales, s2_zeros = _g128_group_scales(s2_scales, s2_zeros, n, kw, cupy)
    x_scales, w_scales, x_sums, w_szeros, bias = _epilogue_vectors(
        mode_id, m, n, x_scales, w_scales, x_sums, w_szeros, bias, cupy)

    if _cublas_f16(mode_id, config, m, cublas):
        return fp16_matmul_cublas(q_x, lda // 2, w, ldw // 2, k, out, bias)
    if mode_id in (0, 1) and (isinstance(config, SkinnyConfig) or (config is None and m <= SKINNY_MAX_M)):
        return gemm_skinny(mode_id, q_x, w, n, kw, lda, out, config or choose_skinny(m, n, kw), splits,
                           s2_scales, s2_zeros, w_scales, w_szeros, x_scales, x_sums, bias)
    sm90_ok = wgmma_available() and sm90_supported(mode_id, m, n, lda, q_x.data.ptr, w.data.ptr, ldw)
    if isinstance(config, Sm90Config) or (config is None and USE_SM90 and sm90_ok):
        if not sm90_ok:
            raise ValueError(f"{config} needs a Hopper GPU, an int8 mode and 16-byte aligned operands")
        cfg90 = config or choose_sm90(mode_id, m, n, kw)
        return gemm_sm90(mode_id, q_x, lda, w, ldw, n, kw, kx_bytes, out, cfg90, splits, s2_scales, s2_zeros,
                         w_scales, w_szeros, x_scales, x_sums, bias)
    cfg = config or choose_config(mode_id, m, n, kw_bytes)
    if cfg.wgmma and (mode_id == 3 or not wgmma_available()):
        raise ValueError(f"{cfg} needs a Hopper GPU and an int8 mode")
    nsplit = splits if splits is not None else choose_splits(cfg, mode_id, m, n, kw_bytes, out_f32)
    vectors = (s2_scales, s2_zeros, w_scales, w_szeros, x_scales, x_sums, bias)
    return _launch_mma(mode, mode_id, cfg, nsplit, aligned, out_f32, q_x, lda, w, ldw, n, k, kx_bytes,
                       kw_bytes, vectors, out)


def _launch_mma(mode: str, mode_id: int, cfg, nsplit: int, aligned: bool, out_f32: bool, q_x, lda: int, w,
                ldw: int, n: int, k: int, kx_bytes: int, kw_bytes: int, vectors: tuple, out):
    """cuda/gemm.cu's qs_gemm (mma.sync / sm_90 wgmma tiles) on checked operands."""
    s2_scales, s2_zeros, w_scales, w_szeros, x_scales, x_sums, bias = vectors
    m = q_x.shape[0]
    if not cfg.splitk:
        nsplit = 1
    total_stages = -(-kw_bytes // cfg.bk)
    per_split = -(-total_stages // max(1, nsplit))
    nsplit = -(-total_stages // per_split)
    grid = (-(-n // cfg.bn), -(-m // cfg.bm), nsplit)
    kern, smem = _gemm_kernel(mode_id, cfg, aligned, out_f32)
    if nsplit > 1:
        ws, counters = gemm_workspace.get(grid[0] * grid[1] * nsplit * cfg.bn * cfg.bm, grid[0] * grid[1])
    else:
        ws, counters = None, None
    args = (
        q_x, np.int64(lda), w, np.int64(ldw), ptr_or_null(s2_scales), ptr_or_null(s2_zeros),
        ptr_or_null(w_scales), ptr_or_null(w_szeros), ptr_or_null(x_scales), ptr_or_null(x_sums),
        ptr_or_null(bias), out, np.int64(out.strides[0] // out.itemsize if m > 1 else n),
        np.int32(m), np.int32(n), np.int32(kx_bytes), np.int32(kw_bytes),
        ptr_or_null(ws), ptr_or_null(counters), np.int32(per_split),
    )
    try:
        kern(grid, (cfg.threads,), args, shared_mem=smem)
    except Exception as e:
        raise RuntimeError(f"qs_gemm launch failed: mode {mode}, {cfg}, aligned={aligned}, grid {grid}, "
                           f"{smem} B shared memory, M={m} N={n} K={k}: {e}") from e
    return out
