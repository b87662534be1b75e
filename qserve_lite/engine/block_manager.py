"""BlockManager: hands out the KV cache's 64-token pages to sequences and takes them back.

A sequence of n tokens in the cache holds ceil(n / 64) pages, listed in order in its block table. Pages
are taken on admission (the whole sequence to prefill) and one at a time as decoding crosses a page
boundary; all of a sequence's pages come back when it finishes, is aborted or is preempted. The
watermark keeps a few pages free at admission so running sequences can grow without thrashing.
"""

from __future__ import annotations

from collections import deque

from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.engine.sequence import Sequence


def pages_for(num_tokens: int, page_size: int = PAGE_SIZE) -> int:
    return -(-num_tokens // page_size)


class BlockManager:
    def __init__(self, num_pages: int, page_size: int = PAGE_SIZE, watermark: float = 0.01):
        assert num_pages > 0 and 0.0 <= watermark < 1.0
        self.num_pages = num_pages
        self.page_size = page_size
        self.watermark_pages = int(watermark * num_pages)
        self.free_pages: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def pages_missing(self, seq: Sequence) -> int:
        """Pages seq still needs so that all len(seq) tokens have a slot."""
        return pages_for(len(seq), self.page_size) - len(seq.block_table)

    def can_allocate(self, seq: Sequence, use_watermark: bool = True) -> bool:
        """Room to admit seq (all of its tokens), leaving the watermark free if asked."""
        reserve = self.watermark_pages if use_watermark else 0
        return self.num_free - self.pages_missing(seq) >= reserve

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"{seq} already holds pages"
        self._take(seq, self.pages_missing(seq))

    def can_append(self, seq: Sequence) -> bool:
        """Room for the slot of seq's newest token (a fresh page when it starts one)."""
        return self.pages_missing(seq) <= self.num_free

    def append(self, seq: Sequence) -> None:
        self._take(seq, self.pages_missing(seq))

    def free(self, seq: Sequence) -> None:
        """Return all of seq's pages; its K/V are gone (num_cached_tokens = 0)."""
        self.free_pages.extendleft(reversed(seq.block_table))  # reuse recently written pages first
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _take(self, seq: Sequence, n: int) -> None:
        assert 0 <= n <= self.num_free, f"{seq} needs {n} pages, {self.num_free} free"
        seq.block_table.extend(self.free_pages.popleft() for _ in range(n))
