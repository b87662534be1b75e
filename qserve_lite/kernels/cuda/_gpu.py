"""Launchers of the CUDA kernels (qserve_lite/kernels/cuda/*.cu) over CuPy arrays: tile selection, split-K
workspaces, argument checks. Imported lazily by the ops modules, only for CuPy inputs; the public entry
points are the functions of kernels/act_quant.py, kernels/norm_quant.py, kernels/w4a8_gemm.py, kernels/w8a8_gemm.py and
kernels/fp16_gemm.py, which dispatch here when given CuPy arrays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from qserve_lite.kernels.cuda.jit import get_kernel, load_module, read_global_int

MODES = {"w4_per_channel": 0, "w4_g128": 1, "w8": 2, "f16": 3}
NULL = np.uint64(0)


def cupy_module():
    import cupy

    return cupy


def is_cupy(xp) -> bool:
    return getattr(xp, "__name__", "") == "cupy"


def _ptr_or_null(a):
    return NULL if a is None else a


def _aligned16(a) -> bool:
    return a.data.ptr % 16 == 0


def _device_props() -> dict:
    cupy = cupy_module()
    dev = cupy.cuda.Device()
    with _lock:
        props = _props.get(dev.id)
        if props is None:
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            _props[dev.id] = props
    return props


_lock = threading.Lock()
_props: dict[int, dict] = {}


def sm_count() -> int:
    return int(_device_props()["multiProcessorCount"])


def _smem_per_sm() -> int:
    return int(_device_props().get("sharedMemPerMultiprocessor", 228 * 1024))


# ---- GEMM tiles ----

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


def wgmma_available() -> bool:
    """Hopper (sm_90a) tensor-core path available on the current device."""
    return int(cupy_module().cuda.Device().compute_capability) == 90


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


class Workspace:
    """Split-K partials and arrival counters, one set per (device, stream), each grown on demand (to at least
    the given minimum sizes). The counters are zeroed once: each kernel call's last block resets its own."""

    def __init__(self, dtype: str, min_elems: int, min_counters: int):
        self.dtype, self.min_elems, self.min_counters = dtype, min_elems, min_counters
        self.lock = threading.Lock()
        self.bufs: dict[tuple[int, int], tuple] = {}

    def get(self, elems: int, counters_needed: int):
        cupy = cupy_module()
        key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
        with self.lock:
            part, counters = self.bufs.get(key, (None, None))
            if part is None or part.size < elems:
                part = cupy.empty(max(elems, self.min_elems), dtype=self.dtype)
            if counters is None or counters.size < counters_needed:
                counters = cupy.zeros(max(counters_needed, self.min_counters), dtype=cupy.int32)
            self.bufs[key] = (part, counters)
            return part, counters


_workspace = Workspace("int32", 1 << 16, 1024)  # GEMM split-K: int32 partial sums


def _gemm_kernel(mode: int, cfg: GemmConfig, aligned: bool, out_f32: bool):
    """(kernel, dynamic shared memory bytes) of one configuration; the module states its own smem size."""
    defines = cfg.defines(mode, aligned, out_f32)
    key = tuple(sorted(defines.items()))
    smem = _smem_of.get(key)
    if smem is None:
        smem = read_global_int("gemm.cu", "qs_gemm_smem_bytes", defines)
        threads = read_global_int("gemm.cu", "qs_gemm_threads", defines)
        assert threads == cfg.threads, (cfg, threads)
        _smem_of[key] = smem
    return get_kernel("gemm.cu", "qs_gemm", defines, dynamic_smem=smem), smem


_smem_of: dict[tuple, int] = {}


def _c_rows(a, name: str):
    """2-D with unit stride along the last axis (row stride free)."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize):
        raise ValueError(f"{name}: expected a 2-D array with contiguous rows, got shape {a.shape} "
                         f"strides {a.strides}")
    return a


def _vec(a, n: int, dtype, name: str):
    cupy = cupy_module()
    a = cupy.ascontiguousarray(cupy.asarray(a), dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {a.shape}")
    return a


def gemm(mode: str, q_x, w, n: int, kw: int, *, x_scales=None, x_sums=None, w_scales=None, w_szeros=None,
         s2_scales=None, s2_zeros=None, bias=None, out_f32: bool = False, config=None,
         splits: int | None = None, out=None):
    """Y [M, n] = epilogue(q_x [M, K] . W^T) on the GPU; see cuda/gemm.cu for the modes and epilogues.

    `kw` is W's K (int8 / fp16 elements; W4: K_pad of the packed weight), K <= kw (the rest is zero).
    W4 with M <= 16 runs cuda/gemm_skinny.cu unless `config` names a GemmConfig."""
    cupy = cupy_module()
    mode_id = MODES[mode]
    elem = 2 if mode_id == 3 else 1
    q_x = _c_rows(q_x, "activations")
    m, k = q_x.shape
    if k > kw:
        raise ValueError(f"activations have {k} input features, the weight only {kw}")
    out_dtype = cupy.float32 if out_f32 else cupy.float16
    if out is None:
        out = cupy.empty((m, n), dtype=out_dtype)
    elif out.shape != (m, n) or out.dtype != out_dtype or out.strides[1] != out.itemsize:
        raise ValueError(f"out: expected {(m, n)} {np.dtype(out_dtype)} with contiguous rows")
    if m == 0 or n == 0:
        return out
    if kw == 0:
        out[...] = 0
        return out
    want = cupy.float16 if mode_id == 3 else cupy.int8
    if q_x.dtype != want or w.dtype != want:
        raise ValueError(f"{mode}: expected {np.dtype(want)} activations and weights, "
                         f"got {q_x.dtype}, {w.dtype}")
    w_shape = (n, kw // 2) if mode_id in (0, 1) else (n, kw)
    if w.shape != w_shape:
        raise ValueError(f"{mode}: expected a weight of shape {w_shape}, got {w.shape}")
    kx_bytes, kw_bytes = k * elem, kw * elem
    lda = q_x.strides[0] if m > 1 else kx_bytes
    ldw = 0
    aligned = lda % 16 == 0 and kx_bytes % 16 == 0 and _aligned16(q_x)
    if mode_id in (0, 1):
        if n % 32 or kw % (128 if mode_id == 1 else 32) or not w.flags.c_contiguous or not _aligned16(w):
            raise ValueError(f"packed W4 weight: need n % 32 == 0, K_pad % 32 (g128: 128) == 0 and a "
                             f"contiguous 16-byte aligned array, got n={n}, K_pad={kw}")
    else:
        w = _c_rows(w, "weight")
        ldw = w.strides[0] if n > 1 else kw_bytes
        aligned = aligned and ldw % 16 == 0 and kw_bytes % 16 == 0 and _aligned16(w)
    if mode_id == 1:
        s2_scales = cupy.ascontiguousarray(s2_scales)
        s2_zeros = cupy.ascontiguousarray(s2_zeros)
        if s2_scales.shape != (kw // 128, n) or s2_zeros.shape != s2_scales.shape:
            raise ValueError(f"s2_scales / s2_zeros: expected {(kw // 128, n)}, got {s2_scales.shape}, "
                             f"{s2_zeros.shape}")
    if mode_id != 3:
        x_scales = _vec(x_scales, m, cupy.float16, "x_scales")
        w_scales = _vec(w_scales, n, cupy.float16, "weight scales")
    if mode_id == 0:
        x_sums = _vec(x_sums, m, cupy.float32, "x_sums")
        w_szeros = _vec(w_szeros, n, cupy.float16, "s1_szeros")
    if bias is not None:
        bias = _vec(bias, n, cupy.float16, "bias")

    if mode_id in (0, 1) and (isinstance(config, SkinnyConfig) or (config is None and m <= SKINNY_MAX_M)):
        return _gemm_skinny(mode_id, q_x, w, n, kw, lda, out, config or choose_skinny(m, n, kw), splits,
                            s2_scales, s2_zeros, w_scales, w_szeros, x_scales, x_sums, bias)
    cfg = config or choose_config(mode_id, m, n, kw_bytes)
    if cfg.wgmma and (mode_id == 3 or not wgmma_available()):
        raise ValueError(f"{cfg} needs a Hopper GPU and an int8 mode")
    nsplit = splits if splits is not None else choose_splits(cfg, mode_id, m, n, kw_bytes, out_f32)
    if not cfg.splitk:
        nsplit = 1
    total_stages = -(-kw_bytes // cfg.bk)
    per_split = -(-total_stages // max(1, nsplit))
    nsplit = -(-total_stages // per_split)
    grid = (-(-n // cfg.bn), -(-m // cfg.bm), nsplit)
    kern, smem = _gemm_kernel(mode_id, cfg, aligned, out_f32)
    if nsplit > 1:
        ws, counters = _workspace.get(grid[0] * grid[1] * nsplit * cfg.bn * cfg.bm, grid[0] * grid[1])
    else:
        ws, counters = None, None
    args = (
        q_x, np.int64(lda), w, np.int64(ldw), _ptr_or_null(s2_scales), _ptr_or_null(s2_zeros),
        _ptr_or_null(w_scales), _ptr_or_null(w_szeros), _ptr_or_null(x_scales), _ptr_or_null(x_sums),
        _ptr_or_null(bias), out, np.int64(out.strides[0] // out.itemsize if m > 1 else n),
        np.int32(m), np.int32(n), np.int32(kx_bytes), np.int32(kw_bytes),
        _ptr_or_null(ws), _ptr_or_null(counters), np.int32(per_split),
    )
    try:
        kern(grid, (cfg.threads,), args, shared_mem=smem)
    except Exception as e:
        raise RuntimeError(f"qs_gemm launch failed: mode {mode}, {cfg}, aligned={aligned}, grid {grid}, "
                           f"{smem} B shared memory, M={m} N={n} K={k}: {e}") from e
    return out


# ---- skinny W4 GEMM (decode, M <= 16) ----

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


def _gemm_skinny(mode_id, q_x, w, n, kw, lda, out, cfg, splits, s2_scales, s2_zeros, w_scales, w_szeros,
                 x_scales, x_sums, bias):
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
    ws, counters = _workspace.get(blocks * nsplit * elems, blocks) if nsplit > 1 else (None, None)
    args = (q_x, np.int64(lda), w, _ptr_or_null(s2_scales), _ptr_or_null(s2_zeros), w_scales,
            _ptr_or_null(w_szeros), x_scales, _ptr_or_null(x_sums), _ptr_or_null(bias), out,
            np.int64(out.strides[0] // out.itemsize if m > 1 else n), np.int32(m), np.int32(n), np.int32(k),
            np.int32(kw), _ptr_or_null(ws), _ptr_or_null(counters), np.int32(per_split))
    kern((blocks, nsplit), (cfg.threads,), args, shared_mem=smem)
    return out


# ---- dequantize-once + cuBLAS INT8 path ----

def w4_to_int8(qweight, s2_scales=None, s2_zeros=None):
    """Packed W4 [n, K/2] -> row-major int8 [n, K]: codes (per-channel) or level-1 weights (g128)."""
    cupy = cupy_module()
    qweight = cupy.ascontiguousarray(qweight)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % 32 or k % 32:
        raise ValueError(f"packed W4 weight: n and K must be multiples of 32, got {n}, {k}")
    out = cupy.empty((n, k), dtype=cupy.int8)
    lanes = n * k // 32
    kern = get_kernel("gemm.cu", "qs_w4_to_int8")
    if s2_scales is not None:
        s2_scales, s2_zeros = cupy.ascontiguousarray(s2_scales), cupy.ascontiguousarray(s2_zeros)
    kern(((lanes + 255) // 256,), (256,), (qweight, _ptr_or_null(s2_scales), _ptr_or_null(s2_zeros), out,
                                          np.int32(n), np.int32(k)))
    return out


def _cublas():
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError:  # pragma: no cover - older CuPy
        from cupy.cuda import cublas
    return cublas


CUDA_R_8I, CUDA_R_32I, CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT = 3, 10, 72, -1
_ONE = np.ones(1, dtype=np.int32)
_ZERO = np.zeros(1, dtype=np.int32)


def int8_matmul_cublas(q_x, w8, out=None):
    """int32 [M, N] = q_x int8 [M, K] . w8 int8 [N, K]^T with cuBLAS gemmEx (tensor cores, exact).

    Not capturable in a CUDA graph (CuPy refuses cuBLAS during capture). K must be a multiple of 4."""
    cupy = cupy_module()
    cublas = _cublas()
    q_x = cupy.ascontiguousarray(q_x)
    w8 = cupy.ascontiguousarray(w8)
    m, k = q_x.shape
    n = w8.shape[0]
    if w8.shape[1] != k or k % 4:
        raise ValueError(f"int8 GEMM: K must match and be a multiple of 4, got {q_x.shape} x {w8.shape}")
    if out is None:
        out = cupy.empty((m, n), dtype=cupy.int32)
    handle = cupy.cuda.device.get_cublas_handle()
    # Row-major Y[M, N] = X W^T is column-major Y^T[N, M] = op(W) X with op = T on W stored [N, K].
    cublas.gemmEx(handle, 1, 0, n, m, k, _ONE.ctypes.data, w8.data.ptr, CUDA_R_8I, k, q_x.data.ptr, CUDA_R_8I,
                  k, _ZERO.ctypes.data, out.data.ptr, CUDA_R_32I, n, CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT)
    return out


def epilogue_i32(acc, mode: str, x_scales, w_scales, x_sums=None, w_szeros=None, bias=None):
    """fp16 [M, N] from int32 accumulators with the W4/W8 epilogue of cuda/gemm.cu."""
    cupy = cupy_module()
    m, n = acc.shape
    out = cupy.empty((m, n), dtype=cupy.float16)
    mode_id = MODES[mode]
    kern = get_kernel("gemm.cu", "qs_epilogue_i32")
    kern((-(-n // 2048), m), (256,), (
        cupy.ascontiguousarray(acc), _vec(w_scales, n, cupy.float16, "w_scales"),
        NULL if mode_id != 0 else _vec(w_szeros, n, cupy.float16, "w_szeros"),
        _vec(x_scales, m, cupy.float16, "x_scales"),
        NULL if mode_id != 0 else _vec(x_sums, m, cupy.float32, "x_sums"),
        NULL if bias is None else _vec(bias, n, cupy.float16, "bias"), out, np.int32(m), np.int32(n),
        np.int32(0 if mode_id == 0 else 1),
    ))
    return out


# ---- per-token row kernels ----

ROW_OPS = {"quant": 0, "rmsnorm": 1, "silu": 2}


def _row_geometry(k: int) -> tuple[int, int]:
    """(chunks of 8 per thread, threads) for a row of k elements: one block per row, row in registers."""
    chunks = max(1, -(-k // 8))
    for nc in (1, 2, 4, 8):
        threads = -(-chunks // nc)
        if threads <= (256 if nc < 4 else 1024) or nc == 8:
            break
    threads = -(-threads // 32) * 32
    if threads > 1024:
        raise ValueError(f"row kernels support rows of at most {8 * 8 * 1024} elements, got {k}")
    return nc, threads


def rows(op: str, x, k: int, *, residual=None, gamma=None, eps: float = 0.0, want_y: bool = False,
         want_q: bool = True, want_sum: bool = True):
    """Runs cuda/rows.cu over the rows of x (2-D). Returns (y, q, scales, sums, residual_out); unrequested
    outputs are None."""
    cupy = cupy_module()
    op_id = ROW_OPS[op]
    x = _c_rows(x, "input")
    m = x.shape[0]
    in_f32 = op_id == 0 and x.dtype == cupy.float32
    if not in_f32 and x.dtype != cupy.float16:
        raise ValueError(f"{op}: expected float16 input, got {x.dtype}")
    width = 2 * k if op_id == 2 else k
    if x.shape[1] != width:
        raise ValueError(f"{op}: expected rows of {width} elements, got {x.shape[1]}")
    y = cupy.empty((m, k), dtype=cupy.float16) if want_y else None
    q = cupy.empty((m, k), dtype=cupy.int8) if want_q else None
    scales = cupy.empty((m,), dtype=cupy.float16) if want_q else None
    sums = cupy.empty((m,), dtype=cupy.float32) if want_q and want_sum else None
    res_out = None
    if op_id == 1:
        gamma = _vec(gamma, k, cupy.float16, "norm weight")
        res_out = cupy.empty((m, k), dtype=cupy.float16)
        if residual is not None:
            residual = _c_rows(residual, "residual")
            if residual.shape != (m, k) or residual.dtype != cupy.float16:
                raise ValueError(f"residual: expected {(m, k)} float16, got {residual.shape} "
                                 f"{residual.dtype}")
    if m == 0:
        return y, q, scales, sums, res_out
    ldx = x.strides[0] // x.itemsize if m > 1 else width
    ldr = residual.strides[0] // 2 if residual is not None and m > 1 else k
    vec = k % 8 == 0 and ldx % 8 == 0 and _aligned16(x) and (residual is None or (ldr % 8 == 0 and
                                                                                   _aligned16(residual)))
    if gamma is not None:
        vec = vec and _aligned16(gamma)
    nc, threads = _row_geometry(k)
    defines = {"QS_ROW_OP": op_id, "QS_NC": nc, "QS_VEC": int(vec), "QS_IN_F32": int(in_f32)}
    kern = get_kernel("rows.cu", "qs_rows", defines)
    kern((m,), (threads,), (
        x, np.int64(ldx), _ptr_or_null(residual), np.int64(ldr), _ptr_or_null(res_out), np.int64(k),
        _ptr_or_null(gamma), np.float64(eps), _ptr_or_null(y), np.int64(k), _ptr_or_null(q), np.int64(k),
        _ptr_or_null(scales), _ptr_or_null(sums), np.int32(k),
    ))
    return y, q, scales, sums, res_out


def sm90a_active() -> bool:
    """True if modules of this device compile for the arch-specific sm_90a target (Hopper only)."""
    mod = load_module("arch_probe.cu")
    del mod
    return read_global_int("arch_probe.cu", "qs_arch_feature_sm90a") == 1
