"""GPUModelRunner: the CuPy runner. Same contract as engine/model_runner.ModelRunner (run(seqs, is_prefill) ->
next-token logits [num_seqs, vocab] fp32, here on the device; `xp` is cupy).

It owns what the GPU model runs over: the paged KV pool, sized here, the GPU model (model/gpu_model.GPULlama:
device weights, activation buffers, the fused forward) and the decode CUDA graphs (DecodeGraphs, below).
Prefill runs eagerly; decode steps replay a CUDA graph per padded batch bucket (EngineConfig.cuda_graphs,
QSERVE_LITE_CUDA_GRAPHS=0 keeps decode eager).

Decode CUDA graphs: a bucket (1, 2, 4, 8, 16, 24, 32, 48, ... up to max_num_seqs) is captured at its first use
over static int32 inputs (tokens, positions, slots, context lengths, block tables) that attend up to
max_model_len tokens; a batch of B sequences replays the smallest bucket >= B with its rows padded (padding
rows write nothing, slot -1, and attend to one token). Everything a captured step allocates comes from a
memory pool of the graph's own, and the split-K workspaces it writes are pinned
(kernels/cuda/workspace.py) for the graph's lifetime, so no memory the graph writes is ever handed out again.

Weights come uploaded from a loaded model (io/loader.load_model) or as DeviceWeights already on the device
(model/random_weights.py).

KV pool: as many 64-token pages as `gpu_memory_utilization` of the device's memory leaves after weights,
buffers and a reserve (capped at what every sequence at full length needs); NUM_GPU_PAGE_BLOCKS (or
num_pages) overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.core.kv_layout import PAGE_SIZE, KVPageLayout
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.engine.batch import PackedBatch, prepare, to_device
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.sequence import Sequence
from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.io.loader import LoadedModel
from qserve_lite.kernels.cuda.workspace import pin_workspaces, release_workspaces
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.model.gpu_model import DeviceWeights, GPULlama, StepInputs, check_head_dim

RESERVED_BYTES = 512 << 20  # kernel workspaces, row-kernel outputs, sampler temporaries, fragmentation


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


def choose_num_pages(cfg: ModelConfig, layout: KVPageLayout, config: EngineConfig, xp) -> int:
    """The KV pool's pages: config.num_pages, NUM_GPU_PAGE_BLOCKS, or what gpu_memory_utilization of the
    device leaves after what is allocated now (the weights) and the step's buffers (module docstring)."""
    given = config.num_pages if config.num_pages is not None else env_num_pages()
    if given is not None:
        return int(given)
    if xp is np:
        raise QServeLiteError("the numpy twin of the GPU runner needs num_pages")
    per_page = cfg.num_layers * 2 * layout.page_bytes
    max_len, util = config.max_model_len, config.gpu_memory_utilization
    one_batch = -(-min(max_len, config.max_num_batched_tokens) // PAGE_SIZE)
    xp.get_default_memory_pool().free_all_blocks()
    free, total = xp.cuda.runtime.memGetInfo()
    max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
    temporaries = temporary_bytes(cfg, max_tokens, config.max_num_seqs)
    budget = int(total * util) - (total - free) - RESERVED_BYTES - temporaries
    pages = min(max(budget, 0) // per_page, config.max_num_seqs * -(-max_len // PAGE_SIZE))
    if pages < one_batch:
        raise DeviceError(
            f"the KV cache does not fit: {max(budget, 0) / 2**20:.0f} MiB of GPU memory are left for it "
            f"(gpu_memory_utilization {util}), {pages} pages of {PAGE_SIZE} tokens, but one sequence of "
            f"{min(max_len, config.max_num_batched_tokens)} tokens needs {one_batch}. Raise "
            "gpu_memory_utilization, lower max_model_len, or set NUM_GPU_PAGE_BLOCKS"
        )
    return int(pages)


def slot_array(seqs: list[Sequence]) -> np.ndarray:
    """int32 [len(seqs)]: each sequence's scheduler slot (its row of last_tokens)."""
    return np.fromiter((s.slot for s in seqs), dtype=np.int32, count=len(seqs))


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

    def run(self, batch: PackedBatch, last_tokens):
        """Next-token logits [B, vocab] of a decode batch, by replaying its bucket's graph. batch.token_ids
        holds slots: each row's token is gathered from last_tokens on the device. The logits stay valid until
        the next replay of the same bucket."""
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
        tokens = graph.inputs[:B]
        tokens[...] = last_tokens[tokens]
        graph.graph.launch()
        return None if graph.logits is None else graph.logits[:B]

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


class GPUModelRunner:
    """The model on one CUDA device (cupy), with its paged KV pool and decode graphs."""

    def __init__(self, model: LoadedModel | DeviceWeights, config: EngineConfig | None = None, *, xp=None,
                 comm=None, with_logits: bool = True, **overrides):
        """model: a loaded model (its weights are uploaded here) or DeviceWeights already on the device (of
        the same array module). config (+ EngineConfig field overrides): max_num_batched_tokens,
        max_num_seqs and max_model_len must be given (LLMEngine resolves them). xp: cupy (default); numpy
        runs the same forward on the kernels' numpy twins (a check of the runner on the CPU; needs num_pages,
        no CUDA graphs). comm, with_logits: one rank of tensor parallelism (engine/tensor_parallel.py: the
        weights are the rank's shard, and only rank 0 computes logits)."""
        config = (config or EngineConfig()).replace(**overrides)
        if config.max_num_batched_tokens is None or config.max_model_len is None:
            raise QServeLiteError("GPUModelRunner needs max_num_batched_tokens and max_model_len")
        self.engine_config = config
        cp = self.xp = xp if xp is not None else import_cupy()
        cfg = self.cfg = model.config
        check_head_dim(cfg)
        if isinstance(model, DeviceWeights):
            weights = model
        else:
            weights = DeviceWeights.from_host(cfg, model.weights, model.precision, cp, model.k_hadamard)
        self.weights = weights
        self.k_hadamard = bool(weights.k_hadamard)
        self.max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        self.layout = KVPageLayout(weights.kv_bits, cfg.num_kv_heads, cfg.head_dim)
        self.num_pages = self._choose_num_pages(config)
        try:
            self.kv_pool = PagedKVPool(
                cfg.num_layers, self.num_pages, cfg.num_kv_heads, cfg.head_dim, weights.kv_bits, xp=cp,
                fill=0 if cp is np else None,  # the twin dequantizes whole pages: no garbage NaNs
            )
        except MemoryError:  # cupy's OutOfMemoryError is one
            raise DeviceError(
                f"the KV pool of {self.num_pages} pages does not fit in GPU memory; lower "
                "NUM_GPU_PAGE_BLOCKS / num_pages or gpu_memory_utilization"
            ) from None
        self.model = GPULlama(weights, self.kv_pool, self.max_tokens, cp, comm=comm, with_logits=with_logits)
        self.decode_graphs = None
        if cp is not np:
            max_pages = -(-config.max_model_len // PAGE_SIZE)
            self.decode_graphs = DecodeGraphs(self.model, config.max_num_seqs, max_pages)
        self.cuda_graphs = config.cuda_graphs and self.decode_graphs is not None
        # each running sequence's newest token, by its scheduler slot: decode steps read their input from
        # here, so a step can be queued before the host knows the previous step's tokens (llm_engine.py)
        self.last_tokens = cp.zeros(max(1, config.max_num_seqs), dtype=cp.int32)

    def _choose_num_pages(self, config: EngineConfig) -> int:
        return choose_num_pages(self.cfg, self.layout, config, self.xp)

    @property
    def graph_stream(self):
        """The stream decode graphs are captured on (None without CUDA graphs support: numpy)."""
        return None if self.decode_graphs is None else self.decode_graphs.stream

    @property
    def graphs(self) -> dict:
        """The captured decode graphs by bucket."""
        return {} if self.decode_graphs is None else self.decode_graphs.captured

    def run(self, seqs: list[Sequence], is_prefill: bool):
        """Next-token logits [len(seqs), vocab] fp32 on the device; writes the batch's K/V to the pages. A
        decode step reads each sequence's input token from last_tokens (store_tokens), so it may still be on
        the device."""
        return self.run_batch(prepare(seqs, is_prefill, slots_for_decode_tokens=True))

    def run_batch(self, batch: PackedBatch):
        """run() of a packed batch (decode token ids are slots of last_tokens); None on a rank without
        logits."""
        if not batch.is_prefill and self.cuda_graphs and self.decode_graphs.fits(batch.num_seqs):
            return self.decode_graphs.run(batch, self.last_tokens)
        inputs = to_device(batch, self.xp)
        if not batch.is_prefill:
            inputs.token_ids = self.last_tokens[inputs.token_ids]
        return self.model(inputs, last=inputs.cu_seqlens[1:] - 1)

    def store_tokens(self, seqs: list[Sequence], token_ids) -> None:
        """Record each sequence's newest token (an int array of the runner's module, or host ints) in its
        slot of last_tokens, without waiting for the device."""
        self.store_slots(slot_array(seqs), token_ids)

    def store_slots(self, slots: np.ndarray, token_ids) -> None:
        """last_tokens[slots] = token_ids (slots: host ints)."""
        xp = self.xp
        self.last_tokens[xp.asarray(slots)] = xp.asarray(token_ids, dtype=xp.int32)

    def capture_decode_graphs(self, max_batch: int | None = None) -> list[int]:
        """Capture now the decode graphs of every bucket a batch of up to max_batch sequences (default:
        max_num_seqs) can use, so that no capture lands inside a timed run. Returns the buckets captured."""
        return self.decode_graphs.capture_up_to(max_batch) if self.cuda_graphs else []

    def release_graphs(self) -> None:
        """Drop the decode graphs, their memory pools and the split-K workspaces of the graph stream (a
        benchmark building several runners in one process)."""
        if self.decode_graphs is not None:
            self.decode_graphs.release()
