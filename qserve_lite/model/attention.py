"""Attention KV backends: where one forward call's keys and values go, and where attention reads them.

The forward (llama.py) computes q, k, v and RoPE, calls `backend.write(layer, k, v)` with
k, v [B, T, KVH, D], then for each `(index, k_ctx, v_ctx, start)` of `backend.contexts(layer)` runs the one
fp32 attention routine on `q[index]` against k_ctx, v_ctx [G, KVH, S, D] (queries at positions
start..start+T-1) and stores the result in `out[index]`. Two backends:

- `ContiguousAttention`: a `KVCache` ([batch, kv_heads, max_len, head_dim] per layer) and one start
  position shared by the batch (the reference forward, perplexity, calibration). One context: the batch.
- `PagedAttention`: a packed variable-length batch (B = 1, T = every sequence's new tokens back to back)
  over a `PagedKVCache`; writes go to `slot_mapping`, reads gather each sequence's pages by block table.
  Sequences with equal (new tokens, context length) form one context: the batched matmul runs the same
  per-matrix products, so each sequence gets exactly what it would get alone or from a contiguous cache.

`fresh_new_kv` (both backends): the call's own new tokens attend to their fresh (unquantized) K/V, and only
the tokens cached before the call come back dequantized from a KV4/KV8 cache. That is what QServe's prefill
does (and our GPU prefill kernel): the engines run prefill steps this way and decode steps (one new token,
read back from the cache like the rest) without it. Perplexity and calibration leave it off, so every
token attends to quantized K/V, as deepcompressor evaluates KV quantization.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class AttentionBackend:
    """Interface: write(layer, k, v) then contexts(layer) -> (index, k_ctx, v_ctx, start) tuples."""

    def write(self, layer: int, k, v) -> None:
        raise NotImplementedError

    def contexts(self, layer: int) -> Iterator[tuple]:
        raise NotImplementedError


class ContiguousAttention(AttentionBackend):
    """A contiguous cache (`KVCache`, or anything with its write/read) whose sequences all hold `start`
    tokens before this call."""

    def __init__(self, cache, start: int, fresh_new_kv: bool = False):
        self.cache = cache
        self.start = start
        self._end = start
        # only a quantizing cache changes what it gives back; a float cache returns its own storage
        self.fresh_new_kv = fresh_new_kv and getattr(cache, "quantizer", None) is not None
        self._fresh = None

    def write(self, layer: int, k, v) -> None:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, T, D]
        self.cache.write(layer, k, v, self.start)
        self._end = self.start + k.shape[2]
        self._fresh = (k, v) if self.fresh_new_kv else None

    def contexts(self, layer: int):
        k_all, v_all = self.cache.read(layer, self._end)  # [B, KVH, S, D]
        if self._fresh is not None:  # read() returns views of the cache: overlay on copies
            k_all, v_all = k_all.copy(), v_all.copy()
            k_all[:, :, self.start :], v_all[:, :, self.start :] = self._fresh
        yield slice(None), k_all, v_all, self.start


def as_backend(cache, start: int) -> AttentionBackend:
    """A backend passes through; a plain cache (write/read by start position) gets the contiguous one."""
    return cache if isinstance(cache, AttentionBackend) else ContiguousAttention(cache, start)


class PagedAttention(AttentionBackend):
    """A packed variable-length batch over a paged cache (see the module docstring)."""

    def __init__(self, kv_cache, batch, fresh_new_kv: bool = False):
        """batch: a packed batch's layout (engine/batch.PackedBatch: query_start, context_lens,
        block_tables, slot_mapping)."""
        self.kv_cache = kv_cache
        self.batch = batch
        self.fresh_new_kv = fresh_new_kv and kv_cache.quantized
        self._fresh = None
        qs, ctx = batch.query_start, batch.context_lens
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip((qs[1:] - qs[:-1]).tolist(), ctx.tolist(), strict=True)):
            shapes.setdefault(key, []).append(i)
        # per shape group: (sequence indices, packed rows [G, T], context length L, first new position)
        self.groups = []
        for (T, L), members in shapes.items():
            members = np.asarray(members)
            rows = qs[members][:, None] + np.arange(T)[None, :]
            self.groups.append((members, rows, L, L - T))

    def write(self, layer: int, k, v) -> None:
        assert k.shape[0] == 1, "a packed batch has batch dimension 1"
        self.kv_cache.write(layer, k[0], v[0], self.batch.slot_mapping)
        self._fresh = (k[0], v[0]) if self.fresh_new_kv else None  # [N, KVH, D]

    def contexts(self, layer: int):
        for members, rows, L, start in self.groups:
            k_ctx, v_ctx = self.kv_cache.gather(layer, self.batch.block_tables[members], L)
            if self._fresh is not None:  # rows [G, T] -> [G, T, KVH, D] -> [G, KVH, T, D]
                k_ctx[:, :, start:] = self._fresh[0][rows].transpose(0, 2, 1, 3)
                v_ctx[:, :, start:] = self._fresh[1][rows].transpose(0, 2, 1, 3)
            yield (0, rows), k_ctx, v_ctx, start
