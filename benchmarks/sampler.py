"""GPU time of one sampling step: engine/sampler.py's sort-based path against cuda/sample.cu (spec:
kernels/sample.py).

Rows of random Llama-3-sized logits (vocabulary 128,256) with temperature 0.8, top-k 50, top-p 0.95 (and
the same without top-k), timed with CUDA events over repeated calls; the two paths' tokens are compared
too (another approximation of the same distribution: most agree). Appends JSON lines to
benchmarks/results/<date>-<gpu>-sampler.jsonl.

    python benchmarks/sampler.py [--batch 1,64,256,1024] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qserve_lite.bench.results import append_jsonl, device_name, git_sha, results_file, today  # noqa: E402
from qserve_lite.engine.sampler import Sampler  # noqa: E402
from qserve_lite.kernels.sample import SAMPLER_KERNEL_ENV  # noqa: E402
from qserve_lite.sampling_params import SamplingParams  # noqa: E402


class Seq:
    def __init__(self, params: SamplingParams, seed: int):
        self.params = params
        self.generator = np.random.default_rng(seed)


def time_ms(cp, fn, iters: int = 20) -> float:
    fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / iters


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,64,256,1024")
    ap.add_argument("--vocab", type=int, default=128256)
    args = ap.parse_args()
    import cupy as cp

    rows = []
    for top_k in (50, 0):
        for b in (int(v) for v in args.batch.split(",")):
            rng = np.random.default_rng(b)
            logits = cp.asarray((rng.standard_normal((b, args.vocab)) * 3).astype(np.float32))
            params = SamplingParams(temperature=0.8, top_k=top_k, top_p=0.95, seed=1)
            res = {}
            for path, env in (("sort", "0"), ("kernel", "1")):
                os.environ[SAMPLER_KERNEL_ENV] = env
                seqs = [Seq(params, i) for i in range(b)]
                sampler = Sampler(cp)
                res[path] = time_ms(cp, lambda s=sampler, q=seqs, x=logits: s.choose(x, q))
                fresh = [Seq(params, i) for i in range(b)]
                res[path + "_tokens"] = cp.asnumpy(Sampler(cp).choose(logits, fresh))
            same = float((res["sort_tokens"] == res["kernel_tokens"]).mean())
            row = {"date": today(), "gpu": device_name(cp), "git_sha": git_sha(ROOT), "batch": b,
                   "vocab": args.vocab, "top_k": top_k, "top_p": 0.95, "temperature": 0.8,
                   "sort_ms": round(res["sort"], 3), "kernel_ms": round(res["kernel"], 3),
                   "same_token_fraction": round(same, 3)}
            rows.append(row)
            print(f"batch {b:5d} top-k {top_k:3d}: sort {row['sort_ms']:8.3f} ms  kernel "
                  f"{row['kernel_ms']:8.3f} ms  same token {same:.3f}", flush=True)
    append_jsonl(results_file("sampler", rows[0]["gpu"], results_dir=ROOT / "benchmarks" / "results"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
