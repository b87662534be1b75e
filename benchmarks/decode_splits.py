"""Decode attention split-count sweep (the data behind kernels/cuda/attention.SPLIT_WAVE_BLOCKS): KV4 and KV8
pages, Llama-3-8B heads, batch x context x split count, each timed as in benchmarks/attention.py (random page
order, calls rotating over page sets worth 4x the L2 cache, CUDA events, median of 5 batches), plus the
stages8+combine variant at batch <= 8 (KV4). Prints one line per point (the heuristic's split count and time,
the best) and appends JSON lines to benchmarks/results/<date>-<gpu>-decode_splits.jsonl.

    python benchmarks/decode_splits.py            # ~60 s on an H200
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.attention import HEAD_DIM, HEADS, KV_HEADS, fill_pool, page_sets  # noqa: E402
from qserve_lite.bench.results import git_sha  # noqa: E402

BATCHES = [1, 2, 4, 8, 16, 32, 64]
CONTEXTS = [1536, 4096, 16384, 32768]
SPLITS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
MAX_TOKENS = 64 * 32768  # batch x context of the largest point (the pool holds it once)


def main() -> None:
    import cupy as cp

    from benchmarks.kernels import Timer
    from qserve_lite.kernels.cuda import attention as ca
    from qserve_lite.kernels.paged_kv import PagedKVPool

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2 = int(props.get("l2CacheSize", 50 << 20))
    date = dt.date.today().isoformat()
    slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
    path = ROOT / "benchmarks" / "results" / f"{date}-{slug}-decode_splits.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    base_row = dict(date=date, gpu=gpu, git_sha=git_sha(ROOT), bench="decode_splits", heads=HEADS,
                    kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    timer = Timer(cp)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for bits in (4, 8):
        max_pages = MAX_TOKENS // 64
        pool = PagedKVPool(1, max_pages, KV_HEADS, HEAD_DIM, bits, cp)
        fill_pool(cp, pool, rng)
        per_token = KV_HEADS * pool.layout.kv_bytes_per_token()
        for b in BATCHES:
            q = cp.random.standard_normal((b, HEADS, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
            out = cp.empty((b, HEADS, HEAD_DIM), dtype=cp.float16)
            for ctx in CONTEXTS:
                if b * ctx > MAX_TOKENS:
                    continue
                bts, lens, kv_bytes = page_sets(cp, b, ctx, max_pages, per_token, l2)
                base, _ = ca.decode_geometry(b, HEADS, KV_HEADS, ctx)
                grid = sorted({s for s in (*SPLITS, base) if s * 64 <= ctx})
                us = {}
                for name, var in (("plain", None), ("s8c", {"stages": 8, "combine": 1})):
                    if var is not None and (bits != 4 or b > 8):
                        continue
                    for sp in grid:
                        call = functools.partial(ca.decode_attention, q, pool, 0, scale=HEAD_DIM**-0.5,
                                                 max_context=ctx, splits=sp, out=out, workspace=None,
                                                 variant=var)
                        t = timer(lambda i, c=call, bts=bts, lens=lens: c(bts[i % len(bts)],
                                                                           context_lens=lens))
                        us[f"{name}:{sp}"] = round(t * 1e6, 2)
                best = min(us, key=lambda k: us[k] if us[k] == us[k] else 1e9)
                row = dict(base_row, bits=bits, batch=b, context=ctx, base=base, kv_bytes=kv_bytes, us=us,
                           best=best, best_us=us[best], base_us=us[f"plain:{base}"])
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[{time.time() - t0:.0f}s] KV{bits} batch {b} context {ctx}: heuristic {base} splits "
                      f"{row['base_us']} us, best {best} {us[best]} us", flush=True)
        pool = None
        cp.get_default_memory_pool().free_all_blocks()
    print(f"appended to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
