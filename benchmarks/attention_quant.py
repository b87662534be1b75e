"""Decode attention with the fused o_proj input (issue 16): the unfused pair decode_attention +
quantize_per_token (two launches, QSERVE_LITE_STEP_FUSIONS=0) against decode_attention(quant_out=) (one
launch: the last head block of each token quantizes the token's row), Llama-3-8B heads (32 query, 8 kv heads,
head_dim 128).

    python benchmarks/attention_quant.py [--batches 1,16,64,256] [--contexts 1536,16384] [--bits 4,8]

For every (KV bits, batch, context) and with the per-token sums (W4 per-channel) on and off: the median GPU
time per call of each path (benchmarks/kernels.Timer: back-to-back calls queued behind a spin kernel), the
attention kernel alone, and whether the fused outputs are bit-identical to the unfused ones (fp16 output,
codes, scales, sums). Page sets rotate over 4x the L2 cache, so the KV bytes come from DRAM. JSON lines are
appended to benchmarks/results/<date>-<gpu>-attention_quant.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qserve_lite.bench.results import append_jsonl, device_name, git_sha, results_file, today  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def bit_identical(cp, a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool((a.view(cp.uint8) == b.view(cp.uint8)).all())


def bench_point(cp, timer, pool, bits, b, ctx, l2, with_sums, log):
    from qserve_lite.kernels.act_quant import quantize_per_token
    from qserve_lite.kernels.attention import decode_attention
    from qserve_lite.kernels.cuda.attention import decode_geometry

    K = HEADS * HEAD_DIM
    need = b * ctx // 64
    kv_bytes = b * ctx * KV_HEADS * pool.layout.kv_bytes_per_token()
    copies = int(max(1, min(pool.num_pages // need, -(-4 * l2 // kv_bytes), 256)))
    perm = cp.random.permutation(pool.num_pages)[: copies * need].astype(cp.int32)
    bts = [perm[i * need : (i + 1) * need].reshape(b, ctx // 64) for i in range(copies)]
    lens = cp.full((b,), ctx, dtype=cp.int32)
    q = cp.random.standard_normal((b, HEADS, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
    out_a, out_b = cp.empty((b, HEADS, HEAD_DIM), cp.float16), cp.empty((b, HEADS, HEAD_DIM), cp.float16)
    fused = (cp.empty((b, K), cp.int8), cp.empty((b,), cp.float16),
             cp.empty((b,), cp.float32) if with_sums else None)
    attn = functools.partial(decode_attention, q, pool, 0, max_context=ctx)

    def unfused(i):
        o = attn(bts[i % copies], lens, out=out_a)
        return quantize_per_token(o.reshape(b, K), cp, with_sums)

    def fused_call(i):
        return attn(bts[i % copies], lens, out=out_b, quant_out=fused)

    times = {"attention": timer(lambda i: attn(bts[i % copies], lens, out=out_a)),
             "unfused": timer(unfused), "fused": timer(fused_call)}
    ref = unfused(0)
    fused_call(0)
    exact = (bit_identical(cp, out_a, out_b) and bit_identical(cp, ref.q, fused[0])
             and bit_identical(cp, ref.scales, fused[1]) and bit_identical(cp, ref.sums, fused[2]))
    splits, _ = decode_geometry(b, HEADS, KV_HEADS, ctx)
    row = {"kv_bits": bits, "batch": b, "context": ctx, "sums": with_sums, "splits": splits,
           **{f"{k}_us": v * 1e6 for k, v in times.items()},
           "saved_us": (times["unfused"] - times["fused"]) * 1e6, "bit_identical": exact}
    log(row)
    print(f"KV{bits} B={b:4d} ctx={ctx:6d} sums={int(with_sums)} splits={splits:3d}  attention "
          f"{times['attention'] * 1e6:8.1f} us  unfused {times['unfused'] * 1e6:8.1f} us  fused "
          f"{times['fused'] * 1e6:8.1f} us  saved {row['saved_us']:6.1f} us  bit-identical {exact}",
          flush=True)
    return exact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=ints, default=[1, 16, 64, 256])
    ap.add_argument("--contexts", type=ints, default=[1536, 16384])
    ap.add_argument("--bits", type=ints, default=[4, 8])
    args = ap.parse_args()
    import cupy as cp

    from benchmarks.attention import fill_pool
    from benchmarks.kernels import Timer
    from qserve_lite.kernels.paged_kv import PagedKVPool

    dev = cp.cuda.Device()
    l2 = int(cp.cuda.runtime.getDeviceProperties(dev.id).get("l2CacheSize", 50 << 20))
    gpu, sha, date = device_name(cp), git_sha(ROOT), today()
    path = results_file("attention_quant", gpu, date, ROOT / "benchmarks" / "results")

    def log(row):
        append_jsonl(path, [dict(bench="attention_quant", date=date, gpu=gpu, git_sha=sha, **row)])

    print(f"{gpu}, git {sha}, {date}", flush=True)
    timer, rng, ok = Timer(cp), np.random.default_rng(0), True
    for bits in args.bits:
        pages = max(b * c for b in args.batches for c in args.contexts) // 64 * 4
        pool = PagedKVPool(1, pages, KV_HEADS, HEAD_DIM, bits, cp)
        fill_pool(cp, pool, rng)
        for b in args.batches:
            for ctx in args.contexts:
                for with_sums in (False, True):
                    ok &= bench_point(cp, timer, pool, bits, b, ctx, l2, with_sums, log)
        pool = None
        cp.get_default_memory_pool().free_all_blocks()
    print(f"appended to {path.relative_to(ROOT)}; "
          f"{'all bit-identical' if ok else 'SOME OUTPUTS DIFFER'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
