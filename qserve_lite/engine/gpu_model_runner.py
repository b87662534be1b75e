"""GPUModelRunner: the CuPy runner. Same contract as engine/model_runner.ModelRunner (run(seqs, is_prefill) ->
next-token logits [num_seqs, vocab] fp32, here on the device; `xp` is cupy), with QServe's fused kernels.

Weights: a DeviceWeights (model/gpu_model.py), in the layouts the kernels take: uploaded once from a
loaded model (model/loader.load_model; packed W4 qweights with q/k/v and gate/up concatenated along the
output channels, int8 W8A8 weights, fp16 for float linears, embeddings, lm_head and norms), or built with
random values directly on the device (model/random_weights.py).

One decoder layer on a packed batch of T tokens (kernels/*):
    rms_norm_quant(x + residual)  -> qkv GEMM (fp16 out) -> rope_write_kv (RoPE in place, then the per-head
    Hadamard on q and k when the model has k_hadamard; K/V into the pages)
    -> prefill_attention (varlen, cu_seqlens) | decode_attention (block tables) -> quantize_per_token
    -> o_proj GEMM -> rms_norm_quant(o + residual) -> gate_up GEMM -> silu_mul_quant -> down GEMM
Then the final RMSNorm and the fp16 lm_head GEMM run on each sequence's last token only. Float models
(w16a16, w16a16kv4/kv8) take the same path with fp16 GEMMs and no activation quantization.

GEMM and attention outputs go to buffers preallocated for max(max_num_batched_tokens, max_num_seqs) tokens;
the row kernels (norm, quantization) still allocate from cupy's pool. Prefill runs eagerly; decode steps are
captured as CUDA graphs, one per padded batch bucket (1, 2, 4, 8, 16, 24, 32, 48, ... up to max_num_seqs),
over static inputs, at first use of the bucket (QSERVE_LITE_CUDA_GRAPHS=0 keeps decode eager).

KV pool: as many 64-token pages as `gpu_memory_utilization` of the device's memory leaves after weights,
buffers and a reserve (capped at what every sequence at full length needs); NUM_GPU_PAGE_BLOCKS (or
num_pages) overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.io.loader import LoadedModel
from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.core.rope import rope_inv_freq
from qserve_lite.core.kv_layout import KVPageLayout
from qserve_lite.kernels.cuda.workspace import pin_workspaces, release_workspaces
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.model.gpu_model import DeviceLayer, DeviceLinear, DeviceWeights, check_head_dim, fuse_linears
from qserve_lite.engine.model_runner import ModelRunner
from qserve_lite.engine.sequence import Sequence

__all__ = ["DeviceLayer", "DeviceLinear", "DeviceWeights", "GPUModelRunner", "fuse_linears"]

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
RESERVED_BYTES = 512 << 20  # kernel workspaces, row-kernel outputs, sampler temporaries, fragmentation


@dataclass
class DecodeGraph:
    graph: object  # cupy.cuda.Graph
    inputs: object  # int32 static inputs: tokens, positions, slots, context lengths, block tables
    logits: object  # fp32 [bucket, vocab], written by each replay
    keep: list  # the graph's memory pool and the split-K workspaces it writes


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def activation_buffer_bytes(cfg: ModelConfig, max_tokens: int) -> int:
    """The runner's preallocated fp16 GEMM / attention output buffers for max_tokens tokens."""
    qkv_n = cfg.q_size + 2 * cfg.kv_size
    return 2 * max_tokens * (qkv_n + cfg.q_size + 2 * cfg.hidden_size + 2 * cfg.intermediate_size)


def temporary_bytes(cfg: ModelConfig, max_tokens: int, max_num_seqs: int) -> int:
    """An estimate of what one step allocates besides the buffers (row-kernel outputs, quantized
    activations, logits and sampler temporaries)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    return max_tokens * (8 * h + 4 * inter + 64) + max_num_seqs * cfg.vocab_size * 16


def env_num_pages() -> int | None:
    raw = os.environ.get("NUM_GPU_PAGE_BLOCKS")
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise QServeLiteError(f"NUM_GPU_PAGE_BLOCKS must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise QServeLiteError(f"NUM_GPU_PAGE_BLOCKS must be a positive integer, got {raw!r}")
    return value


class GPUModelRunner:
    """The model on one CUDA device (cupy), with its paged KV pool and activation buffers."""

    def __init__(
        self,
        model: LoadedModel | DeviceWeights,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        num_pages: int | None = None,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        xp=None,
        cuda_graphs: bool | None = None,
    ):
        """model: a loaded model (its weights are uploaded here) or DeviceWeights already on the device (of
        the same array module). xp: cupy (default). numpy runs the same fused-op sequence on the kernels'
        numpy twins (a check of the runner itself on the CPU; needs num_pages). cuda_graphs: replay decode
        steps as CUDA graphs (default: on; QSERVE_LITE_CUDA_GRAPHS=0 turns them off)."""
        if xp is None:
            import cupy as xp
        cp = xp
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise QServeLiteError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.xp = cp
        cfg = self.cfg = model.config
        check_head_dim(cfg)
        weights = model if isinstance(model, DeviceWeights) else DeviceWeights.from_loaded(model, cp)
        self.weights = weights
        self.H, self.KVH, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.kv_bits = weights.kv_bits
        self.k_hadamard = bool(weights.k_hadamard)  # q / k Hadamard rotation in the KV writer
        self.eps = float(cfg.rms_norm_eps)
        self.layers = weights.layers
        self.mode = weights.mode
        self.float_acts = self.mode == "f16"
        self.need_sums = self.mode == "w4_per_channel"
        self.embed = weights.embed
        self.lm_head = weights.lm_head
        self.lm_head_bias = weights.lm_head_bias
        self.final_norm = weights.final_norm
        self.inv_freq = cp.asarray(rope_inv_freq(cfg), dtype=cp.float64)

        f16 = cp.float16
        self.max_tokens = max(max_num_batched_tokens, max_num_seqs)
        T, h = self.max_tokens, cfg.hidden_size
        qkv_n, gu_n = self.layers[0].qkv.n, self.layers[0].gate_up.n
        self.qkv_buf = cp.empty((T, qkv_n), dtype=f16)
        self.attn_buf = cp.empty((T, self.H, self.D), dtype=f16)
        self.o_buf = cp.empty((T, h), dtype=f16)
        self.gate_up_buf = cp.empty((T, gu_n), dtype=f16)
        self.down_buf = cp.empty((T, h), dtype=f16)

        if cuda_graphs is None:
            cuda_graphs = os.environ.get("QSERVE_LITE_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = bool(cuda_graphs) and cp is not np
        self.graph_buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.max_pages = -(-max_model_len // PAGE_SIZE)
        self.max_context = self.max_pages * PAGE_SIZE
        self.graphs: dict[int, DecodeGraph] = {}
        self.graph_stream = cp.cuda.Stream(non_blocking=False) if self.cuda_graphs else None

        self.layout = KVPageLayout(self.kv_bits, self.KVH, self.D)
        self.num_pages = self._choose_num_pages(
            num_pages, max_num_seqs, max_num_batched_tokens, max_model_len, gpu_memory_utilization
        )
        try:
            self.kv_pool = PagedKVPool(
                len(self.layers),
                self.num_pages,
                self.KVH,
                self.D,
                self.kv_bits,
                xp=cp,
                fill=0 if cp is np else None,  # the twin dequantizes whole pages: no garbage NaNs
            )
        except MemoryError:  # cupy's OutOfMemoryError is one
            raise DeviceError(
                f"the KV pool of {self.num_pages} pages does not fit in GPU memory; lower "
                "NUM_GPU_PAGE_BLOCKS / num_pages or gpu_memory_utilization"
            ) from None

    def _choose_num_pages(self, num_pages, max_num_seqs, max_num_batched_tokens, max_model_len, util) -> int:
        cp = self.xp
        per_page = len(self.layers) * 2 * self.layout.page_bytes
        one_batch = -(-min(max_model_len, max_num_batched_tokens) // PAGE_SIZE)
        given = num_pages if num_pages is not None else env_num_pages()
        if given is not None:
            return int(given)
        if cp is np:
            raise QServeLiteError("the numpy twin of the GPU runner needs num_pages")
        cp.get_default_memory_pool().free_all_blocks()
        free, total = cp.cuda.runtime.memGetInfo()
        temporaries = temporary_bytes(self.cfg, self.max_tokens, max_num_seqs)
        budget = int(total * util) - (total - free) - RESERVED_BYTES - temporaries
        pages = min(max(budget, 0) // per_page, max_num_seqs * -(-max_model_len // PAGE_SIZE))
        if pages < one_batch:
            raise DeviceError(
                f"the KV cache does not fit: {max(budget, 0) / 2**20:.0f} MiB of GPU memory are left for it "
                f"(gpu_memory_utilization {util}), {pages} pages of {PAGE_SIZE} tokens, but one sequence of "
                f"{min(max_model_len, max_num_batched_tokens)} tokens needs {one_batch}. Raise "
                "gpu_memory_utilization, lower max_model_len, or set NUM_GPU_PAGE_BLOCKS"
            )
        return int(pages)

    # ---- the step ----

    def run(self, seqs: list[Sequence], is_prefill: bool):
        """Next-token logits [len(seqs), vocab] fp32 on the device; writes the batch's K/V to the pages."""
        cp = self.xp
        if not is_prefill and self.cuda_graphs and len(seqs) <= self.graph_buckets[-1]:
            return self._run_decode_graph(seqs)
        token_ids, positions, batch = ModelRunner.prepare(seqs, is_prefill)
        T = len(token_ids)
        assert T <= self.max_tokens, (T, self.max_tokens)
        qs = batch.query_start
        host = np.concatenate(
            [token_ids, positions, batch.slot_mapping, qs, batch.context_lens, batch.block_tables.ravel()]
        ).astype(np.int32)
        dev = cp.asarray(host)
        B = len(seqs)
        offs = np.cumsum([0, T, T, T, B + 1, B])
        tok, pos, slots, cu, ctx = (dev[offs[i] : offs[i + 1]] for i in range(5))
        block_tables = dev[offs[5] :].reshape(batch.block_tables.shape)
        max_q = int((qs[1:] - qs[:-1]).max())
        max_ctx = int(batch.context_lens.max())
        x, residual = self._forward(tok, pos, slots, cu, ctx, block_tables, T, is_prefill, max_q, max_ctx)
        last = cu[1:] - 1
        return self._logits(x[last], residual[last])

    def _norm(self, x, residual, gamma):
        """(the next linear's input, the new residual stream)."""
        from qserve_lite.kernels.norm_quant import rms_norm, rms_norm_quant

        if self.float_acts:
            return rms_norm(x, gamma, self.eps, residual=residual, xp=self.xp)
        return rms_norm_quant(x, gamma, self.eps, residual=residual, xp=self.xp, with_sums=self.need_sums)

    def _forward(self, tok, pos, slots, cu, ctx, block_tables, T, is_prefill, max_q, max_ctx):
        """The decoder layers on T packed tokens -> (last hidden, residual stream)."""
        from qserve_lite.kernels.act_quant import quantize_per_token, silu_mul, silu_mul_quant
        from qserve_lite.kernels.attention import decode_attention, prefill_attention, rope_write_kv

        cp = self.xp
        H, KVH, D = self.H, self.KVH, self.D
        qs_n, kv_n = H * D, KVH * D
        x = self.embed[tok]
        residual = None
        for i, layer in enumerate(self.layers):
            act, residual = self._norm(x, residual, layer.input_norm)
            qkv = layer.qkv(act, self.qkv_buf[:T])
            q = qkv[:, :qs_n].reshape(T, H, D)
            k = qkv[:, qs_n : qs_n + kv_n].reshape(T, KVH, D)
            v = qkv[:, qs_n + kv_n :].reshape(T, KVH, D)
            rope_write_kv(q, k, v, pos, self.inv_freq, self.kv_pool, i, slots, k_hadamard=self.k_hadamard)
            out = self.attn_buf[:T]
            if is_prefill:
                attn = prefill_attention(
                    q, k, v, cu, ctx, self.kv_pool, i, block_tables, max_seqlen_q=max_q, out=out
                )
            else:
                attn = decode_attention(q, self.kv_pool, i, block_tables, ctx, max_context=max_ctx, out=out)
            attn = attn.reshape(T, qs_n)
            act = attn if self.float_acts else quantize_per_token(attn, cp, self.need_sums)
            o = layer.o_proj(act, self.o_buf[:T])
            act, residual = self._norm(o, residual, layer.post_attn_norm)
            gate_up = layer.gate_up(act, self.gate_up_buf[:T])
            act = silu_mul(gate_up, cp) if self.float_acts else silu_mul_quant(gate_up, cp, self.need_sums)
            x = layer.down(act, self.down_buf[:T])
        return x, residual

    def _logits(self, x, residual):
        from qserve_lite.kernels.fp16_gemm import fp16_gemm
        from qserve_lite.kernels.norm_quant import rms_norm

        y, _ = rms_norm(x, self.final_norm, self.eps, residual=residual, xp=self.xp)
        return fp16_gemm(y, self.lm_head, self.lm_head_bias, out_dtype=np.float32, xp=self.xp)

    # ---- decode as CUDA graphs, one per padded batch bucket ----

    def _run_decode_graph(self, seqs: list[Sequence]):
        B = len(seqs)
        bucket = next(b for b in self.graph_buckets if b >= B)
        graph = self.graphs.get(bucket) or self._capture(bucket)
        token_ids, positions, batch = ModelRunner.prepare(seqs, False)
        host = self._graph_inputs(bucket)
        tok, pos, slots, ctx, bt = self._graph_views(host, bucket)
        tok[:B], pos[:B], slots[:B], ctx[:B] = token_ids, positions, batch.slot_mapping, batch.context_lens
        tables = batch.block_tables
        bt[:B, : tables.shape[1]] = np.maximum(tables, 0)  # -1 padding is never read; 0 is a valid page
        graph.inputs.set(host)
        graph.graph.launch()
        return graph.logits[:B].copy()

    def capture_decode_graphs(self, max_batch: int | None = None) -> list[int]:
        """Capture now the decode graphs of every bucket a batch of up to max_batch sequences (default:
        max_num_seqs) can use, so that no capture lands inside a timed run. Returns the buckets captured."""
        if not self.cuda_graphs:
            return []
        limit = self.graph_buckets[-1] if max_batch is None else min(max_batch, self.graph_buckets[-1])
        captured = []
        for bucket in self.graph_buckets:
            if bucket not in self.graphs:
                self._capture(bucket)
                captured.append(bucket)
            if bucket >= limit:
                break
        return captured

    def release_graphs(self) -> None:
        """Drop the decode graphs, their memory pools and the split-K workspaces of the graph stream (a
        benchmark building several runners in one process)."""
        self.graphs.clear()
        if self.graph_stream is not None:
            release_workspaces(self.graph_stream)

    def _graph_inputs(self, bucket: int) -> np.ndarray:
        """Host inputs of a padded batch: padding rows write nothing (slot -1) and attend to one token."""
        host = np.zeros(bucket * (4 + self.max_pages), dtype=np.int32)
        tok, pos, slots, ctx, bt = self._graph_views(host, bucket)
        slots[:] = -1
        ctx[:] = 1
        return host

    def _graph_views(self, buf, bucket: int):
        b = bucket
        return buf[:b], buf[b : 2 * b], buf[2 * b : 3 * b], buf[3 * b : 4 * b], buf[4 * b :].reshape(b, -1)

    def _capture(self, bucket: int) -> DecodeGraph:
        """Capture one decode step of `bucket` sequences over static inputs (attending up to max_model_len
        tokens). Everything the step allocates comes from a memory pool of the graph's own, warmed by an eager
        run of the same step first (kernels compiled, blocks cached: no cudaMalloc while capturing); no one
        else allocates from that pool, so no memory the graph writes is ever handed out again."""
        cp = self.xp
        inputs = cp.asarray(self._graph_inputs(bucket))
        tok, pos, slots, ctx, bt = self._graph_views(inputs, bucket)
        stream, pool = self.graph_stream, cp.cuda.MemoryPool()

        def step():
            x, residual = self._forward(tok, pos, slots, None, ctx, bt, bucket, False, 1, self.max_context)
            return self._logits(x, residual)

        cp.cuda.Device().synchronize()
        with stream, cp.cuda.using_allocator(pool.malloc):
            step()
            stream.synchronize()
            stream.begin_capture()
            try:
                logits = step()
            finally:
                graph = stream.end_capture()
        stream.synchronize()
        keep = [pool, *pin_workspaces(stream)]  # split-K workspaces (per stream) may be regrown later
        self.graphs[bucket] = DecodeGraph(graph, inputs, logits, keep)
        return self.graphs[bucket]
