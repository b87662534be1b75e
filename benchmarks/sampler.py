"""Time of the filtered draw of a decode step on the GPU: Sampler.choose over fp32 logits [batch, vocab].

Paths, each on the same logits and parameters:

    kernel   kernels/cuda/sample.cu (radix select, no sort): the default
    sort     the spec of kernels/sample.py on CuPy ($QSERVE_LITE_STEP_FUSIONS=0): a sort per filtered row
    legacy   the fp32 sort-and-cumsum filter the sampler used before the kernel (copied here as a baseline)

and each parameter set: chat (temperature 0.8, top_k 50, top_p 0.95: as step_profile.py --sampled), top_p
(0.9 only), min_p (0.05 only), none (temperature 1, no filter). Kernel and sort must choose the same tokens
(checked on every run). Times are CUDA-event medians per call; one JSON line per (path, batch, params) is
appended to benchmarks/results/<date>-<gpu>-sampler.jsonl.

    python benchmarks/sampler.py                       # batch 1,64,256,1024, vocab 128256
    python benchmarks/sampler.py --batch 256 --paths kernel,legacy
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qserve_lite.bench.results import append_jsonl, device_name, format_table, git_sha, results_file, today  # noqa: E402
from qserve_lite.core.backend import import_cupy  # noqa: E402
from qserve_lite.engine.sampler import Sampler  # noqa: E402
from qserve_lite.engine.sequence import Sequence  # noqa: E402
from qserve_lite.kernels.fusions import FUSIONS_ENV  # noqa: E402
from qserve_lite.sampling_params import SamplingParams  # noqa: E402

PARAMS = {
    "chat": dict(temperature=0.8, top_k=50, top_p=0.95),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "none": dict(temperature=1.0),
}


def legacy_choose(logits, params: list[SamplingParams], u, cp):
    """The sampler before the kernel (fp32, a full sort of every filtered row); a timing baseline only."""
    V = logits.shape[1]
    x = logits / cp.asarray([p.temperature for p in params], dtype=cp.float32)[:, None]
    top_k = np.array([p.top_k if 0 < p.top_k < V else V for p in params])
    top_p = np.array([p.top_p for p in params])
    min_p = np.array([p.min_p for p in params])
    rows = np.nonzero((top_k < V) | (top_p < 1.0))[0]
    if len(rows):
        xs = x[rows]
        k = cp.asarray(top_k[rows])[:, None]
        ordered = -cp.sort(-xs, axis=-1)
        ordered = cp.where(cp.arange(V)[None, :] < k, ordered, -cp.inf)
        probs = cp.exp(ordered - ordered[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        keep = cp.cumsum(probs, axis=-1) - probs < cp.asarray(top_p[rows], dtype=cp.float32)[:, None]
        last = cp.minimum(keep.sum(axis=-1) - 1, k[:, 0] - 1)
        x[rows] = cp.where(xs >= cp.take_along_axis(ordered, last[:, None], axis=-1), xs, -cp.inf)
    rows = np.nonzero(min_p > 0.0)[0]
    if len(rows):
        xs = x[rows]
        t = xs.max(axis=-1, keepdims=True) + cp.asarray(np.log(min_p[rows]), dtype=cp.float32)[:, None]
        x[rows] = cp.where(xs >= t, xs, -cp.inf)
    cdf = cp.cumsum(cp.exp(x - x.max(axis=-1, keepdims=True)), axis=-1)
    return cp.minimum(cp.sum(cdf < cp.asarray(u)[:, None] * cdf[:, -1:], axis=-1), V - 1).astype(cp.int32)


def timed(fn, cp, repeat: int) -> float:
    """Median ms per call (CUDA events), after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def run_case(cp, logits, name: str, paths: list[str], repeat: int) -> list[dict]:
    batch = logits.shape[0]
    params = SamplingParams(**PARAMS[name], seed=0)
    sampler = Sampler(cp)

    def seqs():
        return [Sequence(i, str(i), [1], params, np.random.default_rng(i)) for i in range(batch)]

    fixed = seqs()
    u = np.array([1.0 - s.generator.random() for s in seqs()], dtype=np.float32)
    calls = {"kernel": ("1", lambda: sampler.choose(logits, fixed)),
             "sort": ("0", lambda: sampler.choose(logits, fixed)),
             "legacy": ("1", lambda: legacy_choose(logits, [params] * batch, u, cp))}
    rows, chosen = [], {}
    for path in paths:
        env, fn = calls[path]
        os.environ[FUSIONS_ENV] = env
        if path != "legacy":
            chosen[path] = cp.asnumpy(sampler.choose(logits, seqs()))
        rows.append({"path": path, "batch": batch, "vocab": logits.shape[1], "params": name,
                     "ms": round(timed(fn, cp, repeat), 4)})
    os.environ[FUSIONS_ENV] = "1"
    if "kernel" in chosen and "sort" in chosen:
        same = bool(np.array_equal(chosen["kernel"], chosen["sort"]))
        for r in rows:
            r["kernel_equals_sort"] = same
        if not same:
            print(f"MISMATCH: kernel and sort chose different tokens ({name}, batch {batch})",
                  file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,64,256,1024", help="comma-separated batch sizes")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--params", default=",".join(PARAMS), help=f"comma-separated, of {', '.join(PARAMS)}")
    ap.add_argument("--paths", default="kernel,sort,legacy", help="comma-separated, of kernel, sort, legacy")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--results-dir", default=None, help="default: benchmarks/results of this checkout")
    args = ap.parse_args(argv)
    paths = args.paths.split(",")
    if not set(paths) <= {"kernel", "sort", "legacy"} or not set(args.params.split(",")) <= set(PARAMS):
        ap.error("unknown --paths or --params")
    cp = import_cupy()
    rng = cp.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        logits = (rng.standard_normal((batch, args.vocab), dtype=cp.float32) * 3).astype(cp.float32)
        for name in args.params.split(","):
            rows += run_case(cp, logits, name, paths, args.repeat)
    print(format_table(rows, [("path", "path"), ("batch", "batch"), ("params", "params"), ("ms", "ms"),
                              ("kernel == sort", "kernel_equals_sort")]))
    gpu = device_name(cp)
    base = {"date": today(), "gpu": gpu, "git_sha": git_sha(ROOT)}
    results_dir = args.results_dir or ROOT / "benchmarks" / "results"
    out = append_jsonl(results_file("sampler", gpu, results_dir=results_dir), [base | r for r in rows])
    print(f"results appended to {out}")
    return 0 if all(r.get("kernel_equals_sort", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
