"""GPUModelRunner: the CuPy runner. Same contract as engine/model_runner.ModelRunner (run(seqs, is_prefill) ->
next-token logits [num_seqs, vocab] fp32, here on the device; `xp` is cupy).

It owns what the GPU model runs over: the paged KV pool, sized here, the GPU model (model/gpu_model.GPULlama:
device weights, activation buffers, the fused forward) and the decode CUDA graphs (engine/cuda_graph.py).
Prefill runs eagerly; decode steps replay a CUDA graph per padded batch bucket (EngineConfig.cuda_graphs,
QSERVE_LITE_CUDA_GRAPHS=0 keeps decode eager). Weights come uploaded from a loaded model
(io/loader.load_model) or as DeviceWeights already on the device (model/random_weights.py).

KV pool: as many 64-token pages as `gpu_memory_utilization` of the device's memory leaves after weights,
buffers and a reserve (capped at what every sequence at full length needs); NUM_GPU_PAGE_BLOCKS (or
num_pages) overrides.
"""

from __future__ import annotations

import os

import numpy as np

from qserve_lite.core.kv_layout import PAGE_SIZE, KVPageLayout
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.engine.batch import prepare, to_device
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.cuda_graph import DecodeGraphs
from qserve_lite.engine.sequence import Sequence
from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.io.loader import LoadedModel
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.model.gpu_model import DeviceWeights, GPULlama, check_head_dim

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


class GPUModelRunner:
    """The model on one CUDA device (cupy), with its paged KV pool and decode graphs."""

    def __init__(self, model: LoadedModel | DeviceWeights, config: EngineConfig | None = None, *, xp=None,
                 **overrides):
        """model: a loaded model (its weights are uploaded here) or DeviceWeights already on the device (of
        the same array module). config (+ EngineConfig field overrides): max_num_batched_tokens,
        max_num_seqs and max_model_len must be given (LLMEngine resolves them). xp: cupy (default); numpy
        runs the same forward on the kernels' numpy twins (a check of the runner on the CPU; needs num_pages,
        no CUDA graphs)."""
        config = (config or EngineConfig()).replace(**overrides)
        if config.max_num_batched_tokens is None or config.max_model_len is None:
            raise QServeLiteError("GPUModelRunner needs max_num_batched_tokens and max_model_len")
        self.engine_config = config
        cp = self.xp = xp if xp is not None else _cupy()
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
        self.model = GPULlama(weights, self.kv_pool, self.max_tokens, cp)
        self.decode_graphs = None
        if cp is not np:
            max_pages = -(-config.max_model_len // PAGE_SIZE)
            self.decode_graphs = DecodeGraphs(self.model, config.max_num_seqs, max_pages)
        self.cuda_graphs = config.cuda_graphs and self.decode_graphs is not None

    def _choose_num_pages(self, config: EngineConfig) -> int:
        given = config.num_pages if config.num_pages is not None else env_num_pages()
        if given is not None:
            return int(given)
        cp = self.xp
        if cp is np:
            raise QServeLiteError("the numpy twin of the GPU runner needs num_pages")
        per_page = self.cfg.num_layers * 2 * self.layout.page_bytes
        max_len, util = config.max_model_len, config.gpu_memory_utilization
        one_batch = -(-min(max_len, config.max_num_batched_tokens) // PAGE_SIZE)
        cp.get_default_memory_pool().free_all_blocks()
        free, total = cp.cuda.runtime.memGetInfo()
        temporaries = temporary_bytes(self.cfg, self.max_tokens, config.max_num_seqs)
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

    @property
    def graph_stream(self):
        """The stream decode graphs are captured on (None without CUDA graphs support: numpy)."""
        return None if self.decode_graphs is None else self.decode_graphs.stream

    @property
    def graphs(self) -> dict:
        """The captured decode graphs by bucket."""
        return {} if self.decode_graphs is None else self.decode_graphs.captured

    def run(self, seqs: list[Sequence], is_prefill: bool):
        """Next-token logits [len(seqs), vocab] fp32 on the device; writes the batch's K/V to the pages."""
        batch = prepare(seqs, is_prefill)
        if not is_prefill and self.cuda_graphs and self.decode_graphs.fits(batch.num_seqs):
            return self.decode_graphs.run(batch)
        inputs = to_device(batch, self.xp)
        return self.model(inputs, last=inputs.cu_seqlens[1:] - 1)

    def capture_decode_graphs(self, max_batch: int | None = None) -> list[int]:
        """Capture now the decode graphs of every bucket a batch of up to max_batch sequences (default:
        max_num_seqs) can use, so that no capture lands inside a timed run. Returns the buckets captured."""
        return self.decode_graphs.capture_up_to(max_batch) if self.cuda_graphs else []

    def release_graphs(self) -> None:
        """Drop the decode graphs, their memory pools and the split-K workspaces of the graph stream (a
        benchmark building several runners in one process)."""
        if self.decode_graphs is not None:
            self.decode_graphs.release()


def _cupy():
    import cupy

    return cupy
