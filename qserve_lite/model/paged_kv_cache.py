"""Paged KV cache, the numpy twin of the GPU engine's page pools (QServe's layout, 64-token pages).

Memory is a pool of `num_pages` pages per layer, separately for K and V. A page holds 64 consecutive
tokens of one sequence, all kv heads. A sequence's block table lists its pages in order; token at
position p lives in page block_table[p // 64] at offset p % 64, i.e. at slot page * 64 + p % 64.

Layout per layer (this twin's arrays; the GPU's byte layout is defined by the CUDA writer and must hold
the same values):

- kv_bits 16 (fp16 / fp32 values, the model's dtype):
      k_pages[layer], v_pages[layer]    [num_pages, kv_heads, 64, head_dim]   dtype
- kv_bits 4 or 8 (asymmetric per token per head, exactly kernels/kv_quant.kv_quantize):
      k_codes[layer], v_codes[layer]    [num_pages, kv_heads, 64, head_dim]   uint8 (one code per byte;
                                        KV4 uses 0..15 - the GPU packs two per byte, even channel low)
      k_scales, v_scales                [num_pages, kv_heads, 64]             fp16
      k_zeros,  v_zeros                 [num_pages, kv_heads, 64]             fp16 (float zero, code units)
  which is QServe's page: codes [kv_heads][64][head_dim * bits / 8], then scales, then zeros.

Writes quantize each (token, head) vector on the way in; reads dequantize to fp32 (then the model's
dtype), so attention sees what the contiguous KVCache with a KVFakeQuantizer would hold, bit for bit.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.kernels.kv_quant import kv_dequantize, kv_quantize


def page_bytes(cfg: ModelConfig, kv_bits: int = 16, dtype=np.float32) -> int:
    """Bytes of one page across all layers, K and V, in this twin's layout."""
    per_token_head = cfg.head_dim * np.dtype(dtype).itemsize if kv_bits == 16 else cfg.head_dim + 2 + 2
    return 2 * cfg.num_layers * cfg.num_kv_heads * PAGE_SIZE * per_token_head


class PagedKVCache:
    """Per-layer K and V page pools; `write` by slot mapping, `gather` by block tables."""

    def __init__(self, cfg: ModelConfig, num_pages: int, kv_bits: int = 16, dtype=np.float32, xp=np):
        if kv_bits not in (4, 8, 16):
            raise ValueError(f"kv_bits must be 4, 8 or 16, got {kv_bits}")
        self.num_pages = num_pages
        self.kv_bits = kv_bits
        self.dtype = dtype
        self.xp = xp
        shape = (num_pages, cfg.num_kv_heads, PAGE_SIZE, cfg.head_dim)
        layers = range(cfg.num_layers)
        if kv_bits == 16:
            self.k_pages = [xp.zeros(shape, dtype) for _ in layers]
            self.v_pages = [xp.zeros(shape, dtype) for _ in layers]
        else:
            self.k_codes = [xp.zeros(shape, xp.uint8) for _ in layers]
            self.v_codes = [xp.zeros(shape, xp.uint8) for _ in layers]
            self.k_scales = [xp.ones(shape[:3], xp.float16) for _ in layers]
            self.v_scales = [xp.ones(shape[:3], xp.float16) for _ in layers]
            self.k_zeros = [xp.zeros(shape[:3], xp.float16) for _ in layers]
            self.v_zeros = [xp.zeros(shape[:3], xp.float16) for _ in layers]

    @property
    def quantized(self) -> bool:
        return self.kv_bits != 16

    def write(self, layer: int, k, v, slot_mapping) -> None:
        """Store k, v [num_tokens, kv_heads, head_dim] at slot_mapping [num_tokens] (page * 64 + offset)."""
        slots = self.xp.asarray(slot_mapping)
        page, offset = slots // PAGE_SIZE, slots % PAGE_SIZE
        if not self.quantized:
            self.k_pages[layer][page, :, offset] = k
            self.v_pages[layer][page, :, offset] = v
            return
        for x, codes, scales, zeros in (
            (k, self.k_codes, self.k_scales, self.k_zeros),
            (v, self.v_codes, self.v_scales, self.v_zeros),
        ):
            c, s, z = kv_quantize(x, self.kv_bits, self.xp)
            codes[layer][page, :, offset] = c
            scales[layer][page, :, offset] = s
            zeros[layer][page, :, offset] = z

    def gather(self, layer: int, block_tables, length: int):
        """K and V of positions 0..length-1 of G sequences of equal length, pages block_tables [G, >= n]:
        two arrays [G, kv_heads, length, head_dim] in the model's dtype."""
        n = -(-length // PAGE_SIZE)
        pages = self.xp.asarray(block_tables)[:, :n]
        if not self.quantized:
            return self._contiguous(self.k_pages[layer][pages], length), self._contiguous(
                self.v_pages[layer][pages], length
            )
        out = []
        for codes, scales, zeros in (
            (self.k_codes, self.k_scales, self.k_zeros),
            (self.v_codes, self.v_scales, self.v_zeros),
        ):
            c = self._contiguous(codes[layer][pages], length)
            s = self._contiguous(scales[layer][pages][..., None], length)[..., 0]
            z = self._contiguous(zeros[layer][pages][..., None], length)[..., 0]
            out.append(kv_dequantize(c, s, z, self.xp).astype(self.dtype, copy=False))
        return out[0], out[1]

    @staticmethod
    def _contiguous(paged, length: int):
        """[G, n, KVH, 64, X] pages -> [G, KVH, length, X] tokens in order."""
        G, n, KVH, P, X = paged.shape
        return paged.transpose(0, 2, 1, 3, 4).reshape(G, KVH, n * P, X)[:, :, :length]
