"""Attention kernels over the paged KV cache (kernels/paged_kv.py): RoPE + KV writer, prefill, decode.

Each function runs the CUDA kernel (cuda/kv_writer.cu, cuda/attention.cu) on CuPy arrays and its numpy twin
on numpy arrays; the twins are the specification:

- `rope_write_kv`: bit-exact. RoPE with fp32 cos/sin of fp64 angles (model/rope.rope_cos_sin), each fp32
  operation rounded once (model/rope.apply_rope), q and k rotated in place in fp16; with k_hadamard, q and k
  then multiplied per head by the normalized Hadamard matrix (`head_hadamard`: a fast Walsh-Hadamard
  transform with the kernel's fp32 steps, in place in fp16); K (rotated) and V quantized by
  kernels/kv_quant.kv_quantize and stored at the slot mapping. The GPU writes the same bytes,
  except that a zero point of 0 may carry the other sign (where a head's minimum is a signed zero, numpy's
  min over +0 / -0 picks either one); codes and dequantized values are the same.
- `decode_attention`, `prefill_attention`: softmax(q k^T * scale) v over the dequantized cache
  ((code - zero) * scale in fp32, or the fp16 values), the twin in float64, the output rounded to fp16.
  Tolerance of the GPU against the twin: |gpu - twin| <= 5e-3 * max|V| (+ one fp16 ulp of the output)
  elementwise. The GPU multiplies in fp16 on tensor cores with fp32 accumulation: K and V codes enter the
  products exactly in decode (K as code + 1024 or + 64, the offsets removed in fp32 with the zero point after
  the dot product; scale and zero are applied in fp32 around the products), but the probabilities
  (times the V scale) are rounded to fp16, each a relative 2^-11; prefill also rounds the dequantized
  cached K/V to fp16 (2^-11 relative), and exp2 is the hardware approximation (2 ulp).
  Prefill attends to the fresh K/V it is given (fp16, k after RoPE) for the chunk's own tokens, and to the
  paged cache for the positions before the chunk (context - new tokens), as QServe does.
- `decode_attention(..., quant_out=)`: the o_proj input as well, the composition quantize_per_token(its own
  fp16 output) (kernels/act_quant.py), bit-exact on both backends (fused into the kernel's last pass).

Sizes: q [tokens or batch, num_heads, head_dim] fp16, k / v [tokens, num_kv_heads, head_dim] fp16 (views of a
fused qkv buffer are fine: rows may have any stride, heads must be contiguous); slot_mapping, positions,
block_tables [seqs, max_pages], context_lens, cu_seqlens int32 (other integer types are converted, which on
the GPU allocates: pass int32 device arrays inside CUDA-graph capture).
"""

from __future__ import annotations

import math

import numpy as np

from qserve_lite.core.backend import array_module, is_cupy, to_host
from qserve_lite.core.rope import apply_rope, rope_cos_sin
from qserve_lite.kernels.act_quant import check_quant_out, quantize_per_token
from qserve_lite.kernels.cuda import attention as cuda_attention
from qserve_lite.kernels.cuda import kv_writer as cuda_kv_writer
from qserve_lite.kernels.kv_quant import kv_quantize
from qserve_lite.kernels.paged_kv import PagedKVPool

# ---- RoPE + KV writer ----

def head_hadamard_scale(head_dim: int) -> np.float32:
    """fp32(1 / sqrt(head_dim)) for a power-of-two head_dim, built exactly as cuda/kv_writer.cu does: a
    power of two, or one times fp32(sqrt(1/2))."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"the q / k Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
    log2 = head_dim.bit_length() - 1
    odd = np.sqrt(np.float32(0.5)) if log2 % 2 else np.float32(1.0)
    return np.float32(odd / np.float32(1 << (log2 // 2)))


def head_hadamard(x) -> np.ndarray:
    """x [..., D] (fp16) times the normalized Sylvester Hadamard matrix H_D (quant/hadamard.hadamard(D)), per
    row, as the KV writer computes it (the numpy twin of its QS_KHAD step): a fast Walsh-Hadamard transform
    in fp32 with stages of increasing mask m = 1, 2, ..., D/2, each turning the channel pair (c, c | m),
    c & m == 0, into (a + b, a - b) with one fp32 rounding, then fp16(y * fp32(1/sqrt(D))). Returns fp16."""
    x = np.asarray(x)
    D = x.shape[-1]
    scale = head_hadamard_scale(D)
    y = x.astype(np.float16).astype(np.float32)  # a fresh contiguous array: the views below write into it
    m = 1
    while m < D:
        pairs = y.reshape(*y.shape[:-1], D // (2 * m), 2, m)  # [..., block, bit m of the channel, low bits]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        total, diff = a + b, a - b
        pairs[..., 0, :] = total
        pairs[..., 1, :] = diff
        m *= 2
    return (y * scale).astype(np.float16)


def rope_write_kv(q, k, v, positions, inv_freq, pool: PagedKVPool, layer: int, slot_mapping,
                  rope: bool = True, k_hadamard: bool = False) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] (fp16) in place with RoPE at `positions` [T] (inv_freq [D/2]
    float64, e.g. model/rope.rope_inv_freq), with k_hadamard then multiply both by the head's normalized
    Hadamard matrix (`head_hadamard`; D a power of two), then store k and v [T, KVH, D] into layer's pages of
    `pool` at `slot_mapping` [T] (negative slots: not stored)."""
    if is_cupy(array_module(q, k, v, pool.pool)):
        cuda_kv_writer.rope_write_kv(q, k, v, positions, inv_freq, pool, layer, slot_mapping, rope,
                                     k_hadamard)
        return
    if q.dtype != np.float16 or k.dtype != np.float16 or v.dtype != np.float16:
        raise ValueError("rope_write_kv: q, k and v must be float16")
    if rope:
        cos, sin = rope_cos_sin(np.asarray(positions), np.asarray(inv_freq, dtype=np.float64), np, np.float32)
        q[...] = apply_rope(q, cos, sin)
        k[...] = apply_rope(k, cos, sin)
    if k_hadamard:
        q[...] = head_hadamard(q)
        k[...] = head_hadamard(k)
    slots = np.asarray(slot_mapping)
    for which, x in ((0, k), (1, v)):
        if pool.layout.quantized:
            codes, scales, zeros = kv_quantize(x, pool.kv_bits, np)
            pool.store(layer, which, slots, codes=codes, scales=scales, zeros=zeros)
        else:
            pool.store(layer, which, slots, values=x)


# ---- attention twins ----

def _attend(q, k, v, start: int, scale: float) -> np.ndarray:
    """Causal GQA attention in float64: q [T, H, D] at positions start.., k, v [KVH, S, D] -> [T, H, D]."""
    T, H, D = q.shape
    KVH, S = k.shape[0], k.shape[1]
    group = H // KVH
    qg = q.astype(np.float64).reshape(T, KVH, group, D).transpose(1, 2, 0, 3)  # [KVH, G, T, D]
    scores = (qg @ k.astype(np.float64)[:, None].transpose(0, 1, 3, 2)) * scale  # [KVH, G, T, S] (BLAS)
    visible = (start + np.arange(T))[:, None] >= np.arange(S)[None, :]
    scores = np.where(visible, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    o = p @ v.astype(np.float64)[:, None]  # [KVH, G, T, D]
    return o.transpose(2, 0, 1, 3).reshape(T, H, D)


def decode_attention(q, pool: PagedKVPool, layer: int, block_tables, context_lens, scale: float | None = None,
                     *, max_context: int | None = None, splits: int | None = None, out=None, workspace=None,
                     quant_out=None):
    """One query per sequence: q [B, H, D] fp16 attends to positions 0..context_lens[b]-1 of its pages
    (block_tables [B, max_pages]). Returns [B, H, D] fp16.

    quant_out (codes int8 [B, H*D], scales fp16 [B][, sums fp32 [B]]; e.g. a QuantizedActivation): also
    quantize the output per token for the o_proj GEMM, into these buffers. The specification is the
    composition `quantize_per_token(decode_attention(...).reshape(B, H*D), with_sums=sums given)`
    (kernels/act_quant.py) of this call's own fp16 output, bit for bit on both backends: the GPU kernel's
    last head block of each token reads the token's fp16 row back and quantizes it with rows.cu's steps.

    GPU: `max_context` (host bound on context_lens, default max_pages * 64) sizes the split-K grid, so the
    call never reads device memory on the host and can be captured in a CUDA graph (with int32 inputs, an
    `out` and a `workspace` from `decode_workspace` (kernels/cuda/attention.py) that outlive the graph).
    `splits` overrides the split count (tuning)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if is_cupy(array_module(q, pool.pool)):
        return cuda_attention.decode_attention(q, pool, layer, block_tables, context_lens, scale, max_context,
                                               splits, out, workspace, quant_out=quant_out)
    res = _decode_twin(q, pool, layer, block_tables, context_lens, scale)
    if out is not None:
        out[...] = res
        res = out
    if quant_out is not None:
        _quantize_into(res, quant_out)
    return res


def _quantize_into(res, quant_out) -> None:
    """The twin of decode_attention's quant_out: quantize_per_token of the fp16 output [B, H*D], stored."""
    B = res.shape[0]
    codes, scales, sums = check_quant_out(quant_out, B, int(np.prod(res.shape[1:])))
    qa = quantize_per_token(np.asarray(res).reshape(B, -1), np, with_sums=sums is not None)
    codes[...] = qa.q
    scales[...] = qa.scales
    if sums is not None:
        sums[...] = qa.sums


def _decode_twin(q, pool: PagedKVPool, layer: int, block_tables, context_lens, scale: float) -> np.ndarray:
    bt, ctx = to_host(block_tables), to_host(context_lens)
    res = np.empty(q.shape, dtype=np.float16)
    for b in range(q.shape[0]):
        n = int(ctx[b])
        if n == 0:
            res[b] = 0
            continue
        k, v = pool.gather(layer, bt[b], n)
        res[b] = _attend(np.asarray(q[b])[None], k, v, n - 1, scale)[0].astype(np.float16)
    return res


def prefill_attention(q, k, v, cu_seqlens, context_lens=None, pool: PagedKVPool | None = None, layer: int = 0,
                      block_tables=None, scale: float | None = None, *, max_seqlen_q: int | None = None,
                      out=None, warps: int | None = None):
    """Causal attention of packed sequences: sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1] of q
    [T, H, D] and of its fresh k, v [T, KVH, D] (fp16, k already rotated). With context_lens [S] longer than
    the new tokens, positions before them (context - new) are read from the pool's pages (block_tables).
    Returns [T, H, D] fp16. GPU: on Hopper the wgmma kernel (cuda/attention_sm90.cu) unless
    QSERVE_LITE_SM90_ATTN=0; `warps` (4 or 8) asks for the mma.sync kernel (cuda/attention.cu)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if is_cupy(array_module(q, k, v)):
        return cuda_attention.prefill_attention(q, k, v, cu_seqlens, context_lens, pool, layer, block_tables,
                                                scale, max_seqlen_q, out, warps)
    cu = to_host(cu_seqlens).astype(np.int64)
    lens = cu[1:] - cu[:-1]
    ctx = lens if context_lens is None else to_host(context_lens).astype(np.int64)
    res = np.empty(q.shape, dtype=np.float16)
    for s in range(len(lens)):
        a, e = int(cu[s]), int(cu[s + 1])
        cached = int(ctx[s] - lens[s])
        kf = np.asarray(k[a:e]).astype(np.float32).transpose(1, 0, 2)
        vf = np.asarray(v[a:e]).astype(np.float32).transpose(1, 0, 2)
        if cached > 0:
            kc, vc = pool.gather(layer, to_host(block_tables)[s], cached)
            kf, vf = np.concatenate([kc, kf], axis=1), np.concatenate([vc, vf], axis=1)
        res[a:e] = _attend(np.asarray(q[a:e]), kf, vf, cached, scale).astype(np.float16)
    if out is not None:
        out[...] = res
        return out
    return res
