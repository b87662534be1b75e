"""Contiguous KV cache for the reference forward: per layer K and V of [batch, kv_heads, max_len, head_dim].

All sequences in a batch share one length (prefill of equal-length chunks, or lock-step decode).
With a quantizer, every K/V entry is stored as its dequantized KV4/KV8 value, and attention (prefill
included) reads those: the deepcompressor evaluation protocol.
The paged KV4/KV8 cache of the GPU engine lives elsewhere; this is the simple exact oracle.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.model_config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, xp=np, dtype=np.float32, quantizer=None):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [xp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        self.v = [xp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        self.batch = batch
        self.max_len = max_len
        self.length = 0  # tokens already stored (same for every sequence)
        self.quantizer = quantizer  # fake-quantizes K/V on write (KV4/KV8 emulation); None keeps them exact

    def write(self, layer: int, k, v, start: int) -> None:
        """Store k, v [batch, kv_heads, T, head_dim] at positions start..start+T-1."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        if self.quantizer is not None:
            k, v = self.quantizer(k), self.quantizer(v)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v

    def read(self, layer: int, end: int):
        """K and V of positions 0..end-1."""
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
