"""Decode step time split into wall / GPU / host, with CUDA graphs on and off (issue 6's acceptance check).

A random-weight model of a shipped shape (default: Llama-3-8B, W4A8KV4 g128, built on the GPU) serves a
batch of 64 sequences of 1024 random prompt tokens; after their prefill, --steps decode steps run in each
mode, alternating graph replay and eager launches step by step (qserve_lite/bench/step_split.py defines
the three times). Prints a table and appends one JSON line per mode to
benchmarks/results/<date>-<gpu>-decode_step_split.jsonl.

    python benchmarks/decode_step_split.py                       # llama-3-8b, batch 64, 100 steps per mode
    python benchmarks/decode_step_split.py --batch 128 --steps 50
    python benchmarks/decode_step_split.py --device cpu --model tiny/config.json --prompt-len 16 --steps 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b", help="shipped config name or a config.json path")
    ap.add_argument("--precision", default="w4a8kv4")
    ap.add_argument("--group-size", type=int, choices=(128, -1), default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps per mode first")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    ap.add_argument("--results-dir", default=None, help="default: benchmarks/results of this checkout")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from qserve_lite.bench.results import (
        append_jsonl,
        device_name,
        format_table,
        git_sha,
        results_file,
        today,
    )
    from qserve_lite.bench.step_split import measure_decode_steps, prefill_batch
    from qserve_lite.core.backend import resolve_device
    from qserve_lite.core.precision import Precision
    from qserve_lite.engine.block_manager import pages_for
    from qserve_lite.engine.gpu_model_runner import GPUModelRunner
    from qserve_lite.engine.llm_engine import LLMEngine
    from qserve_lite.io.shipped_configs import load_config
    from qserve_lite.model.random_weights import build_random_weights

    if resolve_device(args.device) == "gpu":
        import cupy as xp
    else:
        xp = np
    cfg = load_config(args.model)
    precision = Precision.parse(args.precision)
    t0 = time.perf_counter()
    weights = build_random_weights(cfg, precision, args.group_size, xp=xp, seed=args.seed)
    print(f"random {args.model} {precision} built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    gen = 2 * (args.warmup + args.steps) + 2  # both modes' steps on every sequence, and the prefill's token
    max_len = args.prompt_len + gen
    mnbt = max(args.max_num_batched_tokens, max_len)
    runner = GPUModelRunner(weights, max_num_batched_tokens=mnbt, max_num_seqs=args.batch,
                            max_model_len=max_len, num_pages=args.batch * pages_for(max_len), xp=xp,
                            cuda_graphs=xp is not np)
    engine = LLMEngine(None, runner=runner, max_num_seqs=args.batch, max_num_batched_tokens=mnbt,
                       max_model_len=max_len, watermark=0.0)
    prefill_batch(engine, args.batch, args.prompt_len, gen, seed=args.seed)
    times = measure_decode_steps(engine, runner, args.steps, args.warmup)

    gpu = device_name(xp)
    group = args.group_size if precision.w_bits == 4 else None
    base = {"date": today(), "gpu": gpu, "git_sha": git_sha(ROOT), "model": args.model,
            "precision": precision.name, "group_size": group, "batch": args.batch,
            "prompt_len": args.prompt_len, "steps": args.steps}
    rows = []
    for graphs, t in times.items():
        rows.append(base | {"cuda_graphs": graphs} | t.summary() | {
            "wall_ms": [round(v, 3) for v in t.wall_ms], "host_ms": [round(v, 3) for v in t.host_ms],
            "gpu_ms": [None if v is None else round(v, 3) for v in t.gpu_ms]})
    columns = [("cuda graphs", "cuda_graphs"), ("batch", "batch"), ("wall ms", "wall_ms_median"),
               ("gpu ms", "gpu_ms_median"), ("host ms", "host_ms_median"), ("wall mean", "wall_ms_mean"),
               ("gpu mean", "gpu_ms_mean"), ("host mean", "host_ms_mean")]
    print(f"{args.model} {precision} g{group}, batch {args.batch}, context ~{args.prompt_len}, {gpu}; "
          f"per decode step (median, mean over {args.steps} steps):")
    print(format_table(rows, columns))
    results_dir = args.results_dir or ROOT / "benchmarks" / "results"
    out = append_jsonl(results_file("decode_step_split", gpu, results_dir=results_dir), rows)
    print(f"results appended to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
