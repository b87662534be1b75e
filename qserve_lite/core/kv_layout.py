"""The paged KV cache's vocabulary: PAGE_SIZE and the byte layout of one K or V page (KVPageLayout).

A page holds PAGE_SIZE consecutive tokens of one sequence, all kv heads; token position p of a sequence lives
in page block_table[p // PAGE_SIZE] at offset p % PAGE_SIZE (slot = page * PAGE_SIZE + p % PAGE_SIZE). The
byte layout of a page (codes, then fp16 scales, then fp16 zeros) is documented in kernels/paged_kv.py, whose
PagedKVPool holds the pages; the CUDA writer and attention kernels address them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 64  # tokens per page (the only size QServe's kernels support)


@dataclass(frozen=True)
class KVPageLayout:
    """Byte layout of one K or V page (see the module docstring)."""

    kv_bits: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        if self.kv_bits not in (4, 8, 16):
            raise ValueError(f"kv_bits must be 4, 8 or 16, got {self.kv_bits}")
        if self.head_dim % 16 or self.head_dim < 16:
            raise ValueError(f"head_dim must be a multiple of 16, got {self.head_dim}")

    @property
    def quantized(self) -> bool:
        return self.kv_bits != 16

    @property
    def row_bytes(self) -> int:
        """Bytes of one (kv head, token) vector."""
        return self.head_dim * self.kv_bits // 8

    @property
    def data_bytes(self) -> int:
        return self.num_kv_heads * PAGE_SIZE * self.row_bytes

    @property
    def scales_offset(self) -> int:
        return self.data_bytes

    @property
    def zeros_offset(self) -> int:
        return self.data_bytes + self.num_kv_heads * PAGE_SIZE * 2

    @property
    def page_bytes(self) -> int:
        return self.data_bytes + (self.num_kv_heads * PAGE_SIZE * 4 if self.quantized else 0)

    def kv_bytes_per_token(self) -> int:
        """Bytes a reader streams per token and kv head for K and V together (codes + scale + zero)."""
        return 2 * (self.row_bytes + (4 if self.quantized else 0))
