"""A scheduled batch as the model's packed inputs, for both runners (numpy reference and GPU).

A batch is packed without padding: the new tokens of every sequence back to back (the whole uncached
sequence in a prefill step, the last token in a decode step), with their positions, the slot of each token
in the page pool, each sequence's block table and context length. Only the last token of each sequence
goes through lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.engine.sequence import Sequence
from qserve_lite.model.gpu_model import StepInputs


@dataclass
class PackedBatch:
    """Where each sequence of a packed batch sits. Its new tokens are packed rows
    query_start[i]:query_start[i+1]; it attends over context_lens[i] tokens (cached + new) whose pages
    are block_tables[i] (padded with -1); slot_mapping[j] = page * page_size + offset of packed token j."""

    token_ids: np.ndarray  # int64 [num_tokens]
    positions: np.ndarray  # int64 [num_tokens]
    query_start: np.ndarray  # int64 [num_seqs + 1] (cu_seqlens)
    context_lens: np.ndarray  # int64 [num_seqs]
    block_tables: np.ndarray  # int64 [num_seqs, max_pages]
    slot_mapping: np.ndarray  # int64 [num_tokens]
    is_prefill: bool
    # prefill rows whose input is given as an embedding (a VLM's image tokens): (packed rows int64 [n],
    # values [n, hidden] of the runner's module, one array per sequence); None when there are none
    embeds: tuple[np.ndarray, list] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_rows(self) -> np.ndarray:
        """The packed row of each sequence's last token."""
        return self.query_start[1:] - 1


def prepare(seqs: list[Sequence], is_prefill: bool, slots_for_decode_tokens: bool = False) -> PackedBatch:
    """Pack the new tokens of `seqs`: all uncached tokens in a prefill step, the last one in a decode step.
    slots_for_decode_tokens: a decode step's token_ids hold each sequence's slot instead of its last token
    (which may still be on the device: the runner gathers it from its per-slot state)."""
    if not is_prefill:
        return _prepare_decode(seqs, slots_for_decode_tokens)
    tokens, positions, slots, query_start = [], [], [], [0]
    embed_rows, embed_values = [], []
    for seq in seqs:
        first = seq.num_cached_tokens if is_prefill else len(seq) - 1
        if seq.prompt_embeds is not None:
            at, values = seq.prompt_embeds.from_position(first)
            if len(at):
                embed_rows.append(query_start[-1] + at - first)
                embed_values.append(values)
        pos = np.arange(first, len(seq))
        table = np.asarray(seq.block_table)
        if is_prefill or not slots_for_decode_tokens:
            tokens.extend(seq.token_ids[first:])
        else:
            tokens.append(seq.slot)
        positions.append(pos)
        slots.append(table[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE)
        query_start.append(query_start[-1] + len(pos))
    max_pages = max(len(s.block_table) for s in seqs)
    block_tables = np.full((len(seqs), max_pages), -1, dtype=np.int64)
    for i, seq in enumerate(seqs):
        block_tables[i, : len(seq.block_table)] = seq.block_table
    return PackedBatch(
        token_ids=np.asarray(tokens, dtype=np.int64),
        positions=np.concatenate(positions),
        query_start=np.asarray(query_start, dtype=np.int64),
        context_lens=np.asarray([len(s) for s in seqs], dtype=np.int64),
        block_tables=block_tables,
        slot_mapping=np.concatenate(slots).astype(np.int64),
        is_prefill=is_prefill,
        embeds=(np.concatenate(embed_rows), embed_values) if embed_rows else None,
    )


def _prepare_decode(seqs: list[Sequence], slots_for_tokens: bool) -> PackedBatch:
    """prepare() of a decode step, vectorized: one token per sequence, at position len(seq) - 1."""
    B = len(seqs)
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=B)
    max_pages = max(len(s.block_table) for s in seqs)
    block_tables = np.full((B, max_pages), -1, dtype=np.int64)
    for i, seq in enumerate(seqs):
        block_tables[i, : len(seq.block_table)] = seq.block_table
    positions = lens - 1
    slot_mapping = block_tables[np.arange(B), positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE
    if slots_for_tokens:
        tokens = np.fromiter((s.slot for s in seqs), dtype=np.int64, count=B)
    else:
        tokens = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int64, count=B)
    return PackedBatch(
        token_ids=tokens,
        positions=positions,
        query_start=np.arange(B + 1, dtype=np.int64),
        context_lens=lens,
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        is_prefill=False,
    )


def to_device(batch: PackedBatch, xp) -> StepInputs:
    """The batch as int32 arrays of xp, uploaded in one copy (one host buffer sliced into the fields)."""
    T, B = batch.num_tokens, batch.num_seqs
    host = np.concatenate([batch.token_ids, batch.positions, batch.slot_mapping, batch.query_start,
                           batch.context_lens, batch.block_tables.ravel()]).astype(np.int32)
    dev = xp.asarray(host)
    offs = np.cumsum([0, T, T, T, B + 1, B])
    tok, pos, slots, cu, ctx = (dev[offs[i] : offs[i + 1]] for i in range(5))
    qs = batch.query_start
    embed_rows = embed_values = None
    if batch.embeds is not None:
        rows, values = batch.embeds
        embed_rows = xp.asarray(rows.astype(np.int32))
        embed_values = values[0] if len(values) == 1 else xp.concatenate(values)
    return StepInputs(
        token_ids=tok,
        positions=pos,
        slot_mapping=slots,
        context_lens=ctx,
        block_tables=dev[offs[5] :].reshape(batch.block_tables.shape),
        cu_seqlens=cu,
        num_tokens=T,
        is_prefill=batch.is_prefill,
        max_seqlen_q=int((qs[1:] - qs[:-1]).max()),
        max_context=int(batch.context_lens.max()),
        embed_rows=embed_rows,
        embed_values=embed_values,
    )
