"""Per-kernel GPU time of one prefill step and of decode steps, next to the wall time per step (issue 14).

A random-weight model of a shipped shape (default Llama-3-8B W4A8KV4 g128, built on the GPU) serves a batch
of --batch sequences of --prompt-len random tokens. After their prefill, decode steps run in each mode:

    overlap   CUDA graphs, async scheduling (the default engine)
    sync      CUDA graphs, each step's tokens on the host before the next step is queued
    eager     no CUDA graphs, synchronous

Each mode runs --warmup untimed steps, then --steps steps timed on the host clock (wall_ms = time per step,
device synchronized at both ends), then the same number of steps under torch.profiler (CUPTI sees CuPy's
kernels), whose kernel and copy times summed per step give gpu_ms. With --sampled the requests sample
(temperature 0.8, top_p 0.95, top_k 50, a seed each) instead of decoding greedily. One prefill step of
--prefill-tokens tokens is profiled the same way, with its top kernels.

torch is a measuring tool here only (the package never imports it); without torch gpu_ms is left out.
decode_non_gemm_ms is gpu_ms less the GEMM kernels (names holding "gemm" or "cutlass"). --fusions on,off
runs everything twice, with the decode-step fusions of issue 16 and without them
($QSERVE_LITE_STEP_FUSIONS=0, kernels/fusions.py), each with its own runner and graphs.
Appends one JSON line per (fusions, batch, sampling, mode) with decode_wall_ms and decode_gpu_ms, and one per
prefill, to benchmarks/results/<date>-<gpu>-step_profile.jsonl.

    python benchmarks/step_profile.py --batch 256,1024
    python benchmarks/step_profile.py --batch 256 --sampled --modes overlap,sync
    python benchmarks/step_profile.py --batch 256 --modes overlap --fusions on,off
    python benchmarks/step_profile.py --device cpu --model tiny/config.json --batch 4 --prompt-len 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qserve_lite.bench.results import append_jsonl, device_name, format_table, git_sha, results_file, today  # noqa: E402
from qserve_lite.core.backend import device_array_module  # noqa: E402
from qserve_lite.core.precision import Precision  # noqa: E402
from qserve_lite.engine.block_manager import pages_for  # noqa: E402
from qserve_lite.engine.config import EngineConfig  # noqa: E402
from qserve_lite.engine.gpu_model_runner import GPUModelRunner  # noqa: E402
from qserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from qserve_lite.io.shipped_configs import load_config  # noqa: E402
from qserve_lite.kernels.fusions import FUSIONS_ENV  # noqa: E402
from qserve_lite.model.random_weights import build_random_weights  # noqa: E402
from qserve_lite.sampling_params import SamplingParams  # noqa: E402

MODES = {"overlap": (True, True), "sync": (True, False), "eager": (False, False)}  # (graphs, async)


def kernel_profiler():
    """A context manager collecting CUDA activity (torch.profiler), or None without torch."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    return profile(activities=[ProfilerActivity.CUDA])


def device_ms(prof) -> tuple[float, list[tuple[str, float]]]:
    """(total ms of device activity, [(name, ms)] by time) of a finished profiler."""
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append((e.key, us / 1e3))
    rows.sort(key=lambda r: -r[1])
    return sum(ms for _, ms in rows), rows


def non_gemm_ms(kernels: list[tuple[str, float]]) -> float:
    """Device ms of everything but the GEMM kernels."""
    return sum(ms for name, ms in kernels if "gemm" not in name.lower() and "cutlass" not in name.lower())


def timed_steps(engine: LLMEngine, steps: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps


def profiled_steps(engine: LLMEngine, steps: int, sync) -> tuple[float | None, list]:
    prof = kernel_profiler()
    if prof is None:
        return None, []
    sync()
    with prof:
        for _ in range(steps):
            engine.step()
        sync()
    total, rows = device_ms(prof)
    return total / steps, rows


def sampling(args, i: int, max_tokens: int) -> SamplingParams:
    if args.sampled:
        return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, top_k=50, seed=i,
                              ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def profile_batch(args, weights, xp, batch: int, base: dict) -> list[dict]:
    modes = args.modes.split(",")
    gen = len(modes) * (args.warmup + 2 * args.steps) + 4
    max_len = args.prompt_len + gen
    mnbt = max(args.prefill_tokens, max_len)
    config = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=mnbt, max_model_len=max_len,
                          num_pages=batch * pages_for(max_len) + pages_for(args.prefill_tokens) + 1,
                          watermark=0.0)
    runner = GPUModelRunner(weights, config, xp=xp)
    engine = LLMEngine(None, config.replace(num_pages=None), runner=runner)
    sync = (lambda: None) if xp is np else xp.cuda.Device().synchronize
    rng = np.random.default_rng(args.seed)
    for i in range(batch):
        engine.add_request(rng.integers(0, weights.config.vocab_size, args.prompt_len).tolist(),
                           sampling(args, i, gen), stream=False)
    while engine.scheduler.waiting:
        engine.step()
    rows = []
    for mode in modes:
        graphs, overlap = MODES[mode]
        runner.cuda_graphs = graphs and runner.decode_graphs is not None
        engine.engine_config = engine.engine_config.replace(async_scheduling=overlap)
        for _ in range(args.warmup):
            engine.step()
        wall = timed_steps(engine, args.steps, sync)
        gpu, kernels = profiled_steps(engine, args.steps, sync)
        top = [(k, round(ms / args.steps, 3)) for k, ms in kernels[: args.top]]
        rows.append(base | {
            "kind": "decode", "mode": mode, "cuda_graphs": graphs, "async_scheduling": overlap,
            "sampled": args.sampled, "batch": batch, "context": args.prompt_len, "steps": args.steps,
            "decode_wall_ms": round(wall, 3), "decode_gpu_ms": None if gpu is None else round(gpu, 3),
            "decode_non_gemm_ms": None if gpu is None else round(non_gemm_ms(kernels) / args.steps, 3),
            "wall_over_gpu": None if gpu is None else round(wall / gpu, 3), "top_kernels_ms": top})
    if args.prefill_tokens:
        rows.append(profile_prefill(args, engine, weights, sync, base | {"batch": batch}))
    runner.release_graphs()
    return rows


def profile_prefill(args, engine: LLMEngine, weights, sync, base: dict) -> dict:
    """Prefill steps of args.prefill_tokens tokens (prompts of --prompt-len): one untimed (first use of the
    step's shapes: workspaces, tensor maps), one timed without the profiler (the wall time), one profiled
    (the kernels)."""
    rng = np.random.default_rng(args.seed + 1)
    n = max(1, args.prefill_tokens // args.prompt_len)
    engine.engine_config = engine.engine_config.replace(async_scheduling=False)

    def one_step(prof=None) -> float:
        while engine.has_unfinished():  # finish what is running first: the pool is sized for one batch
            for rid in list(engine.seqs):
                engine.abort(rid)
            engine.step()
        for _ in range(n):
            engine.add_request(rng.integers(0, weights.config.vocab_size, args.prompt_len).tolist(),
                               SamplingParams(max_tokens=1, ignore_eos=True), stream=False)
        sync()
        t0 = time.perf_counter()
        if prof is None:
            engine.step()
            sync()
        else:
            with prof:
                engine.step()
                sync()
        return (time.perf_counter() - t0) * 1e3

    first = one_step()
    wall = one_step()
    prof = kernel_profiler()
    gpu, kernels = None, []
    if prof is not None:
        one_step(prof)
        gpu, kernels = device_ms(prof)
    return base | {"kind": "prefill", "prefill_tokens": n * args.prompt_len,
                   "prefill_wall_ms": round(wall, 3), "prefill_first_wall_ms": round(first, 3),
                   "prefill_gpu_ms": None if gpu is None else round(gpu, 3),
                   "top_kernels_ms": [(k, round(ms, 3)) for k, ms in kernels[: args.top]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b", help="shipped config name or a config.json path")
    ap.add_argument("--precision", default="w4a8kv4")
    ap.add_argument("--group-size", type=int, choices=(128, -1), default=128)
    ap.add_argument("--batch", default="256", help="decode batch size, or a comma-separated list")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30, help="timed (and then profiled) decode steps per mode")
    ap.add_argument("--warmup", type=int, default=5, help="untimed decode steps per mode first")
    ap.add_argument("--modes", default="overlap,sync,eager", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--fusions", default="off" if os.environ.get(FUSIONS_ENV) == "0" else "on",
                    help="on, off or on,off: the decode-step fusions of issue 16 (off: "
                         "$QSERVE_LITE_STEP_FUSIONS=0; default: that variable's choice)")
    ap.add_argument("--sampled", action="store_true", help="temperature 0.8, top_p 0.95, top_k 50, seeded")
    ap.add_argument("--prefill-tokens", type=int, default=8192,
                    help="tokens of the profiled prefill step (0: none)")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per row")
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    ap.add_argument("--results-dir", default=None, help="default: benchmarks/results of this checkout")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}")
    if not set(args.fusions.split(",")) <= {"on", "off"}:
        ap.error(f"--fusions: a comma-separated list of on and off, got {args.fusions!r}")

    xp = device_array_module(args.device)
    cfg = load_config(args.model)
    precision = Precision.parse(args.precision)
    t0 = time.perf_counter()
    weights = build_random_weights(cfg, precision, args.group_size, xp=xp, seed=args.seed)
    print(f"random {args.model} {precision} built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    gpu = device_name(xp)
    group = args.group_size if precision.w_bits == 4 else None
    base = {"date": today(), "gpu": gpu, "git_sha": git_sha(ROOT), "model": args.model,
            "precision": precision.name, "group_size": group}
    rows = []
    for fusions in args.fusions.split(","):
        os.environ[FUSIONS_ENV] = "1" if fusions == "on" else "0"
        for batch in (int(b) for b in args.batch.split(",")):
            rows += profile_batch(args, weights, xp, batch, base | {"fusions": fusions})
    decode = [r for r in rows if r["kind"] == "decode"]
    print(format_table(decode, [("fusions", "fusions"), ("batch", "batch"), ("mode", "mode"),
                                ("sampled", "sampled"), ("wall ms", "decode_wall_ms"),
                                ("gpu ms", "decode_gpu_ms"), ("non-GEMM ms", "decode_non_gemm_ms"),
                                ("wall/gpu", "wall_over_gpu")]))
    for r in rows:
        if r["kind"] == "prefill":
            print(f"prefill {r['prefill_tokens']} tokens (fusions {r['fusions']}): wall "
                  f"{r['prefill_wall_ms']} ms, gpu {r['prefill_gpu_ms']} ms")
        print(f"  top kernels ({r['kind']} {r.get('mode', '')} batch {r['batch']} fusions {r['fusions']}): "
              f"{r['top_kernels_ms'][:6]}")
    results_dir = args.results_dir or ROOT / "benchmarks" / "results"
    out = append_jsonl(results_file("step_profile", gpu, results_dir=results_dir), rows)
    print(f"results appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
