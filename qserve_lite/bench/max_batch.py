"""--max-batch arithmetic: the largest batch whose KV pages and runner buffers fit in the GPU memory the
weights leave.

Per sequence: its KV pages at full length (prompt + generated tokens), every layer, K and V, in the pool's
page layout (core/kv_layout.KVPageLayout). Per batch: the GPU model's preallocated activation buffers
(model/gpu_model) and a step's temporaries for max(max_num_batched_tokens, batch) tokens
(engine/gpu_model_runner), plus the decode CUDA graph's own memory pool (one step's temporaries and its fp32
logits for `batch` rows). The throughput benchmark then confirms the batch by running it and steps down on an
out-of-memory error.
"""

from __future__ import annotations

from qserve_lite.core.kv_layout import KVPageLayout
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.engine.block_manager import pages_for
from qserve_lite.engine.gpu_model_runner import temporary_bytes
from qserve_lite.model.gpu_model import activation_buffer_bytes

MAX_BATCH_LIMIT = 4096  # the search's upper end


def kv_bytes_per_sequence(cfg: ModelConfig, kv_bits: int, seq_len: int) -> int:
    """KV pool bytes one sequence of seq_len tokens holds (whole 64-token pages, all layers, K and V)."""
    layout = KVPageLayout(kv_bits, cfg.num_kv_heads, cfg.head_dim)
    return pages_for(seq_len) * cfg.num_layers * 2 * layout.page_bytes


def runner_bytes(cfg: ModelConfig, batch: int, max_num_batched_tokens: int) -> int:
    """The runner's memory besides weights and KV pages, for a batch of `batch` sequences."""
    max_tokens = max(max_num_batched_tokens, batch)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    graph_pool = batch * (8 * h + 4 * inter + 64 + 4 * cfg.vocab_size)
    return activation_buffer_bytes(cfg, max_tokens) + temporary_bytes(cfg, max_tokens, batch) + graph_pool


def batch_bytes(cfg: ModelConfig, kv_bits: int, seq_len: int, batch: int, max_num_batched_tokens: int) -> int:
    """Everything a batch needs besides the weights: KV pages + runner buffers."""
    return batch * kv_bytes_per_sequence(cfg, kv_bits, seq_len) + runner_bytes(
        cfg, batch, max_num_batched_tokens
    )


def max_batch(
    budget_bytes: int,
    cfg: ModelConfig,
    kv_bits: int,
    seq_len: int,
    max_num_batched_tokens: int,
    limit: int = MAX_BATCH_LIMIT,
) -> int:
    """The largest batch (<= limit) with batch_bytes <= budget_bytes; 0 if not even one sequence fits."""

    def fits(b: int) -> bool:
        return batch_bytes(cfg, kv_bits, seq_len, b, max_num_batched_tokens) <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, limit  # fits(lo) holds
    if fits(hi):
        return hi
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
