"""The GPU paged KV cache: one preallocated byte buffer per model, QServe's page layout, and its numpy twin.

Buffer: `pool` uint8 [num_layers, 2, num_pages, page_bytes] (index 1: 0 = K, 1 = V), allocated once
(`xp.empty`), so `pool[layer, 0]` is layer's K page pool [num_pages, page_bytes] and kernels address a page
as `pool_ptr + page * page_bytes`. A page holds 64 consecutive tokens of one sequence, all kv heads; token
position p of a sequence lives in page block_table[p // 64] at offset p % 64 (slot = page * 64 + p % 64),
exactly as in model/paged_kv_cache.py.

Byte layout of one K (or V) page, kv_heads = KVH, head_dim = D, every offset a multiple of 16 bytes:

    kv_bits 4:  codes  [KVH][64][D/2]  uint8   two 4-bit codes per byte: channel 2i in the low nibble,
                                               channel 2i+1 in the high nibble
                scales [KVH][64]       fp16    at byte KVH*64*D/2
                zeros  [KVH][64]       fp16    at byte KVH*64*D/2 + KVH*128
    kv_bits 8:  codes  [KVH][64][D]    uint8   then scales and zeros as above (at KVH*64*D, + KVH*128)
    kv_bits 16: values [KVH][64][D]    fp16    no scales or zeros

    page_bytes = KVH*64*D*bits/8 (+ KVH*256 with scales and zeros)

e.g. Llama-3-8B (KVH 8, D 128) KV4: 32,768 + 2,048 = 34,816 bytes per K page (QServe's figure). Codes,
scales and zeros are those of kernels/kv_quant.kv_quantize: asymmetric, per token per head, the float zero in
code units stored as fp16; a reader dequantizes (code - zero) * scale. GQA needs nothing special: the
layout holds kv heads, and attention maps query head h to kv head h // (H / KVH).

Slot mappings and block tables travel to the GPU as int32 (slot -1: a padding token, not written; block
table padding -1, never read: attention reads the pages of positions < context length only).

The twin (`PagedKVPool` over numpy, `pack_codes` / `unpack_codes`, `load_from` / `values`) holds the same
bytes, so the CUDA writer is checked byte for byte against it, and `values` converts to the arrays of
model/paged_kv_cache.PagedKVCache (codes one per byte, scales, zeros; or fp16 values).
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.kv_layout import PAGE_SIZE, KVPageLayout
from qserve_lite.kernels.kv_quant import kv_dequantize


def pack_codes(codes, bits: int, xp=np):
    """codes uint8 [..., D] (one per byte) -> page bytes [..., D * bits / 8] (KV4: even channel low)."""
    codes = xp.asarray(codes, dtype=xp.uint8)
    if bits == 8:
        return codes
    return (codes[..., 0::2] & 15) | ((codes[..., 1::2] & 15) << 4)


def unpack_codes(data, bits: int, xp=np):
    """Page bytes [..., D * bits / 8] -> codes uint8 [..., D]."""
    data = xp.asarray(data, dtype=xp.uint8)
    if bits == 8:
        return data
    out = xp.empty(data.shape[:-1] + (2 * data.shape[-1],), dtype=xp.uint8)
    out[..., 0::2] = data & 15
    out[..., 1::2] = data >> 4
    return out


class PagedKVPool:
    """The preallocated paged KV buffer of a model (numpy or cupy), with views by layer and K/V."""

    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, head_dim: int, kv_bits: int,
                 xp=np, fill: int | None = None):
        self.layout = KVPageLayout(kv_bits, num_kv_heads, head_dim)
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.xp = xp
        shape = (num_layers, 2, num_pages, self.layout.page_bytes)
        self.pool = xp.empty(shape, dtype=xp.uint8) if fill is None else xp.full(shape, fill, dtype=xp.uint8)

    @property
    def kv_bits(self) -> int:
        return self.layout.kv_bits

    def k_pool(self, layer: int):
        return self.pool[layer, 0]

    def v_pool(self, layer: int):
        return self.pool[layer, 1]

    def views(self, layer: int, which: int):
        """(data, scales, zeros) views of layer's K (which 0) or V (1) pages: data [P, KVH, 64, row_bytes]
        uint8 (kv_bits 16: [P, KVH, 64, D] fp16); scales, zeros [P, KVH, 64] fp16 (None for kv_bits 16)."""
        lay, pages = self.layout, self.pool[layer, which]  # C-contiguous [P, page_bytes]
        P, KVH = self.num_pages, lay.num_kv_heads
        halves = pages.view(self.xp.float16)  # [P, page_bytes / 2]
        if not lay.quantized:
            return halves.reshape(P, KVH, PAGE_SIZE, lay.head_dim), None, None
        strided = self.xp.lib.stride_tricks.as_strided
        data = strided(pages, (P, KVH, PAGE_SIZE, lay.row_bytes),
                       (lay.page_bytes, PAGE_SIZE * lay.row_bytes, lay.row_bytes, 1))
        n = KVH * PAGE_SIZE
        s0, z0 = lay.scales_offset // 2, lay.zeros_offset // 2
        scales = strided(halves[:, s0:], (P, KVH, PAGE_SIZE), (lay.page_bytes, PAGE_SIZE * 2, 2))
        zeros = strided(halves[:, z0:], (P, KVH, PAGE_SIZE), (lay.page_bytes, PAGE_SIZE * 2, 2))
        assert n * 2 == lay.zeros_offset - lay.scales_offset
        return data, scales, zeros

    # ---- twin conversions (numpy / cupy alike) ----

    def store(self, layer: int, which: int, slots, codes=None, scales=None, zeros=None, values=None) -> None:
        """Store per-token entries at slots [N] (page * 64 + offset; negative slots are skipped): codes
        uint8 [N, KVH, D] with scales, zeros fp16 [N, KVH]; or fp16 values [N, KVH, D] for kv_bits 16."""
        xp = self.xp
        slots = xp.asarray(slots).astype(xp.int64)
        keep = slots >= 0
        page, off = slots[keep] // PAGE_SIZE, slots[keep] % PAGE_SIZE
        data, s, z = self.views(layer, which)
        if not self.layout.quantized:
            data[page, :, off] = xp.asarray(values)[keep].astype(xp.float16)
            return
        data[page, :, off] = pack_codes(xp.asarray(codes)[keep], self.kv_bits, xp)
        s[page, :, off] = xp.asarray(scales)[keep]
        z[page, :, off] = xp.asarray(zeros)[keep]

    def values(self, layer: int, which: int):
        """The arrays of PagedKVCache: (codes [P, KVH, 64, D] uint8, scales, zeros [P, KVH, 64]) or, for
        kv_bits 16, (values fp16 [P, KVH, 64, D], None, None)."""
        data, s, z = self.views(layer, which)
        if not self.layout.quantized:
            return data.copy(), None, None
        return unpack_codes(data, self.kv_bits, self.xp), s.copy(), z.copy()

    def load_from(self, cache) -> None:
        """Copy the pages of a model/paged_kv_cache.PagedKVCache (same pages, heads, head_dim, kv_bits)
        into this pool (fp16 values for kv_bits 16)."""
        xp = self.xp
        if cache.kv_bits != self.kv_bits:
            raise ValueError(f"kv_bits differ: cache {cache.kv_bits}, pool {self.kv_bits}")
        for layer in range(self.num_layers):
            for which in (0, 1):
                data, s, z = self.views(layer, which)
                if not self.layout.quantized:
                    src = (cache.k_pages, cache.v_pages)[which][layer]
                    data[...] = xp.asarray(src).astype(xp.float16)
                    continue
                codes = (cache.k_codes, cache.v_codes)[which][layer]
                data[...] = pack_codes(xp.asarray(codes), self.kv_bits, xp)
                s[...] = xp.asarray((cache.k_scales, cache.v_scales)[which][layer])
                z[...] = xp.asarray((cache.k_zeros, cache.v_zeros)[which][layer])

    def gather(self, layer: int, block_table, length: int):
        """Dequantized K and V [KVH, length, D] float32 of one sequence's positions 0..length-1 (what
        attention reads: (code - zero) * scale in fp32, or the fp16 values)."""
        xp = self.xp
        n = -(-length // PAGE_SIZE)
        pages = xp.asarray(block_table)[:n].astype(xp.int64)
        out = []
        for which in (0, 1):
            data, s, z = self.views(layer, which)
            d = data[pages]  # [n, KVH, 64, X]
            if self.layout.quantized:
                c = unpack_codes(d, self.kv_bits, xp)
                x = kv_dequantize(c, s[pages], z[pages], xp)
            else:
                x = d.astype(xp.float32)
            KVH, D = x.shape[1], x.shape[3]
            out.append(x.transpose(1, 0, 2, 3).reshape(KVH, n * PAGE_SIZE, D)[:, :length])
        return out[0], out[1]
