"""ModelRunner (numpy): the reference runner. Turns a scheduled batch into the model's packed inputs
(engine/batch.py) and returns next-token logits [num_seqs, vocab] fp32; it owns the CPU paged KV cache.

The GPU runner keeps this contract (run(seqs, is_prefill) -> logits on the device) over the fused GPU model.
"""

from __future__ import annotations

from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.engine.batch import prepare
from qserve_lite.engine.sequence import Sequence
from qserve_lite.model.attention import PagedAttention
from qserve_lite.model.llama import LlamaModel
from qserve_lite.model.paged_kv_cache import PagedKVCache, page_bytes

CPU_KV_CACHE_BYTES = 2 << 30  # default page pool size on the CPU when num_pages is not given


def pages_that_fit(
    per_page: int, max_num_seqs: int, max_model_len: int, memory_bytes: int = CPU_KV_CACHE_BYTES
) -> int:
    """As many pages of `per_page` bytes as `memory_bytes` holds, but no more than every sequence at full
    length needs (at least one)."""
    most = max_num_seqs * -(-max_model_len // PAGE_SIZE)
    return max(1, min(memory_bytes // per_page, most))


def default_num_pages(model: LlamaModel, kv_bits: int, max_num_seqs: int, max_model_len: int,
                      memory_bytes: int = CPU_KV_CACHE_BYTES) -> int:
    """The CPU page pool of `model` (pages_that_fit with this twin's page size)."""
    per_page = page_bytes(model.cfg, kv_bits, model.weights.embed_tokens.dtype)
    return pages_that_fit(per_page, max_num_seqs, max_model_len, memory_bytes)


class ModelRunner:
    def __init__(self, model: LlamaModel, num_pages: int, kv_bits: int):
        self.model = model
        self.xp = model.xp
        self.num_pages = num_pages
        self.kv_cache = PagedKVCache(
            model.cfg, num_pages, kv_bits, dtype=model.weights.embed_tokens.dtype, xp=model.xp
        )

    def run(self, seqs: list[Sequence], is_prefill: bool):
        """Next-token logits [len(seqs), vocab] (fp32) after writing the batch's K/V into the pages."""
        batch = prepare(seqs, is_prefill)
        attn = PagedAttention(self.kv_cache, batch, fresh_new_kv=is_prefill)  # prefill as QServe runs it
        embeds = None
        if batch.embeds is not None:
            rows, values = batch.embeds
            embeds = (rows, self.xp.concatenate([self.xp.asarray(v) for v in values]))
        hidden = self.model.forward_packed(batch.token_ids, batch.positions, attn, input_embeds=embeds)
        return self.model.logits(hidden[self.xp.asarray(batch.last_rows)])
