"""Decode steps of the GPU model replayed as CUDA graphs, one graph per padded batch bucket.

A bucket (1, 2, 4, 8, 16, 24, 32, 48, ... up to max_num_seqs) is captured at its first use over static int32
inputs (tokens, positions, slots, context lengths, block tables) that attend up to max_model_len tokens;
a batch of B sequences replays the smallest bucket >= B with its rows padded (padding rows write nothing,
slot -1, and attend to one token). Everything a captured step allocates comes from a memory pool of the
graph's own, and the split-K workspaces it writes are pinned (kernels/cuda/workspace.py) for the graph's
lifetime, so no memory the graph writes is ever handed out again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.engine.batch import PackedBatch
from qserve_lite.kernels.cuda.workspace import pin_workspaces, release_workspaces
from qserve_lite.model.gpu_model import GPULlama, StepInputs

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class DecodeGraph:
    graph: object  # cupy.cuda.Graph
    inputs: object  # int32 static inputs: tokens, positions, slots, context lengths, block tables
    logits: object  # fp32 [bucket, vocab], written by each replay
    keep: list  # the graph's memory pool and the split-K workspaces it writes


class DecodeGraphs:
    """The decode graphs of one GPULlama (cupy only)."""

    def __init__(self, model: GPULlama, max_num_seqs: int, max_pages: int):
        self.model = model
        self.xp = model.xp
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.max_pages = max_pages
        self.stream = self.xp.cuda.Stream(non_blocking=False)
        self.captured: dict[int, DecodeGraph] = {}

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def run(self, batch: PackedBatch):
        """Next-token logits [B, vocab] of a decode batch, by replaying its bucket's graph."""
        B = batch.num_seqs
        bucket = next(b for b in self.buckets if b >= B)
        graph = self.captured.get(bucket) or self._capture(bucket)
        host = self._host_inputs(bucket)
        tok, pos, slots, ctx, bt = self._views(host, bucket)
        tok[:B], pos[:B], slots[:B], ctx[:B] = (batch.token_ids, batch.positions, batch.slot_mapping,
                                                batch.context_lens)
        tables = batch.block_tables
        bt[:B, : tables.shape[1]] = np.maximum(tables, 0)  # -1 padding is never read; 0 is a valid page
        graph.inputs.set(host)
        graph.graph.launch()
        return graph.logits[:B].copy()

    def capture_up_to(self, max_batch: int | None = None) -> list[int]:
        """Capture now every bucket a batch of up to max_batch sequences (default: max_num_seqs) can use, so
        that no capture lands inside a timed run. Returns the buckets captured."""
        limit = self.buckets[-1] if max_batch is None else min(max_batch, self.buckets[-1])
        done = []
        for bucket in self.buckets:
            if bucket not in self.captured:
                self._capture(bucket)
                done.append(bucket)
            if bucket >= limit:
                break
        return done

    def release(self) -> None:
        """Drop the graphs, their memory pools and the split-K workspaces of the graph stream."""
        self.captured.clear()
        release_workspaces(self.stream)

    def _host_inputs(self, bucket: int) -> np.ndarray:
        host = np.zeros(bucket * (4 + self.max_pages), dtype=np.int32)
        tok, pos, slots, ctx, bt = self._views(host, bucket)
        slots[:] = -1
        ctx[:] = 1
        return host

    @staticmethod
    def _views(buf, b: int):
        return buf[:b], buf[b : 2 * b], buf[2 * b : 3 * b], buf[3 * b : 4 * b], buf[4 * b :].reshape(b, -1)

    def _capture(self, bucket: int) -> DecodeGraph:
        """Capture one decode step of `bucket` sequences, after an eager run of the same step (kernels
        compiled, the pool's blocks cached: no cudaMalloc while capturing)."""
        cp = self.xp
        inputs = cp.asarray(self._host_inputs(bucket))
        tok, pos, slots, ctx, bt = self._views(inputs, bucket)
        step_inputs = StepInputs(token_ids=tok, positions=pos, slot_mapping=slots, context_lens=ctx,
                                 block_tables=bt, cu_seqlens=None, num_tokens=bucket, is_prefill=False,
                                 max_seqlen_q=1, max_context=self.max_pages * PAGE_SIZE)
        stream, pool = self.stream, cp.cuda.MemoryPool()
        cp.cuda.Device().synchronize()
        with stream, cp.cuda.using_allocator(pool.malloc):
            self.model(step_inputs)
            stream.synchronize()
            stream.begin_capture()
            try:
                logits = self.model(step_inputs)
            finally:
                graph = stream.end_capture()
        stream.synchronize()
        self.captured[bucket] = DecodeGraph(graph, inputs, logits, [pool, *pin_workspaces(stream)])
        return self.captured[bucket]
