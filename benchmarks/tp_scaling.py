"""Tensor-parallel scaling and agreement (issue 19's acceptance), on random weights.

throughput: for each model shape and each tp, random weights drawn on the GPUs (each rank its shard's),
QServe's static protocol (--prompt-len 1024 random tokens, --gen 512 tokens, greedy, EOS ignored) at the
largest batch the memory holds (capped at --batch-cap; or the --batch given), through the real engine
(bench/measure.py).
Prints tok/s, speedup and scaling efficiency (speedup / tp) against tp = 1 measured in the same process.

agreement: one random-weight model (the same weights at every tp: model/random_weights.random_host_weights,
split by model/tp_split.py) of a shipped shape cut to --layers layers; tp = 1 generates --gen greedy tokens
for --prompts random prompts; tp = N is teacher-forced on those tokens; prints the share of steps whose
argmax equals tp = 1's and the logits' largest relative difference. Quantized models differ by one int8
re-quantization per row-split linear (model/tp_split.py), float models by fp16 roundings only.

    python benchmarks/tp_scaling.py throughput --models llama-2-70b --tp 1,2
    python benchmarks/tp_scaling.py throughput --models qwen1.5-72b --tp 1,2
    python benchmarks/tp_scaling.py agreement --model mistral-7b --layers 4 --precision w4a8kv4 --tp 2
    python benchmarks/tp_scaling.py throughput --device cpu --models tiny/config.json --tp 1,2 --batch 2 \\
        --prompt-len 16 --gen 4

One JSON line per measurement is appended to benchmarks/results/<date>-<gpu>-tp_scaling.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # conftest.teacher_forced: the tests' teacher forcing

from conftest import teacher_forced  # noqa: E402

from qserve_lite.bench.measure import measure, measure_largest_batch, release  # noqa: E402
from qserve_lite.bench.results import append_jsonl, device_name, format_table, git_sha, results_file, today  # noqa: E402
from qserve_lite.core.backend import device_array_module  # noqa: E402
from qserve_lite.core.precision import Precision  # noqa: E402
from qserve_lite.engine.config import EngineConfig  # noqa: E402
from qserve_lite.engine.gpu_model_runner import GPUModelRunner  # noqa: E402
from qserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from qserve_lite.engine.tensor_parallel import RandomSource, TPGroup, TPModelRunner  # noqa: E402
from qserve_lite.io.shipped_configs import load_config  # noqa: E402
from qserve_lite.model.gpu_model import DeviceWeights  # noqa: E402
from qserve_lite.model.random_weights import build_random_weights, random_host_weights  # noqa: E402
from qserve_lite.model.tp_split import check_splits  # noqa: E402

TABLE = [("model", "model"), ("tp", "tp"), ("batch", "batch"), ("tok/s", "tok_s"), ("speedup", "speedup"),
         ("efficiency", "efficiency"), ("wall s", "wall_s"), ("GiB/GPU", "weights_gib")]


def throughput(args, xp, device: str) -> list[dict]:
    p = Precision.parse(args.precision)
    g = args.group_size if p.w_bits == 4 else None
    tps = [int(t) for t in args.tp.split(",")]
    rows = []
    for model in args.models.split(","):
        cfg = load_config(model)
        base_tok_s = None
        for tp in tps:
            check_splits(cfg, tp, p.w_bits, g, name=model)
            t0 = time.perf_counter()
            if tp == 1:
                weights = build_random_weights(cfg, p, args.group_size, xp=xp, seed=args.seed)
            else:
                weights = TPGroup(RandomSource(cfg, p.name, args.group_size, args.seed, same_model=False), tp,
                                  device)
            build_s = time.perf_counter() - t0
            kw = dict(prompt_len=args.prompt_len, gen_len=args.gen, seed=args.seed,
                      max_num_batched_tokens=args.max_num_batched_tokens)
            try:
                if args.batch:
                    row = measure(weights, xp, batch=args.batch, **kw)
                else:
                    row = measure_largest_batch(weights, xp, args.gpu_memory_utilization,
                                                batch_cap=args.batch_cap, **kw)
            finally:
                if isinstance(weights, TPGroup):
                    weights.close()
            row |= {"model": model, "tp": tp, "precision": p.name, "group_size": g,
                    "build_s": round(build_s, 1), "weights_gib": round(weights.nbytes() / 2**30, 2)}
            base_tok_s = row["tok_s"] if tp == 1 else base_tok_s
            if base_tok_s:
                row["speedup"] = round(row["tok_s"] / base_tok_s, 3)
                row["efficiency"] = round(row["speedup"] / tp, 3)
            print(f"{model} tp{tp}: batch {row['batch']}, {row['tok_s']} tok/s", file=sys.stderr, flush=True)
            rows.append(row)
            weights = None
            release(xp)
    return rows


def agreement(args, xp, device: str) -> list[dict]:
    cfg = load_config(args.model)
    extra = dict(cfg.extra, num_hidden_layers=args.layers)
    cfg = dataclasses.replace(cfg, num_layers=args.layers, extra=extra)
    p = Precision.parse(args.precision)
    tp = int(args.tp)
    check_splits(cfg, tp, p.w_bits, args.group_size if p.w_bits == 4 else None, name=args.model)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, cfg.vocab_size, size=int(n)).tolist()
               for n in rng.integers(16, args.prompt_len + 1, size=args.prompts)]
    max_len = args.prompt_len + args.gen
    config = EngineConfig(max_num_seqs=args.prompts, max_num_batched_tokens=max(8192, max_len),
                          max_model_len=max_len, num_pages=args.prompts * -(-max_len // 64) + 1,
                          seed=args.seed)
    t0 = time.perf_counter()
    weights = DeviceWeights.from_host(cfg, random_host_weights(cfg, p, args.group_size, args.seed), p, xp)
    runner = GPUModelRunner(weights, config, xp=xp)
    engine = LLMEngine(None, config.replace(num_pages=None), runner=runner)
    ref, own = teacher_forced(engine, prompts, None, args.gen)
    runner.release_graphs()
    runner = weights = engine = None
    release(xp)
    group = TPGroup(RandomSource(cfg, p.name, args.group_size, args.seed), tp, device)
    try:
        engine = LLMEngine(None, config.replace(num_pages=None), runner=TPModelRunner(group, config))
        forced = [[own[(i, j)] for j in range(args.gen)] for i in range(len(prompts))]
        rows, _ = teacher_forced(engine, prompts, forced, args.gen)
    finally:
        group.close()
    agree = float(np.mean([np.argmax(rows[k]) == np.argmax(ref[k]) for k in ref]))
    err = max(float(np.abs(rows[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
    print(f"{args.model} ({args.layers} layers) {p.name} tp{tp} vs tp1, teacher-forced over {len(ref)} "
          f"steps: argmax agreement {agree:.4f}, max relative logits difference {err:.4f} "
          f"({time.perf_counter() - t0:.0f}s)")
    return [{"kind": "agreement", "model": args.model, "layers": args.layers, "precision": p.name,
             "group_size": args.group_size if p.w_bits == 4 else None, "tp": tp, "steps": len(ref),
             "argmax_agreement": round(agree, 4), "max_rel_logits_diff": round(err, 5)}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("throughput", "agreement"))
    ap.add_argument("--models", default="llama-2-70b,qwen1.5-72b", help="throughput: shapes, comma-separated")
    ap.add_argument("--model", default="mistral-7b", help="agreement: the shape (cut to --layers layers)")
    ap.add_argument("--layers", type=int, default=4, help="agreement: decoder layers")
    ap.add_argument("--tp", default="1,2",
                    help="throughput: tp values (1 first); agreement: the tp (default 2)")
    ap.add_argument("--precision", default="w4a8kv4")
    ap.add_argument("--group-size", type=int, choices=(128, -1), default=128)
    ap.add_argument("--batch", type=int, default=None, help="throughput: this batch (default: the largest)")
    ap.add_argument("--batch-cap", type=int, default=256, help="throughput: the largest batch tried (256)")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=8, help="agreement: prompts")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.what == "agreement" and args.tp == "1,2":
        args.tp = "2"
    xp = device_array_module(args.device)
    device = "cpu" if xp is np else "gpu"
    rows = throughput(args, xp, device) if args.what == "throughput" else agreement(args, xp, device)
    gpu = device_name(xp)
    rows = [{"date": today(), "gpu": gpu, "git_sha": git_sha(), "bench": f"tp_{args.what}"} | r for r in rows]
    out = Path(args.json_out) if args.json_out else results_file("tp_scaling", gpu)
    append_jsonl(out, rows)
    if args.what == "throughput":
        print(format_table(rows, TABLE))
    print(f"results appended to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
