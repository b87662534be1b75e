"""One throughput measurement on prebuilt device weights: a GPUModelRunner and LLMEngine for the batch, a
warm-up, the timed run (bench/protocol.py); and --max-batch, which sizes the batch from free GPU memory
(bench/max_batch.py) and steps down on out-of-memory errors.

Running out of GPU memory anywhere in a measurement (the runner's buffers and KV pool, the warm-up with its
decode-graph capture, the timed run) raises OutOfMemory: which batch, in which phase, what did not fit and
what to do, in one line; the runner is dropped first, so the next batch size starts with its memory free.
"""

from __future__ import annotations

import gc
import re
import sys
import time

import numpy as np

from qserve_lite.bench.max_batch import batch_bytes, max_batch
from qserve_lite.bench.protocol import (
    generation_lengths,
    longest_generation,
    random_prompts,
    run_requests,
    synchronizer,
)
from qserve_lite.core.kv_layout import KVPageLayout
from qserve_lite.engine.block_manager import pages_for
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.gpu_model_runner import RESERVED_BYTES, env_num_pages
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.tensor_parallel import make_runner
from qserve_lite.errors import DeviceError, QServeLiteError

WARMUP_GEN = 2  # warm-up tokens per sequence: one prefill of every prompt and one decode step
OOM_STEP = 0.9  # --max-batch: the next batch after an out-of-memory error


def release(xp) -> None:
    """Give the memory of dropped runners back to the device (between measurements)."""
    gc.collect()
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()


def memory_gib(xp) -> tuple[float | None, float | None]:
    """(device memory in use, total) in GiB; CuPy's pools keep their high-water mark, so after a run the
    figure in use is the run's peak."""
    if xp is np:
        return None, None
    free, total = xp.cuda.runtime.memGetInfo()
    return round((total - free) / 2**30, 2), round(total / 2**30, 2)


OOM_HINT = "lower --batch / NUM_GPU_PAGE_BLOCKS, or use --max-batch to find the largest batch that fits"
_CUPY_OOM = re.compile(r"allocating ([\d,]+) bytes \(allocated so far: ([\d,]+) bytes\)")


class OutOfMemory(DeviceError):
    """A measurement ran out of GPU memory: the batch, the phase it was in, what did not fit."""

    def __init__(self, batch: int, phase: str, detail: str):
        self.batch, self.phase, self.detail = batch, phase, detail
        super().__init__(f"batch {batch}: out of GPU memory {phase}: {detail}; {OOM_HINT}")


def _chain(e: BaseException | None, depth: int = 8):
    """e and the exceptions it was raised from or during (a failed graph capture reports the capture's end,
    with the out-of-memory error as its context)."""
    while e is not None and depth > 0:
        yield e
        e, depth = e.__cause__ or e.__context__, depth - 1


def is_out_of_memory(e: BaseException) -> bool:
    for x in _chain(e):
        text = str(x).lower()
        if isinstance(x, (MemoryError, OutOfMemory)) or "out of memory" in text:
            return True
        if "memoryallocation" in text or "alloc_failed" in text:  # CUDA runtime / cuBLAS spellings
            return True
        if isinstance(x, DeviceError) and "does not fit" in text:
            return True
    return False


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def describe_oom(e: BaseException) -> str:
    """What did not fit, in a few words: cupy's 'Out of memory allocating N bytes (allocated so far: M
    bytes)' -> 'N more did not fit, M already allocated'; otherwise the error's first clause."""
    for x in _chain(e):
        m = _CUPY_OOM.search(str(x))
        if m is not None:
            need, so_far = (int(g.replace(",", "")) for g in m.groups())
            return f"{format_bytes(need)} more did not fit, {format_bytes(so_far)} already allocated"
    text = " ".join(str(e).split()).split(";")[0].strip().rstrip(".")
    return (text or type(e).__name__)[:200]


def measure(
    weights,
    xp,
    *,
    batch: int,
    mode: str = "static",
    num_requests: int | None = None,
    prompt_len: int = 1024,
    gen_len: int = 512,
    max_num_batched_tokens: int = 8192,
    num_pages: int | None = None,
    cuda_graphs: bool | None = None,
    seed: int = 0,
    warmup_gen: int = WARMUP_GEN,
) -> dict:
    """One measurement (bench/throughput.py's docstring) -> the JSON row's workload and timing fields."""
    if min(batch, prompt_len, gen_len) < 1:
        raise QServeLiteError(f"batch, prompt length and gen must be >= 1: {batch}, {prompt_len}, {gen_len}")
    vocab = weights.config.vocab_size
    rng = np.random.default_rng(seed)
    n = batch if mode == "static" else (num_requests or 4 * batch)
    gens = generation_lengths(mode, n, gen_len, rng)
    max_len = prompt_len + max(gens)
    full = batch * pages_for(max_len)
    pages = full if num_pages is None else num_pages
    if mode == "static" and pages < full:
        raise QServeLiteError(
            f"NUM_GPU_PAGE_BLOCKS={pages} holds fewer than {batch} sequences of {max_len} tokens ({full} "
            "pages): a static batch needs them all at once. Raise it, or lower the batch"
        )
    if max_num_batched_tokens < max_len:
        raise QServeLiteError(
            f"--max-num-batched-tokens {max_num_batched_tokens} is below prompt + gen ({max_len}): the "
            "engine needs one step to hold a whole sequence (a preempted one is prefilled again whole)"
        )
    layout = KVPageLayout(weights.kv_bits, weights.config.num_kv_heads, weights.config.head_dim)
    kv_bytes = pages * len(weights.layers) * 2 * layout.page_bytes
    phase = (
        f"allocating the runner (activation buffers for {max(max_num_batched_tokens, batch)} tokens, "
        f"KV pool of {pages} pages = {format_bytes(kv_bytes)})"
    )
    runner = engine = row = failure = None
    try:
        config = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max_num_batched_tokens,
                              max_model_len=max_len, num_pages=pages, watermark=0.0, seed=seed)
        if cuda_graphs is not None:
            config = config.replace(cuda_graphs=cuda_graphs)
        runner = make_runner(weights, config, xp)  # a TPGroup gets a TPModelRunner
        engine = LLMEngine(None, config.replace(num_pages=None), runner=runner)
        sync = synchronizer(xp)
        phase = "in the warm-up (first prefill and decode steps" + (
            ", decode CUDA-graph capture)" if runner.cuda_graphs else ")"
        )
        t0 = time.perf_counter()
        run_requests(engine, random_prompts(rng, batch, prompt_len, vocab), [warmup_gen] * batch, sync)
        if mode == "ifb":
            runner.capture_decode_graphs(batch)
        sync()
        warmup_s = time.perf_counter() - t0
        phase = "in the timed run"
        log = run_requests(engine, random_prompts(rng, n, prompt_len, vocab), gens, sync)
        used, total = memory_gib(xp)
        row = {
            "mode": mode, "batch": batch, "num_requests": n, "prompt_len": prompt_len, "gen_len": gen_len,
            "max_num_batched_tokens": max_num_batched_tokens, "cuda_graphs": runner.cuda_graphs,
            "kv_pages": runner.num_pages, "generated_tokens": log.generated, "wall_s": round(log.wall_s, 4),
            "prefill_s": round(log.total("prefill"), 4), "decode_s": round(log.total("decode"), 4),
            "tok_s": round(log.generated / log.wall_s, 2), "prefill_steps": log.count("prefill"),
            "decode_steps": log.count("decode"),
            "all_admitted_before_decode": log.all_admitted_before_decode(n),
            "num_preemptions": engine.scheduler.num_preemptions, "warmup_s": round(warmup_s, 3),
            "gpu_mem_used_gib": used, "gpu_mem_total_gib": total,
        }
    except Exception as e:  # noqa: BLE001 - out-of-memory surfaces as several exception types
        if not is_out_of_memory(e):
            raise
        failure = OutOfMemory(batch, phase, describe_oom(e))
    finally:
        if runner is not None and runner.cuda_graphs:
            runner.release_graphs()
    if failure is not None:
        runner = engine = None  # raised outside the except block: nothing keeps the failed runner alive
        raise failure
    return row


def budget_bytes(xp, utilization: float) -> int:
    """Device bytes left for KV pages and runner buffers: utilization x total, minus what is in use (the
    weights), minus the runner's reserve."""
    xp.get_default_memory_pool().free_all_blocks()
    free, total = xp.cuda.runtime.memGetInfo()
    return int(total * utilization) - (total - free) - RESERVED_BYTES


def measure_largest_batch(weights, xp, utilization: float, batch_cap: int | None = None, **kw) -> dict:
    """--max-batch: the largest batch the memory left after the weights holds (max_batch.max_batch; at most
    batch_cap), confirmed by running it; after an out-of-memory error, 10% smaller, until one runs."""
    if xp is np:
        raise QServeLiteError("--max-batch sizes the batch from free GPU memory: run it with --device gpu")
    if env_num_pages() is not None or kw.get("num_pages") is not None:
        raise QServeLiteError("--max-batch sizes the KV pool itself: unset NUM_GPU_PAGE_BLOCKS")
    cfg, mnbt = weights.config, kw.get("max_num_batched_tokens", 8192)
    gen = longest_generation(kw.get("mode", "static"), kw.get("gen_len", 512))
    seq_len = kw.get("prompt_len", 1024) + gen
    budget = budget_bytes(xp, utilization)
    batch = max_batch(budget, cfg, weights.kv_bits, seq_len, mnbt)
    if batch_cap is not None:
        batch = min(batch, batch_cap)
    if batch < 1:
        need = batch_bytes(cfg, weights.kv_bits, seq_len, 1, mnbt)
        raise DeviceError(
            f"not even one sequence of {seq_len} tokens fits: {max(budget, 0) / 2**30:.2f} GiB are left "
            f"after the weights, it needs {need / 2**30:.2f} GiB. Raise --gpu-memory-utilization or shorten "
            "the prompt / generation"
        )
    estimate = batch
    print(f"--max-batch: {budget / 2**30:.1f} GiB for KV pages and buffers -> batch {batch}", file=sys.stderr)
    while True:
        try:
            return measure(weights, xp, batch=batch, **kw) | {"max_batch_estimate": estimate}
        except Exception as e:  # noqa: BLE001 - out-of-memory surfaces as several exception types
            if not is_out_of_memory(e) or batch == 1:
                raise
            smaller = max(1, min(batch - 1, int(batch * OOM_STEP)))
            where = f"{e.phase}: {e.detail}" if isinstance(e, OutOfMemory) else f"({describe_oom(e)})"
            print(
                f"--max-batch: batch {batch} ran out of GPU memory {where}; retrying with batch {smaller}",
                file=sys.stderr,
            )
        batch = smaller
        release(xp)  # out of the except block: the traceback no longer holds the failed runner
