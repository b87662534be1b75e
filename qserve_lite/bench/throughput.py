"""qserve-lite bench: generation throughput with QServe's protocol, on random weights of a real model's shape.

    qserve-lite bench --model llama-3-8b --precision w4a8kv4 --group-size 128 --batch 256
    GLOBAL_BATCH_SIZE=64,128,256 qserve-lite bench --model llama-2-70b
    qserve-lite bench --model llama-3-8b --max-batch

The model: a shipped config (io/configs: llama-3-8b, llama-2-7b, mistral-7b, llama-2-13b, llama-30b,
yi-34b, llama-2-70b, qwen1.5-72b) or a config.json, with random weights drawn on the GPU at --precision
(model/random_weights.py); built once, then one engine (GPUModelRunner + LLMEngine + scheduler) per batch
size.

--mode static (QServe's protocol, the default): B sequences of --prompt-len random token ids (1024), each
generating exactly --gen tokens (512; EOS ignored; greedy on the device, only token ids reach the host). All
B are admitted before the first decode: the scheduler prefills them in steps of at most
--max-num-batched-tokens tokens (whole prompts), then decodes all B together, one token each per step.
Throughput = B x gen / wall seconds from the start of the first engine step to the end of the last (prefill
and host work included). Before it, a warm-up runs B prompts of the same length for 2 tokens (kernels
compiled for the same shapes, the decode CUDA graph of batch B captured); its time is reported apart.

--mode ifb (in-flight batching): --num-requests requests (default 4 x B) are all queued at the start, each
with --prompt-len tokens and a generation length drawn uniformly from [gen/2, 3 gen/2] (seeded; mean gen).
At most B run at once; the KV pool holds B sequences at their longest. Whenever sequences finish, waiting
ones are admitted and prefilled in the next step (a prefill step pauses decoding; no chunked prefill), so
the decode batch stays near B until the queue drains. Throughput = all generated tokens / wall seconds.
The warm-up also captures the decode graphs of every batch-size bucket up to B.

Sizes, as QServe's benchmark reads them: GLOBAL_BATCH_SIZE (B; --batch overrides; a comma-separated list
measures each) and NUM_GPU_PAGE_BLOCKS (64-token KV pages; default B x ceil((prompt + longest gen) / 64)).
--max-batch: the largest B whose KV pages and runner buffers fit the GPU memory left after the weights
(bench/max_batch.py, within --gpu-memory-utilization), confirmed by running it; on out-of-memory the batch
steps down by 10% until one runs.

Out of GPU memory: the weights are checked against free memory before they are drawn (an error that says
so); a batch that does not fit (runner buffers, KV pool, warm-up and graph capture, or the run) prints one
line (model, precision, batch, phase, what did not fit, the hint) and the other batch sizes still run; the
exit status is then 1.

Output: one JSON line per measurement appended to benchmarks/results/<date>-<gpu>-bench.jsonl (or
--json-out), a table, and <same name>.png (tok/s against batch; only when matplotlib is importable).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from qserve_lite.bench import vlm as vlm_bench
from qserve_lite.bench.measure import (
    OutOfMemory,
    describe_oom,
    is_out_of_memory,
    measure,
    measure_largest_batch,
    release,
)
from qserve_lite.bench.protocol import MODES
from qserve_lite.bench.results import (
    append_jsonl,
    device_name,
    format_table,
    git_sha,
    plot_throughput,
    read_jsonl,
    results_file,
    today,
)
from qserve_lite.core.backend import device_array_module
from qserve_lite.core.precision import Precision
from qserve_lite.engine.gpu_model_runner import env_num_pages
from qserve_lite.engine.tensor_parallel import RandomSource, TPGroup
from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.io.shipped_configs import load_config, shipped_config_names
from qserve_lite.model.random_weights import CPU_MAX_PARAMETERS, build_random_weights, check_weights_fit
from qserve_lite.model.tp_split import check_splits

DEFAULT_BATCH = 64
TABLE = [
    ("model", "model"), ("precision", "precision"), ("g", "group_size"), ("tp", "tp"), ("mode", "mode"),
    ("batch", "batch"),
    ("prompt", "prompt_len"), ("gen", "gen_len"), ("wall s", "wall_s"), ("prefill s", "prefill_s"),
    ("decode s", "decode_s"), ("tok/s", "tok_s"), ("kv pages", "kv_pages"), ("GiB used", "gpu_mem_used_gib"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="llama-3-8b", help="shipped config name or a config.json path")
    p.add_argument("--precision", default="w4a8kv4",
                   help="w4a8kv4 (default), w4a8kv8, w8a8kv8, w8a8kv4, w16a16, ...")
    p.add_argument("--group-size", type=int, choices=(128, -1), default=128,
                   help="W4 weights: 128 = progressive group quantization (default), -1 = per-channel")
    p.add_argument("--batch", default=None, help="sequences (B), or a comma-separated list (default: "
                   f"$GLOBAL_BATCH_SIZE or {DEFAULT_BATCH})")
    p.add_argument("--max-batch", action="store_true", help="find and run the largest batch that fits")
    p.add_argument("--mode", choices=MODES, default="static",
                   help="static batch (default) or in-flight batching")
    p.add_argument("--num-requests", type=int, default=None, help="ifb: requests queued (default 4 x batch)")
    p.add_argument("--prompt-len", type=int, default=1024,
                   help="random prompt tokens per sequence (default 1024)")
    p.add_argument("--gen", type=int, default=None,
                   help="tokens generated per sequence (ifb: the mean; default 512, --vlm: 300)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per prefill step")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="--max-batch: fraction of the GPU's memory to fill")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (default: CUDA graphs)")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto",
                   help="gpu (CuPy), cpu (the runner's numpy twin: tiny configs only) or auto")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the random weights, prompts and ifb generation lengths (default 0)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, metavar="N",
                   help="split the model over N GPUs, one process each (default 1); each rank draws the "
                   "random weights of its shard; --max-batch sizes the batch from GPU 0's free memory")
    p.add_argument("--json-out", default=None, metavar="PATH",
                   help="append the JSON lines here (default: benchmarks/results/<date>-<gpu>-bench.jsonl "
                   "under the current directory)")
    vlm_bench.add_arguments(p)


def parse_batch_sizes(raw: str, source: str) -> list[int]:
    """'64' or '32,64,128' -> [64] / [32, 64, 128]; anything else is a QServeLiteError naming `source`."""
    parts = [s.strip() for s in str(raw).split(",")]
    try:
        sizes = [int(s) for s in parts]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise QServeLiteError(
            f"{source} must be a positive integer or a comma-separated list of them (e.g. 64 or 32,64,128), "
            f"got {raw!r}"
        )
    return sizes


def batch_sizes(arg: str | None, environ=None) -> list[int]:
    """--batch if given, else $GLOBAL_BATCH_SIZE if set and non-empty, else [DEFAULT_BATCH]."""
    if arg is not None:
        return parse_batch_sizes(arg, "--batch")
    raw = (os.environ if environ is None else environ).get("GLOBAL_BATCH_SIZE")
    if raw is not None and raw.strip():
        return parse_batch_sizes(raw, "GLOBAL_BATCH_SIZE")
    return [DEFAULT_BATCH]


def _model_label(ref: str) -> str:
    name = str(ref).lower().removesuffix(".json")
    return name if name in shipped_config_names() else str(ref)


def _build_weights(cfg, precision: Precision, group_size: int, xp, seed: int, label: str, tp: int = 1):
    """The random device weights (synchronized on the GPU), or with tp > 1 a TPGroup whose ranks drew
    their shards; out of GPU memory is a DeviceError."""
    if tp > 1:
        source = RandomSource(cfg, precision.name, group_size, seed, same_model=False)
        return TPGroup(source, tp, "cpu" if xp is np else "gpu")
    try:
        check_weights_fit(cfg, precision, group_size, xp, name=label)
        weights = build_random_weights(cfg, precision, group_size, xp=xp, seed=seed)
        if xp is not np:
            xp.cuda.Device().synchronize()
    except Exception as e:  # noqa: BLE001 - out-of-memory surfaces as several exception types
        if isinstance(e, QServeLiteError) or not is_out_of_memory(e):
            raise
        oom = describe_oom(e)
    else:
        oom = None
    if oom is not None:  # raised outside the except block: the partly built weights are freed
        release(xp)
        raise DeviceError(f"{label}: out of GPU memory building the random weights ({oom}); use fewer "
                          "weight bits (e.g. --precision w4a8kv4) or a larger GPU")
    return weights


def _report(rows: list[dict], failed: list, json_out: str | None, gpu: str) -> int:
    """Append the rows to the results file, print their table and plot; 1 if some batch size failed."""
    out = Path(json_out) if json_out else results_file("bench", gpu)
    append_jsonl(out, rows)
    print(format_table(rows, TABLE))
    print(f"results appended to {out}", file=sys.stderr)
    png = plot_throughput(read_jsonl(out), out.with_suffix(".png"))
    if png is not None:
        print(f"plot: {png}", file=sys.stderr)
    if failed:
        print(f"qserve-lite bench: batch {', '.join(map(str, failed))} did not fit in GPU memory (see above)",
              file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """The command: 0 when every measurement ran, 1 when some batch size ran out of GPU memory (its error
    line printed, the other sizes measured), errors a user can fix raised as QServeLiteError."""
    precision = Precision.parse(args.precision)
    if args.max_batch and args.batch is not None:
        raise QServeLiteError("give --batch or --max-batch, not both")
    batches = None if args.max_batch else batch_sizes(args.batch)
    if getattr(args, "vlm", None):
        if batches is None:
            raise QServeLiteError("--max-batch is not supported with --vlm; give --batch")
        return vlm_bench.run(args, batches)
    if args.gen is None:
        args.gen = 512
    cfg = load_config(args.model)
    xp = device_array_module(args.device)
    if xp is np and cfg.num_parameters() > CPU_MAX_PARAMETERS:
        raise QServeLiteError(
            f"{args.model} has {cfg.num_parameters() / 1e9:.1f}B parameters; the CPU (numpy twin) path is "
            "for tiny test configs. Use --device gpu"
        )
    group_size = args.group_size if precision.w_bits == 4 else None
    check_splits(cfg, args.tp, precision.w_bits, group_size, name=args.model)
    label = f"{_model_label(args.model)} {precision.name}{f' g{group_size}' if group_size else ''}"
    if args.tp > 1:
        label += f" tp{args.tp}"
    t0 = time.perf_counter()
    weights = _build_weights(cfg, precision, args.group_size, xp, args.seed, label, args.tp)
    build_s = time.perf_counter() - t0
    gpu = device_name(xp)
    base = {
        "date": today(), "gpu": gpu, "git_sha": git_sha(), "model": _model_label(args.model),
        "precision": precision.name, "group_size": group_size, "tp": args.tp, "build_s": round(build_s, 2),
        "weights_gib": round(weights.nbytes() / 2**30, 3),
    }
    print(f"{label}: random weights ({base['weights_gib']} GiB per GPU) built in {build_s:.1f}s on {gpu}",
          file=sys.stderr)
    kw = dict(mode=args.mode, num_requests=args.num_requests, prompt_len=args.prompt_len, gen_len=args.gen,
              max_num_batched_tokens=args.max_num_batched_tokens, num_pages=env_num_pages(),
              cuda_graphs=False if args.no_cuda_graphs else None, seed=args.seed)
    rows, failed = [], []
    measurements = (
        [lambda: measure_largest_batch(weights, xp, args.gpu_memory_utilization, **kw)] if batches is None
        else [lambda b=b: measure(weights, xp, batch=b, **kw) for b in batches]
    )
    try:
        for measurement in measurements:
            try:
                rows.append(base | measurement())
            except OutOfMemory as e:
                print(f"qserve-lite bench: error: {label}, {e}", file=sys.stderr, flush=True)
                failed.append(e.batch)
            release(xp)
    finally:
        if isinstance(weights, TPGroup):
            weights.close()
    if not rows:
        return 1
    return _report(rows, failed, args.json_out, gpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qserve-lite bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except QServeLiteError as e:
        print(f"qserve-lite bench: error: {e}", file=sys.stderr)
        return 2
