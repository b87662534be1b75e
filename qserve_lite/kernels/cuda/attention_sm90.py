"""Launcher of cuda/attention_sm90.cu, the Hopper prefill attention (TMA + fp16 wgmma, FlashAttention-3
style). Reached through cuda/attention.prefill_attention, which checks the arguments and routes here on sm_90
(`sm90_prefill_enabled`) unless QSERVE_LITE_SM90_ATTN=0 or an explicit `warps` asks for the mma.sync kernel.

q, k and v are read with TMA as byte-typed 2-D maps (rows = packed tokens, one 128-byte box = 64 channels of
a head); the cached pages are read with ordinary loads inside the kernel. The launch goes through
driver.launch on CuPy's current stream.
"""

from __future__ import annotations

import ctypes
import os

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.device import wgmma_available
from qserve_lite.kernels.cuda.driver import SWIZZLE_128B, TMA_U8, launch, tensor_map_2d
from qserve_lite.kernels.cuda.jit import get_sized_kernel

# The Hopper kernel serves prefill attention on sm_90 unless QSERVE_LITE_SM90_ATTN=0 (a measuring switch:
# before/after comparisons in one process tree).
USE_SM90_ATTN = os.environ.get("QSERVE_LITE_SM90_ATTN", "1") != "0"
BM = BN = 128  # query rows per block, keys per tile (the .cu's)
THREADS = 384
DEBUG_S, DEBUG_PV = 1, 2  # debug entries: the raw S tile, or fp16(S) V, of the first key tile (fp32)


def sm90_defines(head_dim: int, kv_bits: int, stages: int | None = None, pv_split: bool = False,
                 debug: int = 0) -> dict[str, int]:
    """Macros of one cuda/attention_sm90.cu module: head_dim 128 keeps three (K, V) stages in shared memory
    beside the Q tile, head_dim 64 four (H200, 2026-12-02, benchmarks/attention.py: hd128 T=4096 566 TFLOP/s
    with three stages, 464 with two; hd64 390 with three or four)."""
    if stages is None:
        stages = 3 if head_dim == 128 else 4
    defines = {"QS_D": head_dim, "QS_BITS": kv_bits, "QS_STAGES": stages}
    if pv_split:
        defines["QS_PV_SPLIT"] = 1
    if debug:
        defines["QS_DEBUG"] = debug
    return defines


def sm90_prefill_enabled(head_dim: int) -> bool:
    """The switch is on, the device is Hopper, and the head size is one the kernel has (64 or 128). The
    caller has already checked the layouts TMA needs: 16-byte aligned rows and row strides."""
    return USE_SM90_ATTN and head_dim in (64, 128) and wgmma_available()


def _map(a, ld: int, heads: int, head_dim: int):
    rows = a.shape[0]
    return tensor_map_2d(TMA_U8, a.data.ptr, (heads * head_dim * 2, rows), ld * 2 if rows > 1 else
                         -(-heads * head_dim * 2 // 16) * 16, (128, BM), SWIZZLE_128B)


def _ptr(a) -> ctypes.c_uint64:
    """A CuPy array's device pointer; 0 for None or a null placeholder."""
    return ctypes.c_uint64(getattr(getattr(a, "data", None), "ptr", 0) if a is not None else 0)


def prefill_attention_sm90(q, k, v, ldq: int, ldk: int, ldv: int, cu, ctx, pool, layer: int, bt,
                           bt_stride: int, bits: int, scale_log2: float, max_seqlen_q: int, out, ldo: int, *,
                           variant: dict | None = None, debug: int = 0):
    """Causal prefill over packed sequences into `out` (arguments already checked by
    cuda/attention.prefill_attention: cu / ctx / bt int32 device arrays, bits 16 without a pool). `variant`
    ({"stages": n, "pv_split": bool}) selects tuning alternatives; `debug` (DEBUG_S / DEBUG_PV) runs the
    debug entry over the first key tile and returns its fp32 [num_seqs, heads, query tiles, 128, 128 or D]
    buffer instead (tests)."""
    cp = import_cupy()
    T, H, D = q.shape
    KVH = k.shape[1]
    S = cu.shape[0] - 1
    variant = variant or {}
    defines = sm90_defines(D, bits, variant.get("stages"), bool(variant.get("pv_split")), debug)
    kern, smem = get_sized_kernel("attention_sm90.cu", "qs_prefill_sm90", defines, THREADS)
    m_tiles = -(-max(1, max_seqlen_q) // BM)
    dbg = None
    if debug:
        width = BN if debug == DEBUG_S else D
        if S * H * m_tiles != 1:
            raise ValueError("the debug entries run one block: one sequence, one head, one query tile")
        dbg = cp.full((BM, width), cp.nan, dtype=cp.float32)
    if pool is not None:
        k_pool, v_pool = pool.k_pool(layer), pool.v_pool(layer)
        page_bytes = pool.layout.page_bytes
    else:
        k_pool = v_pool = None
        page_bytes = 0
    i32 = ctypes.c_int32
    params = [_map(q, ldq, H, D), _map(k, ldk, KVH, D), _map(v, ldv, KVH, D), _ptr(cu), _ptr(ctx),
              _ptr(k_pool), _ptr(v_pool), ctypes.c_int64(page_bytes), _ptr(bt), i32(bt_stride), i32(H),
              i32(KVH), ctypes.c_float(scale_log2), _ptr(out), ctypes.c_int64(ldo), _ptr(dbg)]
    launch(kern, (H, m_tiles, S), THREADS, smem, params)
    return dbg if debug else out
