"""Attention benchmark: paged decode attention (KV4 / KV8 / fp16 pages) against a device copy, causal prefill
attention TFLOP/s, and the RoPE + KV writer, Llama-3-8B heads (32 query, 8 kv heads, head_dim 128).

    python benchmarks/attention.py [--quick] [--prefill-only] [--out DIR] [--precompile-only]

Decode: batch {1, 32, 256} x context {512, 1536, 4096, 16384}; GB/s counts the KV bytes the kernel must read
(codes + fp16 scale and zero of every token, K and V, one layer) over its time, compared with a 1 GiB
device-to-device copy measured in the same run (bytes read + written over time). Each sequence's pages are
a random permutation, and the timed calls rotate over disjoint page sets worth 4x the L2 cache, so the
bytes come from DRAM as in a real decode step. A few KV4 points always time the kernel's alternatives
(16-token subtiles per tile, warps per block, ring depth, persistent one-split blocks at batch 256, the
faster combine at batch 1, and there also 1/2x and 2x the heuristic's split count), each listed on one line
with its time in us and its max |difference| from the default launch's output where nonzero;
without --no-tune, batches 1 and 32 also time 1/2x and 2x the split count at every point.
Prefill: one causal sequence of 1024 and 4096 tokens, head_dim 128 and 64; effective TFLOP/s = 4 * head_dim
* heads * T (T + 1) / 2 (the causal half of the score and value products) over the time; on Hopper the
wgmma kernel (the default route, cuda/attention_sm90.cu) and its alternatives beside the mma.sync kernel
(4 and 8 warps). `--prefill-only` skips decode and the writer. Timing: CUDA events around batches of
back-to-back calls queued behind a spin kernel (benchmarks/kernels.Timer), the median of 5 batches after a
warm-up. Results: a table on stdout and JSON lines appended to
benchmarks/results/<date>-<gpu>-attention.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qserve_lite.bench.results import git_sha  # noqa: E402  (the checkout's commit, +dirty)

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCHES = [1, 32, 256]
CONTEXTS = [512, 1536, 4096, 16384]
PREFILL_TOKENS = [1024, 4096]
# KV4 decode alternatives timed at a few points (decode warps per block, 16-token subtiles per tile)
VARIANTS = {"sub4": {"sub": 4}, "sub1": {"sub": 1}, "warps8": {"warps": 8}}
VARIANT_POINTS = [(1, 16384), (32, 4096), (256, 1536), (256, 16384)]
# issue-16 alternatives, always timed (KV4): large batches (one split) on persistent blocks whose cp.async
# rings run on across (sequence, kv head) items, or deeper rings; batch 1 with fewer, longer splits
# (deeper rings, so fewer resident blocks) and the last split's combine with fewer round trips.
BIG_POINTS = [(256, 1536), (256, 4096)]
BIG_VARIANTS = {"persist": {"persist": 1}, "persist+stages4": {"persist": 1, "stages": 4},
                "persist+warps8": {"persist": 1, "warps": 8}, "stages4": {"stages": 4}}
SMALL_POINTS = [(1, 16384), (1, 1536)]
SMALL_VARIANTS = {"combine": {"combine": 1}, "stages4+combine": {"stages": 4, "combine": 1},
                  "stages6+combine": {"stages": 6, "combine": 1},
                  "stages8+combine": {"stages": 8, "combine": 1}}
# modules of the GPU tests' decode variants (tests/kernels/test_attention_gpu.py), precompiled with the rest
TEST_VARIANTS = [{"persist": 1}, {"persist": 1, "warps": 8}, {"persist": 1, "stages": 4}, {"combine": 1},
                 {"stages": 6, "combine": 1}, {"stages": 8, "combine": 1}]
# Hopper prefill alternatives (cuda/attention_sm90.cu): ring depth, O += P V as two 64-channel halves
SM90_VARIANTS = {"stages2": {"stages": 2}, "pv_split": {"pv_split": True}}


# ---- precompiling (fills CuPy's on-disk cache; the GPU tests use the same modules) ----

def all_modules() -> list[tuple[str, dict]]:
    from qserve_lite.kernels.cuda.attention import attention_defines
    from qserve_lite.kernels.cuda.kv_writer import writer_defines

    jobs = []
    for d in (64, 128):
        for bits in (4, 8, 16):
            jobs.append(("attention.cu", attention_defines(d, bits)))
            jobs.append(("attention.cu", {**attention_defines(d, bits), "QS_DEC_QUANT": 1}))  # quant_out
            jobs.append(("kv_writer.cu", writer_defines(d, bits)))
    jobs.append(("attention.cu", attention_defines(128, 16, 8)))
    from qserve_lite.kernels.cuda.device import wgmma_available

    if wgmma_available():  # the Hopper prefill kernel: every page format, the benchmark's alternatives
        from qserve_lite.kernels.cuda.attention_sm90 import sm90_defines

        for d in (64, 128):
            for bits in (4, 8, 16):
                jobs.append(("attention_sm90.cu", sm90_defines(d, bits)))
            for var in SM90_VARIANTS.values():
                jobs.append(("attention_sm90.cu", sm90_defines(d, 16, var.get("stages"), var.get("pv_split",
                                                                                                False))))
    for d, bits in ((128, 4), (64, 4), (128, 8)):  # the benchmark's and the GPU tests' alternatives
        for variant in ({"sub": 1}, {"sub": 2}, {"sub": 4}, {"warps": 8}):
            jobs.append(("attention.cu", attention_defines(d, bits, variant=variant)))
    seen = set()
    for d, bits, variants in ((128, 4, [*BIG_VARIANTS.values(), *SMALL_VARIANTS.values(), *TEST_VARIANTS]),
                              (64, 4, TEST_VARIANTS), (128, 8, TEST_VARIANTS), (64, 16, TEST_VARIANTS)):
        for variant in variants:
            defines = attention_defines(d, bits, variant=variant)
            if tuple(sorted(defines.items())) not in seen:
                seen.add(tuple(sorted(defines.items())))
                jobs.append(("attention.cu", defines))
    return jobs


def _compile_job(job):
    name, defines = job
    from qserve_lite.kernels.cuda.jit import load_module

    t0 = time.perf_counter()
    try:
        load_module(name, defines)
    except Exception as e:  # noqa: BLE001 - report every failing module
        return name, defines, f"FAILED: {e}"
    return name, defines, time.perf_counter() - t0


def precompile(workers: int) -> bool:
    jobs = all_modules()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_job, jobs))
    failed = [(n, d, t) for n, d, t in results if isinstance(t, str)]
    for name, defines, msg in failed[:3]:
        print(f"{name} {defines}: {msg}", flush=True)
    times = [t for _, _, t in results if not isinstance(t, str)]
    print(f"precompiled {len(jobs) - len(failed)} of {len(jobs)} modules in {time.perf_counter() - t0:.1f} s "
          f"(longest {max(times, default=0):.1f} s)", flush=True)
    return not failed


# ---- decode ----

def fill_pool(cp, pool, rng) -> None:
    """Random codes (or fp16 values in (-2, 2)) and sane random scales / zeros, in 256 MiB chunks."""
    flat = pool.pool.reshape(-1)
    chunk = 1 << 28
    for s in range(0, flat.size, chunk):
        n = min(chunk, flat.size - s)
        flat[s : s + n] = cp.random.randint(0, 256, n, dtype=cp.int32).astype(cp.uint8)
    if pool.layout.quantized:
        for layer in range(pool.num_layers):
            for which in (0, 1):
                _, sc, zr = pool.views(layer, which)
                sc[...] = cp.asarray(rng.uniform(0.01, 0.2, sc.shape).astype(np.float16))
                zr[...] = cp.asarray(rng.uniform(0, 2**pool.kv_bits - 1, zr.shape).astype(np.float16))
    else:
        halves = flat.view(cp.uint16)
        for s in range(0, halves.size, chunk):
            halves[s : s + chunk] &= 0xBBFF  # exponent <= 15: |x| < 2, no inf / NaN


def page_sets(cp, b: int, ctx: int, max_pages: int, per_token: int, l2: int):
    """(block tables, context lens, KV bytes) of b sequences of ctx tokens: disjoint random page sets worth
    4x the L2 cache (at most 256), for timed calls to rotate over so the bytes come from DRAM."""
    need = b * ctx // 64
    kv_bytes = b * ctx * per_token
    copies = int(max(1, min(max_pages // need, -(-4 * l2 // kv_bytes), 256)))
    perm = cp.random.permutation(max_pages)[: copies * need].astype(cp.int32)
    bts = [perm[i * need : (i + 1) * need].reshape(b, ctx // 64) for i in range(copies)]
    return bts, cp.full((b,), ctx, dtype=cp.int32), kv_bytes


def decode_variants(bits: int, b: int, ctx: int, base: int, tune: bool) -> dict:
    """name -> (splits, kernel variant) timed at one point; "heuristic" is the default launch."""
    variants = {"heuristic": (None, None)}
    if tune and b <= 32:
        for sp in sorted({max(1, base // 2), base * 2, 1}):
            if sp != base:
                variants[f"splits{sp}"] = (sp, None)
    if bits == 4 and (b, ctx) in VARIANT_POINTS:
        for vname, var in VARIANTS.items():
            variants[vname] = (None, var)
            if tune and b == 1:
                variants[f"{vname}:splits{base * 2}"] = (base * 2, var)
    if bits == 4:
        variants.update(issue16_variants(b, ctx, base))
    return variants


def issue16_variants(b: int, ctx: int, base: int) -> dict:
    """The always-timed KV4 alternatives of a point: 1/2x and 2x the split count at batch 1, BIG_VARIANTS /
    SMALL_VARIANTS at their points (and the faster combine at half the split count)."""
    variants = {}
    if b == 1 and (b, ctx) in VARIANT_POINTS + SMALL_POINTS:
        for sp in (max(1, base // 2), base * 2):
            variants[f"splits{sp}"] = (sp, None)
    for points, named in ((BIG_POINTS, BIG_VARIANTS), (SMALL_POINTS, SMALL_VARIANTS)):
        if (b, ctx) in points:
            variants.update({name: (None, var) for name, var in named.items()})
    if (b, ctx) in SMALL_POINTS:
        variants[f"combine:splits{max(1, base // 2)}"] = (max(1, base // 2), {"combine": 1})
    return variants


def bench_decode(cp, timer, batches, contexts, l2, copy_gbps, log, tune: bool):
    from qserve_lite.kernels.attention import decode_attention
    from qserve_lite.kernels.cuda import attention as cuda_attention
    from qserve_lite.kernels.paged_kv import PagedKVPool

    rng = np.random.default_rng(0)
    rows = []
    for bits in (4, 8, 16):
        max_pages = max(batches) * max(contexts) // 64
        pool = PagedKVPool(1, max_pages, KV_HEADS, HEAD_DIM, bits, cp)
        fill_pool(cp, pool, rng)
        per_token = KV_HEADS * pool.layout.kv_bytes_per_token()
        for b in batches:
            q = (cp.random.standard_normal((b, HEADS, HEAD_DIM), dtype=cp.float32)).astype(cp.float16)
            out = cp.empty((b, HEADS, HEAD_DIM), dtype=cp.float16)
            for ctx in contexts:
                bts, lens, kv_bytes = page_sets(cp, b, ctx, max_pages, per_token, l2)
                base, tps = cuda_attention.decode_geometry(b, HEADS, KV_HEADS, ctx)
                variants = decode_variants(bits, b, ctx, base, tune)
                times, diffs, ref = {}, {}, None
                for name, (sp, var) in variants.items():
                    if var is None:
                        call = functools.partial(decode_attention, q, pool, 0, max_context=ctx, splits=sp,
                                                 out=out)
                    else:
                        call = functools.partial(cuda_attention.decode_attention, q, pool, 0,
                                                 scale=HEAD_DIM**-0.5, max_context=ctx, splits=sp, out=out,
                                                 workspace=None, variant=var)
                    times[name] = timer(lambda i, c=call, bts=bts, lens=lens: c(bts[i % len(bts)],
                                                                                 context_lens=lens))
                    if len(variants) > 1:  # each alternative's output against the default launch's
                        call(bts[0], context_lens=lens)
                        got = out.astype(cp.float32)
                        ref = got if ref is None else ref
                        diffs[name] = float(cp.abs(got - ref).max())
                t = times["heuristic"]
                best = min(times, key=lambda k: times[k] if times[k] == times[k] else 1e9)
                gbps = kv_bytes / t / 1e9
                row = {"kv_bits": bits, "batch": b, "context": ctx, "splits": base, "tokens_per_split": tps,
                       "kv_bytes": kv_bytes, "time_us": t * 1e6, "gbps": gbps,
                       "frac_of_copy": gbps / copy_gbps,
                       "variants_us": {k: v * 1e6 for k, v in times.items()}, "best": best,
                       "variants_max_abs_diff": diffs, "l2_rotation_copies": len(bts)}
                rows.append(row)
                log(dict(bench="decode", **row))
                extra = f"  best {best} {times[best] * 1e6:.1f} us" if len(times) > 1 else ""
                print(f"decode KV{bits:<2d} B={b:4d} ctx={ctx:6d} splits={base:3d} {t * 1e6:9.1f} us "
                      f"{gbps:7.0f} GB/s {gbps / copy_gbps:6.1%} of copy{extra}", flush=True)
                if len(times) > 1:
                    print("    " + ", ".join(f"{k} {v * 1e6:.1f}" + (f" (diff {diffs[k]:.0e})" if diffs.get(k)
                                                                     else "") for k, v in times.items()),
                          flush=True)
        pool = None
        cp.get_default_memory_pool().free_all_blocks()
    return rows


# ---- prefill and writer ----

def prefill_kernels(d: int) -> dict:
    """name -> keyword arguments of one prefill kernel: the Hopper wgmma kernel (the default route on sm_90)
    with its ring depth / PV alternatives, and the mma.sync kernel with 4 and 8 warps (explicit `warps`)."""
    from qserve_lite.kernels.cuda.attention_sm90 import sm90_prefill_enabled

    kernels = {}
    if sm90_prefill_enabled(d):
        kernels["wgmma"] = {}
        for name, var in SM90_VARIANTS.items():
            kernels[f"wgmma:{name}"] = {"variant": var}
    kernels["mma.sync 4w"] = {"warps": 4}
    kernels["mma.sync 8w"] = {"warps": 8}
    return kernels


def _prefill_call(q, k, v, cu, T, out, kw):
    from qserve_lite.kernels.attention import prefill_attention
    from qserve_lite.kernels.cuda.args import head_rows
    from qserve_lite.kernels.cuda.attention_sm90 import prefill_attention_sm90

    if "variant" not in kw:
        return functools.partial(prefill_attention, q, k, v, cu, max_seqlen_q=T, out=out, **kw)
    ld = head_rows(q, "q"), head_rows(k, "k"), head_rows(v, "v")
    lens = cu[1:] - cu[:-1]
    scale_log2 = 1.4426950408889634 / float(np.sqrt(q.shape[2]))
    return functools.partial(prefill_attention_sm90, q, k, v, *ld, cu, lens, None, 0, None, 0, 16, scale_log2,
                             T, out, head_rows(out, "out"), variant=kw["variant"])


def bench_prefill(cp, timer, tokens, log):
    """One causal sequence of T tokens, 32 q / 8 kv heads, head_dim 128 (the acceptance point) and 64, every
    kernel of prefill_kernels; each wgmma output is compared with the mma.sync kernel's (max abs difference
    printed; both are held to the numpy twin's tolerance by the GPU tests)."""
    rows = []
    for d in (HEAD_DIM, 64):
        for T in tokens:
            q = cp.random.standard_normal((T, HEADS, d), dtype=cp.float32).astype(cp.float16)
            k = cp.random.standard_normal((T, KV_HEADS, d), dtype=cp.float32).astype(cp.float16)
            v = cp.random.standard_normal((T, KV_HEADS, d), dtype=cp.float32).astype(cp.float16)
            cu = cp.asarray(np.array([0, T], dtype=np.int32))
            flops = 4.0 * d * HEADS * T * (T + 1) / 2
            ref = cp.full_like(q, cp.nan)
            _prefill_call(q, k, v, cu, T, ref, {"warps": 4})()
            for name, kw in prefill_kernels(d).items():
                out = cp.full_like(q, cp.nan)
                call = _prefill_call(q, k, v, cu, T, out, kw)
                t = timer(lambda i, call=call: call())
                diff = float(cp.abs(out.astype(cp.float32) - ref.astype(cp.float32)).max())
                row = {"tokens": T, "head_dim": d, "kernel": name, "time_us": t * 1e6,
                       "tflops": flops / t / 1e12, "flops": flops, "max_abs_diff_vs_mma_sync": diff}
                rows.append(row)
                log(dict(bench="prefill", **row))
                print(f"prefill T={T:5d} causal hd{d:<3d} {name:18s} {t * 1e6:9.1f} us "
                      f"{flops / t / 1e12:6.1f} TFLOP/s  max |out - mma.sync 4w| {diff:.2e}", flush=True)
    return rows


def bench_writer(cp, timer, log):
    from qserve_lite.kernels.attention import rope_write_kv
    from qserve_lite.kernels.paged_kv import PagedKVPool

    rows = []
    T = 4096
    inv_freq = cp.asarray(1.0 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    for bits in (4, 8, 16):
        pool = PagedKVPool(1, T // 64, KV_HEADS, HEAD_DIM, bits, cp)
        qkv = cp.random.standard_normal((T, (HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype=cp.float32)
        qkv = qkv.astype(cp.float16)
        q = qkv[:, : HEADS * HEAD_DIM].reshape(T, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].reshape(T, KV_HEADS, HEAD_DIM)
        v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].reshape(T, KV_HEADS, HEAD_DIM)
        pos = cp.arange(T, dtype=cp.int32)
        slots = cp.random.permutation(T).astype(cp.int32)
        call = functools.partial(rope_write_kv, q, k, v, pos, inv_freq, pool, 0, slots)
        t = timer(lambda i, call=call: call())
        nbytes = T * ((HEADS + 2 * KV_HEADS) * HEAD_DIM * 2 + (HEADS + KV_HEADS) * HEAD_DIM * 2
                      + KV_HEADS * pool.layout.kv_bytes_per_token())
        row = {"kv_bits": bits, "tokens": T, "time_us": t * 1e6, "bytes": nbytes, "gbps": nbytes / t / 1e9}
        rows.append(row)
        log(dict(bench="writer", **row))
        print(f"rope+write KV{bits:<2d} T={T}: {t * 1e6:8.1f} us {nbytes / t / 1e9:7.0f} GB/s", flush=True)
    return rows


def summary(copy_gbps, dec, pre, wri) -> None:
    print(f"\n=== decode attention, Llama-3-8B heads (32 q / 8 kv, hd 128), one layer; GB/s of KV bytes "
          f"read, % of the device copy ({copy_gbps:.0f} GB/s) ===")
    ctxs = sorted({r["context"] for r in dec})
    print(f"{'format':6s} {'batch':>5s} | " + " | ".join(f"ctx {c:>5d}: us / GB/s / %copy" for c in ctxs))
    for bits in (4, 8, 16):
        for b in sorted({r["batch"] for r in dec}):
            cells = []
            for c in ctxs:
                r = next((x for x in dec if (x["kv_bits"], x["batch"], x["context"]) == (bits, b, c)), None)
                cells.append(f"{r['time_us']:8.1f} / {r['gbps']:5.0f} / {r['frac_of_copy']:5.1%}" if r
                             else " " * 26)
            print(f"{'KV' + str(bits) if bits < 16 else 'fp16':6s} {b:5d} | " + " | ".join(cells))
    if pre:
        print("\n=== prefill attention, causal, 32 q / 8 kv heads ===")
        for r in pre:
            print(f"T={r['tokens']:5d} hd{r['head_dim']:<3d} {r['kernel']:18s}: {r['time_us']:9.1f} us "
                  f"{r['tflops']:6.1f} TFLOP/s")
    acc = {(r["kv_bits"], r["batch"], r["context"]): r for r in dec}
    print("\n=== acceptance ===")
    for (b, c), need in (((256, 1536), 0.85), ((256, 16384), 0.85), ((1, 16384), 0.60)):
        a = acc.get((4, b, c))
        if a:
            best = min(a["variants_us"].values())
            frac_best = a["kv_bytes"] / (best / 1e6) / 1e9 / copy_gbps
            verdict = "PASS" if a["frac_of_copy"] >= need else "FAIL"
            print(f"decode KV4 B={b} ctx={c}: {a['frac_of_copy']:.1%} of copy with the defaults, "
                  f"{frac_best:.1%} best variant ({a['best']}) (>= {need:.0%}: {verdict})")
        a8 = acc.get((8, b, c))
        if a and a8:
            ratio = a["time_us"] / a8["time_us"]
            verdict = "PASS" if ratio <= 0.6 else "FAIL"
            print(f"decode KV4 / KV8 time B={b} ctx={c}: {ratio:.2f} (<= 0.60: {verdict})")
    for d, goal in ((128, 450), (64, None)):
        p = [r for r in pre if r["tokens"] == 4096 and r["head_dim"] == d]
        if not p:
            continue
        best = max(p, key=lambda r: r["tflops"])
        default = next((r for r in p if r["kernel"] == "wgmma"), None)
        old = max((r["tflops"] for r in p if r["kernel"].startswith("mma.sync")), default=float("nan"))
        got = default["tflops"] if default else float("nan")
        verdict = f" (>= {goal}: {'PASS' if got >= goal else 'FAIL'})" if goal is not None else ""
        print(f"prefill T=4096 causal hd{d}: wgmma (default route) {got:.1f} TFLOP/s, best {best['kernel']} "
              f"{best['tflops']:.1f}, mma.sync {old:.1f}{verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1 and 256, contexts 1536, 4096 and 16384")
    ap.add_argument("--precompile-only", action="store_true")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--no-tune", action="store_true", help="skip the split-count variants")
    ap.add_argument("--prefill-only", action="store_true", help="time prefill attention only")
    ap.add_argument("--out", default=None, help="also copy the JSON lines into this folder")
    args = ap.parse_args()
    ok = precompile(args.workers)
    if args.precompile_only:
        sys.exit(0 if ok else 1)
    import cupy as cp

    from benchmarks.kernels import Timer

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2 = int(props.get("l2CacheSize", 50 << 20))
    sha = git_sha(ROOT)
    date = dt.date.today().isoformat()
    gpu_slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{date}-{gpu_slug}-attention.jsonl"
    lines = []

    def log(obj):
        obj = dict(date=date, gpu=gpu, git_sha=sha, **obj)
        lines.append(json.dumps(obj))
        with open(path, "a") as f:
            f.write(lines[-1] + "\n")

    print(f"{gpu}, {props['multiProcessorCount']} SMs, L2 {l2 >> 20} MiB, CuPy {cp.__version__}, git {sha}, "
          f"{date}", flush=True)
    timer = Timer(cp)
    half = 1 << 30
    src, dst = cp.empty(half, dtype=cp.uint8), cp.empty(half, dtype=cp.uint8)
    t_copy = timer(lambda i, src=src, dst=dst: dst.data.copy_from_device_async(src.data, half))
    copy_gbps = 2 * half / t_copy / 1e9
    src = dst = None
    log(dict(bench="copy", bytes=2 * half, time_us=t_copy * 1e6, gbps=copy_gbps))
    print(f"device-to-device copy (1 GiB): {copy_gbps:.0f} GB/s read+write", flush=True)
    batches = [1, 256] if args.quick else BATCHES
    contexts = [1536, 4096, 16384] if args.quick else CONTEXTS
    pre = bench_prefill(cp, timer, PREFILL_TOKENS, log)
    wri = [] if args.prefill_only else bench_writer(cp, timer, log)
    dec = [] if args.prefill_only else bench_decode(cp, timer, batches, contexts, l2, copy_gbps, log,
                                                    not args.no_tune)
    summary(copy_gbps, dec, pre, wri)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / path.name).write_text("\n".join(lines) + "\n")
    print(f"\nappended {len(lines)} lines to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
