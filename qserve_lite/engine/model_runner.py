"""ModelRunner (numpy): turns a scheduled batch into the model's packed inputs and returns next-token
logits. It owns the paged KV cache.

A batch is packed without padding: the new tokens of every sequence back to back (the whole uncached
sequence in a prefill step, the last token in a decode step), with their positions, the slot of each
token in the page pool, each sequence's block table and context length. Only the last token of each
sequence goes through lm_head. The GPU runner keeps this contract (run(seqs, is_prefill) -> logits on
the device) and swaps the array module, static buffers and kernels.
"""

from __future__ import annotations

import numpy as np

from qserve_lite.model.attention import PackedBatch, PagedAttention
from qserve_lite.model.llama import LlamaModel
from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.model.paged_kv_cache import PagedKVCache, page_bytes
from qserve_lite.engine.sequence import Sequence

CPU_KV_CACHE_BYTES = 2 << 30  # default page pool size on the CPU when num_pages is not given


def kv_bits_of(model: LlamaModel) -> int:
    q = model.kv_quantizer
    return q.bits if q is not None else 16


def pages_that_fit(
    per_page: int, max_num_seqs: int, max_model_len: int, memory_bytes: int = CPU_KV_CACHE_BYTES
) -> int:
    """As many pages of `per_page` bytes as `memory_bytes` holds, but no more than every sequence at full
    length needs (at least one)."""
    most = max_num_seqs * -(-max_model_len // PAGE_SIZE)
    return max(1, min(memory_bytes // per_page, most))


def default_num_pages(
    model: LlamaModel, max_num_seqs: int, max_model_len: int, memory_bytes: int = CPU_KV_CACHE_BYTES
) -> int:
    """The CPU page pool of `model` (pages_that_fit with this twin's page size)."""
    per_page = page_bytes(model.cfg, kv_bits_of(model), model.weights.embed_tokens.dtype)
    return pages_that_fit(per_page, max_num_seqs, max_model_len, memory_bytes)


class ModelRunner:
    def __init__(self, model: LlamaModel, num_pages: int):
        self.model = model
        self.xp = model.xp
        self.kv_cache = PagedKVCache(
            model.cfg, num_pages, kv_bits_of(model), dtype=model.weights.embed_tokens.dtype, xp=model.xp
        )

    @staticmethod
    def prepare(seqs: list[Sequence], is_prefill: bool):
        """Packed token ids, positions and the PackedBatch (slots, block tables) for the model."""
        tokens, positions, slots, query_start = [], [], [], [0]
        for seq in seqs:
            first = seq.num_cached_tokens if is_prefill else len(seq) - 1
            pos = np.arange(first, len(seq))
            table = np.asarray(seq.block_table)
            tokens.extend(seq.token_ids[first:])
            positions.append(pos)
            slots.append(table[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE)
            query_start.append(query_start[-1] + len(pos))
        max_pages = max(len(s.block_table) for s in seqs)
        block_tables = np.full((len(seqs), max_pages), -1, dtype=np.int64)
        for i, seq in enumerate(seqs):
            block_tables[i, : len(seq.block_table)] = seq.block_table
        batch = PackedBatch(
            query_start=np.asarray(query_start, dtype=np.int64),
            context_lens=np.asarray([len(s) for s in seqs], dtype=np.int64),
            block_tables=block_tables,
            slot_mapping=np.concatenate(slots).astype(np.int64),
        )
        return np.asarray(tokens, dtype=np.int64), np.concatenate(positions), batch

    def run(self, seqs: list[Sequence], is_prefill: bool):
        """Next-token logits [len(seqs), vocab] (fp32) after writing the batch's K/V into the pages."""
        token_ids, positions, batch = self.prepare(seqs, is_prefill)
        attn = PagedAttention(self.kv_cache, batch, fresh_new_kv=is_prefill)  # prefill as QServe runs it
        hidden = self.model.forward_packed(token_ids, positions, attn)
        last = hidden[self.xp.asarray(batch.query_start[1:] - 1)]
        return self.model.logits(last)
