"""`qserve-lite batch` against `LLM.generate` on the same random-token prompts, random weights of a real shape
(default: Llama-3-8B, W4A8KV4 g128) built on the GPU: does the shard orchestration cost anything measurable?

Modes, in this order (the GPU is free for each):
- `local`: the local launcher with one GPU (`--launcher local --gpus 1`: a spawned process builds its own
  engine, runs a warm-up shard, then the measured shard);
- `ray`: Ray Data with one GPU actor (`--launcher ray --gpus 1`), when ray is importable here;
- in this process, one engine: a warm-up, then `generate` (LLM.generate over every prompt at once), `inline`
  (run_job with the inline launcher: the rows read from the shard, partial log, result and marker written),
  and `generate` again (to see drift).

tok/s = generated tokens / seconds. For generate and inline the seconds are the wall time of the call; for
local and ray the measured shard's own seconds from its done-marker (its engine's build and warm-up are not in
them; the job's whole wall time is reported beside). `ratio` = tok/s / the mean of the two generate runs.
Prints a table and appends JSON lines to benchmarks/results/<date>-<gpu>-batch_vs_generate.jsonl.

    python benchmarks/batch_vs_generate.py          # 4096 prompts of 32..256 tokens, 128 generated each
    python benchmarks/batch_vs_generate.py --modes inline --num-prompts 512
    python benchmarks/batch_vs_generate.py --device cpu --shape tiny.json --precision w16a16   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qserve_lite.batch.worker import BatchSpec, BatchWorker  # noqa: E402
from qserve_lite.bench.measure import release  # noqa: E402
from qserve_lite.bench.results import append_jsonl, format_table, git_sha, results_file, today  # noqa: E402
from qserve_lite.core.backend import device_array_module  # noqa: E402
from qserve_lite.engine.config import EngineConfig  # noqa: E402
from qserve_lite.io.shipped_configs import load_config  # noqa: E402
from qserve_lite.jobs.job import run_job  # noqa: E402
from qserve_lite.jobs.shards import list_shards, read_done  # noqa: E402
from qserve_lite.sampling_params import SamplingParams  # noqa: E402


class Prebuilt:
    """A WorkerSpec whose worker is already built (the inline mode reuses this process's warm engine)."""

    unit = "rows"

    def __init__(self, spec: BatchSpec, worker: BatchWorker):
        self.spec, self.worker = spec, worker

    def config(self) -> dict:
        return self.spec.config()

    def count_items(self, shard) -> int:
        return self.spec.count_items(shard)

    def build(self) -> BatchWorker:
        return self.worker


def write_prompts(path: Path, prompts: list[list[int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "prompt": p}) + "\n")
    return path


def run_launcher(spec: BatchSpec, launcher: str, workdir: Path, shard: Path, warmup: Path) -> dict:
    """A job of the warm-up shard, then the measured one, on a launcher with one GPU."""
    out = workdir / f"out-{launcher}"
    shards = list_shards([warmup, shard], out, ".jsonl")  # sorted: the warm-up shard goes first
    t0 = time.perf_counter()
    result = run_job(spec, shards, launcher=launcher, gpus=1, progress=False,
                     ray_gpus_per_worker=0.0 if spec.engine.device == "cpu" else 1.0)
    wall = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"{launcher}: the job failed:\n{result.table}")
    marker = read_done(shards[1])
    return {"mode": launcher, "seconds": marker["seconds"], "generated_tokens": marker["generated_tokens"],
            "job_wall_s": round(wall, 2), "rows_per_s": marker["rows_per_s"]}


def run_in_process(spec: BatchSpec, workdir: Path, shard: Path, prompts, params, sync) -> list[dict]:
    llm = spec.load()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # compile, capture
    sync()
    print(f"warm-up: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    rows = []

    def timed_generate(label: str) -> None:
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        rows.append({"mode": label, "seconds": round(time.perf_counter() - t, 3),
                     "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs)})

    timed_generate("generate")
    worker = BatchWorker(llm, spec)
    shards = list_shards([shard], workdir / "out-inline", ".jsonl")
    sync()
    t = time.perf_counter()
    result = run_job(Prebuilt(spec, worker), shards, launcher="inline", progress=False)
    sync()
    seconds = time.perf_counter() - t
    if result.exit_code != 0:
        raise SystemExit(f"inline: the job failed:\n{result.table}")
    rows.append({"mode": "inline", "seconds": round(seconds, 3),
                 "generated_tokens": read_done(shards[0])["generated_tokens"]})
    timed_generate("generate (again)")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b", help="shipped config name or config.json")
    ap.add_argument("--precision", default="w4a8kv4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    ap.add_argument("--num-prompts", type=int, default=4096)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--modes", default="local,ray,inline", help="comma-separated: local, ray, inline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    vocab = load_config(args.shape).vocab_size
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len + 1, size=args.num_prompts)
    prompts = [rng.integers(0, vocab, size=int(n)).tolist() for n in lengths]
    spec = BatchSpec(engine=EngineConfig(device=args.device, max_num_seqs=args.max_num_seqs),
                     random_weights=args.shape, precision=args.precision, group_size=args.group_size,
                     sampling={"max_tokens": args.max_tokens, "ignore_eos": True})
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    xp = device_array_module(args.device)

    def sync() -> None:
        if xp is not np:
            xp.cuda.Device().synchronize()

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shard = write_prompts(workdir / "in" / "prompts.jsonl", prompts)
        warmup = write_prompts(workdir / "in" / "0-warmup.jsonl", prompts[: 2 * args.max_num_seqs])
        for mode in [m for m in modes if m in ("local", "ray")]:
            if mode == "ray":
                try:
                    import ray.data  # noqa: F401
                except ImportError:
                    print("ray: not installed here, skipped", file=sys.stderr)
                    continue
            rows.append(run_launcher(spec, mode, workdir, shard, warmup))
        if "inline" in modes:
            rows += run_in_process(spec, workdir, shard, prompts, params, sync)
    release(xp)

    base = [r["generated_tokens"] / r["seconds"] for r in rows if r["mode"].startswith("generate")]
    ref = sum(base) / len(base) if base else None
    gpu = "cpu" if xp is np else xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    common = {"date": today(), "gpu": gpu, "git_sha": git_sha(ROOT), "shape": args.shape,
              "precision": args.precision, "group_size": args.group_size, "num_prompts": args.num_prompts,
              "prompt_len": [args.min_len, args.max_len], "max_tokens": args.max_tokens,
              "max_num_seqs": args.max_num_seqs}
    for r in rows:
        r["tok_s"] = round(r["generated_tokens"] / r["seconds"], 1)
        r["ratio"] = round(r["tok_s"] / ref, 3) if ref else None
    print(format_table(rows, [("mode", "mode"), ("gen tokens", "generated_tokens"), ("s", "seconds"),
                              ("tok/s", "tok_s"), ("vs generate", "ratio"), ("job wall s", "job_wall_s")]))
    path = append_jsonl(results_file("batch_vs_generate", gpu, results_dir=ROOT / "benchmarks" / "results"),
                        [dict(common, **r) for r in rows])
    print(f"appended {len(rows)} lines to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
