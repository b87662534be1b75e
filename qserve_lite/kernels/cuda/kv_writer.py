"""Launcher of cuda/kv_writer.cu: RoPE on q and k (optionally the per-head Hadamard rotation), then K and V
quantized (KV4 / KV8) or copied (fp16) into the paged KV pool at the slot mapping. Public function and numpy
twin: kernels/attention.rope_write_kv. Launch geometry depends only on host-side sizes, never on device
values, so the writer can be captured in a CUDA graph."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.args import head_rows, int32_array, pool_args
from qserve_lite.kernels.cuda.jit import get_kernel
from qserve_lite.kernels.paged_kv import PagedKVPool


def writer_defines(head_dim: int, kv_bits: int, rope: bool = True,
                   k_hadamard: bool = False) -> dict[str, int]:
    return {"QS_D": head_dim, "QS_BITS": kv_bits, "QS_ROPE": int(rope), "QS_KHAD": int(k_hadamard)}


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
    kern = get_kernel("kv_writer.cu", "qs_rope_write_kv", writer_defines(D, lay.kv_bits, rope, k_hadamard))
    k_pool, v_pool, page_bytes = pool_args(pool, layer)
    kern((T,), (128,), (q, np.int64(ldq), k, np.int64(ldk), v, np.int64(ldv), pos, freq, k_pool, v_pool,
                        np.int64(page_bytes), slots, np.int32(H), np.int32(KVH)))
