"""EngineConfig: every engine setting in one validated value, shared by LLM, LLMEngine, the runners, the
server, `qserve-lite bench` and the CLI.

Defaults are the serving defaults. Checks that need no model run here (a bad value fails before anything is
loaded); checks against the model (max_model_len against its context, the page pool against
max_model_len) run in LLMEngine, which resolves the None fields:

- max_model_len None: the model's context, capped to what the page pool and one prefill step hold.
- max_num_batched_tokens None: max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len or the model's context).
- num_pages None: on the GPU, what gpu_memory_utilization of the device leaves after the weights and
  buffers (or NUM_GPU_PAGE_BLOCKS); on the CPU, what CPU_KV_CACHE_BYTES hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from qserve_lite.core.backend import DEVICES
from qserve_lite.errors import QServeLiteError

DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def _cuda_graphs_default() -> bool:
    return os.environ.get("QSERVE_LITE_CUDA_GRAPHS", "1") != "0"


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model (not what the model is: that is the loaded model and its precision)."""

    max_num_seqs: int = 256  # sequences in flight at once
    max_num_batched_tokens: int | None = None  # tokens per prefill step
    max_model_len: int | None = None  # prompt + output tokens per sequence
    num_pages: int | None = None  # 64-token KV pages
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # share of GPU memory the engine may use
    device: str = "cpu"  # 'cpu' (numpy), 'gpu' (CuPy) or 'auto'
    cuda_graphs: bool = dataclasses.field(default_factory=_cuda_graphs_default)  # decode as CUDA graphs
    seed: int = 0  # seeds requests that have no seed of their own
    watermark: float = 0.01  # share of pages kept free when admitting a prefill
    async_scheduling: bool = True  # overlap: queue the next decode step before the host has this one's tokens
    tensor_parallel_size: int = 1  # GPUs the model is split over, one process each (engine/tensor_parallel)

    def __post_init__(self):
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise QServeLiteError(what)

        need(_is_int(self.max_num_seqs) and self.max_num_seqs >= 1,
             f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        need(self.max_num_batched_tokens is None or (_is_int(self.max_num_batched_tokens)
                                                      and self.max_num_batched_tokens >= 2),
             f"max_num_batched_tokens must be an integer >= 2, got {self.max_num_batched_tokens!r}")
        need(self.max_model_len is None or (_is_int(self.max_model_len) and self.max_model_len >= 2),
             f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        need(self.num_pages is None or (_is_int(self.num_pages) and self.num_pages >= 1),
             f"num_pages must be an integer >= 1, got {self.num_pages!r}")
        need(isinstance(self.gpu_memory_utilization, (int, float)) and not isinstance(
            self.gpu_memory_utilization, bool) and 0.0 < self.gpu_memory_utilization <= 1.0,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        need(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        need(_is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
             f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        need(isinstance(self.watermark, (int, float)) and 0.0 <= self.watermark < 1.0,
             f"watermark must be in [0, 1), got {self.watermark!r}")

    def replace(self, **changes) -> EngineConfig:
        """A copy with `changes` (EngineConfig field names), validated again."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"EngineConfig has no field(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes) if changes else self

    def batched_tokens_for(self, max_model_len: int) -> int:
        """max_num_batched_tokens, or its default for a model whose sequences reach max_model_len tokens."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len)

    # ---- command line ----

    @staticmethod
    def add_cli_arguments(p: argparse.ArgumentParser, *, device: str = "auto", max_num_seqs: int = 256,
                          max_num_batched_tokens: int | None = None) -> None:
        """The engine's flags, the same in every subcommand that runs the engine."""
        g = p.add_argument_group("engine")
        g.add_argument("--device", choices=DEVICES, default=device,
                       help=f"cpu (numpy), gpu (CuPy) or auto (the GPU when there is one; default {device})")
        g.add_argument("--max-num-seqs", type=int, default=max_num_seqs,
                       help=f"sequences in flight at once (default {max_num_seqs})")
        g.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens,
                       help="tokens per prefill step (default: max(8192, max model len))"
                       if max_num_batched_tokens is None else
                       f"tokens per prefill step (default {max_num_batched_tokens})")
        g.add_argument("--max-model-len", type=int, default=None,
                       help="prompt + output tokens per request (default: the model's context, capped to "
                       "what fits)")
        g.add_argument("--num-pages", type=int, default=None,
                       help="64-token KV cache pages (default: what --gpu-memory-utilization leaves on the "
                       "GPU, 2 GiB on the CPU)")
        g.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                       help=f"share of GPU memory for weights, buffers and KV cache (default "
                       f"{DEFAULT_GPU_MEMORY_UTILIZATION})")
        g.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (default: CUDA graphs)")
        g.add_argument("--no-async-scheduling", action="store_true",
                       help="wait for each step's tokens before queueing the next (default: overlapped)")
        g.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, metavar="N",
                       help="split the model over N GPUs, one process each (default 1)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace, **overrides) -> EngineConfig:
        """The config of parsed flags (add_cli_arguments; --seed where the parser has one)."""
        values = dict(
            device=args.device,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            num_pages=args.num_pages,
            gpu_memory_utilization=args.gpu_memory_utilization,
            cuda_graphs=not args.no_cuda_graphs and _cuda_graphs_default(),
            async_scheduling=not getattr(args, "no_async_scheduling", False),
            tensor_parallel_size=getattr(args, "tp", 1),
        )
        if getattr(args, "seed", None) is not None:
            values["seed"] = args.seed
        values.update(overrides)
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
