"""Launchers of cuda/attention.cu over CuPy arrays: decode (one query per sequence, split-K over the context)
and prefill (packed sequences, fresh K/V plus the paged cache before them); see kernels/attention.py for the
public functions and their numpy twins. Launch geometry depends only on host-side sizes, never on device
values, so decode (writer + attention) can be captured in a CUDA graph."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.act_quant import check_quant_out
from qserve_lite.kernels.cuda.args import NULL, head_rows, int32_array, pool_args, ptr_or_null
from qserve_lite.kernels.cuda.attention_sm90 import prefill_attention_sm90, sm90_prefill_enabled
from qserve_lite.kernels.cuda.device import sm_count, smem_per_sm
from qserve_lite.kernels.cuda.jit import get_kernel, read_global_int
from qserve_lite.kernels.cuda.workspace import attention_workspace
from qserve_lite.kernels.paged_kv import PagedKVPool

LOG2E = 1.4426950408889634
DECODE_WARPS = 4
PREFILL_WARPS = 4
MIN_SPLIT_TOKENS = 256  # a split gives each of the block's 4 warps at least 64 tokens
# The split count fills SPLIT_WAVE_BLOCKS blocks per SM, not all 4 that fit (4 warps, <= 128 registers,
# ~52 KB of ring per block; the persistent variant's count comes from decode_resident): measured on an H200
# (2026-12-03, benchmarks/decode_splits.py: batch 1-64 x context 1536-32768 x splits, KV4 and KV8; results/
# 2026-12-03-h200-decode_splits.jsonl) 2 per SM is never slower than 4 and up to 25% faster (KV4 batch 1 x
# 16384: 17.2 us instead of 23.0; batch 4 x 4096: 16.2 instead of 20.5; batch 32 x 1536: 23.0 instead of
# 29.3), within 3% of each point's best split count on average (worst 16%).
SPLIT_WAVE_BLOCKS = 2
MAX_SPLITS = 256  # the combine keeps a weight per (head, split) in the merge buffer of 4 warps x 8 x D floats


def attention_defines(head_dim: int, kv_bits: int, prefill_warps: int = PREFILL_WARPS,
                      variant: dict | None = None) -> dict[str, int]:
    """Macros of one cuda/attention.cu module (decode and prefill kernels of a page format). `variant`
    selects decode tuning alternatives: {"warps": warps per block, "sub": 16-token subtiles per tile,
    "stages": cp.async ring stages per warp (the split count then fills the blocks that fit), "combine": 1
    (fewer round trips in the last split's combine), "persist": 1 (one-split launches use persistent blocks
    whose rings run on across (sequence, kv head) items)}."""
    variant = variant or {}
    unknown = set(variant) - set(_VARIANT_MACROS) - {"warps"}
    if unknown:
        raise ValueError(f"unknown decode attention variant keys {sorted(unknown)}")
    defines = {"QS_D": head_dim, "QS_BITS": kv_bits, "QS_WARPS": variant.get("warps", DECODE_WARPS),
               "QS_PF_WARPS": prefill_warps}
    for key, macro in _VARIANT_MACROS.items():
        if key in variant:
            defines[macro] = int(variant[key])
    return defines


_VARIANT_MACROS = {"sub": "QS_DEC_SUB", "stages": "QS_DEC_STAGES", "combine": "QS_DEC_COMBINE",
                   "persist": "QS_DEC_PERSIST"}


# ---- decode ----

def decode_geometry(batch: int, num_heads: int, num_kv_heads: int, max_context: int,
                    splits: int | None = None, resident: int | None = None) -> tuple[int, int]:
    """(num_splits, tokens_per_split): as many splits as fill `resident` blocks per SM (default
    SPLIT_WAVE_BLOCKS, so batch 1 with a long context streams from every SM), each split at least
    MIN_SPLIT_TOKENS long, at most MAX_SPLITS; tokens_per_split is a multiple of 64 (whole pages)."""
    group = num_heads // num_kv_heads
    blocks = batch * num_kv_heads * -(-group // 8)
    max_context = max(1, int(max_context))
    if splits is None:
        splits = min((resident or SPLIT_WAVE_BLOCKS) * sm_count() // max(1, blocks),
                     -(-max_context // MIN_SPLIT_TOKENS))
    splits = min(MAX_SPLITS, max(1, int(splits)))
    tps = -(-max_context // splits)
    tps = -(-tps // 64) * 64
    return -(-max_context // tps), tps


def decode_workspace(batch: int, num_heads: int, head_dim: int, splits: int):
    """(partials, counters) for decode_attention(..., workspace=), e.g. one per CUDA graph: fp32 partials
    (o, m, l) of every (sequence, head, split) and zeroed int32 counters, one per (sequence, head) and one
    per sequence (the fused quantization's), which the kernel leaves at zero after every call (so keep that
    buffer for this purpose only)."""
    cp = import_cupy()
    return (cp.empty(batch * num_heads * splits * (head_dim + 2), dtype=cp.float32),
            cp.zeros(batch * (num_heads + 1), dtype=cp.int32))


def _quant_args(quant_out, B: int, K: int) -> tuple:
    """The kernel arguments (codes, scales, sums or null) of decode_attention's quant_out."""
    cp = import_cupy()
    codes, scales, sums = check_quant_out(quant_out, B, K)
    for name, a in (("codes", codes), ("scales", scales), ("sums", sums)):
        if a is not None and (not isinstance(a, cp.ndarray) or not a.flags.c_contiguous):
            raise ValueError(f"quant_out {name}: expected a C-contiguous CuPy array")
    if codes.data.ptr % 4:
        raise ValueError("quant_out codes: rows must start on 4-byte boundaries")
    return codes, scales, ptr_or_null(sums)


def decode_attention(q, pool: PagedKVPool, layer: int, block_tables, context_lens, scale: float,
                     max_context: int | None, splits: int | None, out, workspace,
                     variant: dict | None = None, quant_out=None):
    """quant_out (codes, scales[, sums]): also write the per-token INT8 quantization of the fp16 output
    (QS_DEC_QUANT: the last head block of each token quantizes its row; the "persist" variant does not
    apply then)."""
    cp = import_cupy()
    lay = pool.layout
    D, KVH = lay.head_dim, lay.num_kv_heads
    B, H = q.shape[0], q.shape[1]
    ldq = head_rows(q, "q", None, D)
    if H % KVH:
        raise ValueError(f"{H} query heads are not a multiple of {KVH} kv heads")
    bt = cp.asarray(block_tables)
    if bt.ndim != 2 or bt.shape[0] != B:
        raise ValueError(f"block_tables: expected [{B}, max_pages], got {bt.shape}")
    bt = int32_array(bt, "block_tables")
    ctx = int32_array(context_lens, "context_lens", B)
    if out is None:
        out = cp.empty((B, H, D), dtype=cp.float16)
    ldo = head_rows(out, "out", H, D)
    if ldo % 4 or out.data.ptr % 8:
        raise ValueError("out: rows must start on 8-byte boundaries (row stride % 4 == 0)")
    quant = _quant_args(quant_out, B, H * D) if quant_out is not None else ()
    if B == 0:
        return out
    if max_context is None:
        max_context = bt.shape[1] * 64
    defines = attention_defines(D, lay.kv_bits, variant=variant)
    if quant:
        defines["QS_DEC_QUANT"] = 1
        defines.pop("QS_DEC_PERSIST", None)
    warps = defines["QS_WARPS"]
    fixed = _module_int(defines, "qs_decode_smem_fixed")
    resident = decode_resident(fixed, warps) if "QS_DEC_STAGES" in defines else None
    nsplit, tps = decode_geometry(B, H, KVH, max_context, splits, resident)
    group = H // KVH
    chunks = -(-group // 8)
    if nsplit == 1 and "QS_DEC_PERSIST" in defines:
        return _decode_persist(q, ldq, pool, layer, bt, ctx, scale, out, ldo, defines)
    smem = fixed + (tps // 64) * 4
    _check_smem(smem, defines)
    kern = get_kernel("attention.cu", "qs_decode_attn", defines, dynamic_smem=smem)
    part_o = part_ml = counters = NULL
    if nsplit > 1 or quant:
        n = B * H * nsplit if nsplit > 1 else 0
        need = B * KVH * chunks + (B if quant else 0)  # per (sequence, head block), then per sequence
        part, counters = workspace if workspace is not None else attention_workspace.get(n * (D + 2), need)
        if part.size < n * (D + 2) or part.dtype != cp.float32 or counters.size < need or \
                counters.dtype != cp.int32:
            raise ValueError(f"workspace: need {n * (D + 2)} float32 and {need} int32 (decode_workspace), "
                             f"got {part.size} {part.dtype} and {counters.size} {counters.dtype}")
        part_o, part_ml = part[: n * D], part[n * D : n * (D + 2)]
    k_pool, v_pool, page_bytes = pool_args(pool, layer)
    kern((nsplit, KVH * chunks, B), (32 * warps,), (
        q, np.int64(ldq), k_pool, v_pool, np.int64(page_bytes), bt, np.int32(bt.shape[1]), ctx, np.int32(H),
        np.int32(KVH), np.float32(scale * LOG2E), np.int32(tps), np.int32(nsplit), out, np.int64(ldo),
        part_o, part_ml, counters, *quant), shared_mem=smem)
    return out


_decode_smem: dict[tuple, int] = {}


def _module_int(defines: dict, symbol: str) -> int:
    key = (symbol, *sorted(defines.items()))
    value = _decode_smem.get(key)
    if value is None:
        value = _decode_smem[key] = read_global_int("attention.cu", symbol, defines)
    return value


def _check_smem(smem: int, defines: dict) -> None:
    if smem > smem_per_sm() - 1024:
        raise ValueError(f"decode attention variant {defines} needs {smem} bytes of shared memory per block, "
                         f"more than this GPU's {smem_per_sm() - 1024}")


def decode_resident(smem: int, warps: int) -> int:
    """Decode blocks an SM holds: the launch bounds give each block of `warps` warps 16 / warps slots of
    registers; shared memory (plus the 1 KiB the runtime reserves per block) may allow fewer."""
    return max(1, min(16 // warps, smem_per_sm() // (smem + 1024)))


def _decode_persist(q, ldq, pool, layer, bt, ctx, scale, out, ldo, defines):
    """One-split decode on persistent blocks (variant "persist"): one wave of resident blocks, each looping
    over (sequence, kv head block) items; host-side geometry only (CUDA-graph safe), no workspace."""
    lay = pool.layout
    B, H = q.shape[0], q.shape[1]
    KVH = lay.num_kv_heads
    items = B * KVH * -(-(H // KVH) // 8)
    smem = _module_int(defines, "qs_decode_persist_smem")
    warps = defines["QS_WARPS"]
    _check_smem(smem, defines)
    grid = min(items, decode_resident(smem, warps) * sm_count())
    kern = get_kernel("attention.cu", "qs_decode_attn_persist", defines, dynamic_smem=smem)
    k_pool, v_pool, page_bytes = pool_args(pool, layer)
    kern((grid,), (32 * warps,), (
        q, np.int64(ldq), k_pool, v_pool, np.int64(page_bytes), bt, np.int32(bt.shape[1]), ctx, np.int32(H),
        np.int32(KVH), np.float32(scale * LOG2E), np.int32(B), out, np.int64(ldo)), shared_mem=smem)
    return out


# ---- prefill ----

def prefill_attention(q, k, v, cu_seqlens, context_lens, pool: PagedKVPool | None, layer: int, block_tables,
                      scale: float, max_seqlen_q: int | None, out, warps: int | None):
    cp = import_cupy()
    T, H, D = q.shape
    KVH = k.shape[1]
    if D not in (64, 128):
        raise ValueError(f"the GPU prefill attention supports head_dim 64 and 128, got {D}")
    ldq = head_rows(q, "q", None, D)
    ldk = head_rows(k, "k", KVH, D)
    ldv = head_rows(v, "v", KVH, D)
    if H % KVH:
        raise ValueError(f"{H} query heads are not a multiple of {KVH} kv heads")
    for name, a, ld in (("q", q, ldq), ("k", k, ldk), ("v", v, ldv)):
        if ld % 8 or a.data.ptr % 16:
            raise ValueError(f"{name}: rows must start on 16-byte boundaries (row stride % 8 == 0)")
    cu = int32_array(cu_seqlens, "cu_seqlens")
    S = cu.shape[0] - 1
    ctx = cu[1:] - cu[:-1] if context_lens is None else int32_array(context_lens, "context_lens", S)
    ctx = int32_array(ctx, "context_lens", S)
    if out is None:
        out = cp.empty((T, H, D), dtype=cp.float16)
    ldo = head_rows(out, "out", H, D)
    if T == 0 or S == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu[1:] - cu[:-1]).max().get())
    if pool is not None:
        if pool.layout.head_dim != D or pool.layout.num_kv_heads != KVH:
            raise ValueError("the pool's head_dim / kv heads differ from k's")
        bits = pool.kv_bits
        bt = int32_array(cp.asarray(block_tables), "block_tables")
        bt_stride = bt.shape[1] if bt.ndim == 2 else 0
    else:
        bits, bt, bt_stride = 16, NULL, 0
    if warps is None and sm90_prefill_enabled(D):  # Hopper: cuda/attention_sm90.cu (`warps`: this kernel)
        return prefill_attention_sm90(q, k, v, ldq, ldk, ldv, cu, ctx, pool, layer, bt, bt_stride, bits,
                                      scale * LOG2E, max_seqlen_q, out, ldo)
    w = warps or PREFILL_WARPS
    bm = 16 * w
    defines = attention_defines(D, bits, w)
    smem = 4 * 64 * D * 2
    kern = get_kernel("attention.cu", "qs_prefill_attn", defines, dynamic_smem=smem)
    k_pool, v_pool, page_bytes = pool_args(pool, layer)
    kern((H, -(-max(1, max_seqlen_q) // bm), S), (32 * w,), (
        q, np.int64(ldq), k, np.int64(ldk), v, np.int64(ldv), cu, ctx, k_pool, v_pool, np.int64(page_bytes),
        bt, np.int32(bt_stride), np.int32(H), np.int32(KVH), np.float32(scale * LOG2E), out, np.int64(ldo)),
        shared_mem=smem)
    return out
