"""Launcher of cuda/kv_writer.cu: RoPE on q and k (optionally the per-head Hadamard rotation), then K and V
quantized (KV4 / KV8) or copied (fp16) into the paged KV pool at the slot mapping. Public function and numpy
twin: kernels/attention.rope_write_kv. Launch geometry depends only on host-side sizes, never on device
values, so the writer can be captured in a CUDA graph."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import head_rows, int32_array, pool_args
from qserve_lite.kernels.cuda.device import sm_count
from qserve_lite.kernels.cuda.jit import get_kernel
from qserve_lite.kernels.fusions import step_fusions
from qserve_lite.kernels.paged_kv import PagedKVPool

NARROW_WARPS = 4  # the block of a step with enough tokens to fill the GPU (and of the unfused path)


def writer_defines(head_dim: int, kv_bits: int, rope: bool = True, k_hadamard: bool = False,
                   pairs: bool = False) -> dict[str, int]:
    return {"QS_D": head_dim, "QS_BITS": kv_bits, "QS_ROPE": int(rope), "QS_KHAD": int(k_hadamard),
            "QS_PAIRS": int(pairs)}


def writer_warps(tokens: int, heads: int, sms: int, wide: bool = True) -> int:
    """Warps per block (one block per token, `heads` = q + k + v heads). A prefill-sized step (at least 16
    four-warp blocks per SM) keeps NARROW_WARPS; a decode step gets a block as wide as its heads allow (at
    most 32 warps), each warp taking the fewest heads in turn, so that a few hundred tokens still put
    enough loads in flight (a 4-warp block walked 12 heads of Llama-3-8B one after the other)."""
    if not wide or tokens >= 16 * sms:
        return NARROW_WARPS
    turns = -(-heads // 32)
    return -(-heads // turns)


def rope_write_kv(q, k, v, positions, inv_freq, pool: PagedKVPool, layer: int, slot_mapping, rope: bool,
                  k_hadamard: bool = False):
    cp = import_cupy()
    lay = pool.layout
    D, KVH = lay.head_dim, lay.num_kv_heads
    if D % 64:
        raise ValueError(f"the GPU KV writer needs head_dim a multiple of 64, got {D}")
    if k_hadamard and D & (D - 1):
        raise ValueError(f"the q / k Hadamard rotation needs a power-of-two head_dim, got {D}")
    T, H = q.shape[0], q.shape[1]
    ldq = head_rows(q, "q", None, D)
    ldk = head_rows(k, "k", KVH, D)
    ldv = head_rows(v, "v", KVH, D)
    if k.shape[0] != T or v.shape[0] != T:
        raise ValueError(f"q, k, v token counts differ: {q.shape}, {k.shape}, {v.shape}")
    if H % KVH:
        raise ValueError(f"{H} query heads are not a multiple of {KVH} kv heads")
    slots = int32_array(slot_mapping, "slot_mapping", T)
    pos = int32_array(positions, "positions", T) if rope else slots
    freq = cp.asarray(inv_freq, dtype=cp.float64) if rope else cp.zeros(1, dtype=cp.float64)
    if rope and freq.shape != (D // 2,):
        raise ValueError(f"inv_freq: expected ({D // 2},), got {freq.shape}")
    if T == 0:
        return
    fused = step_fusions()
    pairs = fused and D % 128 == 0 and all(s % 2 == 0 and a.data.ptr % 4 == 0
                                           for s, a in ((ldq, q), (ldk, k), (ldv, v)))
    kern = get_kernel("kv_writer.cu", "qs_rope_write_kv",
                      writer_defines(D, lay.kv_bits, rope, k_hadamard, pairs))
    k_pool, v_pool, page_bytes = pool_args(pool, layer)
    warps = writer_warps(T, H + 2 * KVH, sm_count(), wide=fused)
    kern((T,), (32 * warps,), (q, np.int64(ldq), k, np.int64(ldk), v, np.int64(ldv), pos, freq, k_pool,
                               v_pool, np.int64(page_bytes), slots, np.int32(H), np.int32(KVH)))
