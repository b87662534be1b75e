"""Kernel benchmark: qserve-lite's W4A8 / W8A8 / fp16 GEMMs against cuBLAS FP16 and cuBLAS INT8 on the
Llama-3-8B linear shapes, and the fused norm / activation quantizers against a device-to-device copy.

    python benchmarks/kernels.py [--tune] [--quick] [--out DIR]

Every number of a table comes from the same run. Timing: CUDA events around a batch of back-to-back
launches queued behind a spin kernel (so host launch overhead never shows), the median of 5 batches after a
warm-up. Weights rotate over enough copies to exceed twice the L2 cache (each decode step reads every layer's
weights once from DRAM); activations do not rotate (in a forward they were just written, hence in L2).
Results: a table on stdout and JSON lines appended to benchmarks/results/<date>-<gpu>-kernels.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qserve_lite.bench.results import git_sha  # noqa: E402  (the checkout's commit, +dirty)
from qserve_lite.kernels.cuda import gemm_skinny  # noqa: E402  (the launchers import cupy only when called)
from qserve_lite.kernels.cuda.cublas import epilogue_i32, int8_matmul_cublas, w4_to_int8  # noqa: E402
from qserve_lite.kernels.cuda.device import wgmma_available  # noqa: E402
from qserve_lite.kernels.cuda.gemm import (  # noqa: E402
    DECODE_CONFIGS,
    NAMED_CONFIGS,
    PREFILL_CONFIGS,
    TUNE_CONFIGS,
    WGMMA_CONFIGS,
    choose_config,
    choose_splits,
    gemm,
)
from qserve_lite.kernels.cuda.gemm_sm90 import SM90_CONFIGS, choose_sm90, sm90_splits  # noqa: E402

SHAPES = {  # name: (N out features, K in features), Llama-3-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
MS = [1, 16, 64, 128, 256, 1024, 4096, 16384]
SKINNY_TUNE = [(1, 8, 2), (1, 16, 1), (2, 4, 2), (2, 8, 2), (4, 4, 2), (1, 8, 1), (1, 4, 1), (4, 2, 1)]
ROW_MS = [1, 16, 64, 256, 1024, 4096, 16384]


def model_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(N, K) of the four linears of a shipped config, named like SHAPES with the model as prefix."""
    from qserve_lite.io.shipped_configs import load_config

    c = load_config(name)
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    return {f"{name}:qkv": (qkv, c.hidden_size), f"{name}:o": (c.hidden_size, c.num_heads * c.head_dim),
            f"{name}:gate_up": (2 * c.intermediate_size, c.hidden_size),
            f"{name}:down": (c.hidden_size, c.intermediate_size)}


# ---- precompiling every module a run may use, in parallel (fills CuPy's on-disk cache) ----

def _compile_job(job):
    name, defines = job
    from qserve_lite.kernels.cuda.jit import load_module

    t0 = time.perf_counter()
    try:
        load_module(name, defines)
    except Exception as e:  # noqa: BLE001 - report every failing module, keep compiling the rest
        return name, defines, f"FAILED: {e}"
    return name, defines, time.perf_counter() - t0


def _gemm_modules(hopper: bool) -> list[tuple[str, dict]]:
    """gemm.cu: every named config in every mode it supports (wgmma ones only on Hopper), then the
    --tune alternatives in g128 mode."""
    jobs = []
    for cfg in NAMED_CONFIGS.values():
        for mode in range(4):
            if cfg.wgmma and (mode == 3 or not hopper):
                continue
            for aligned in (True, False):
                for out_f32 in ((False, True) if mode == 3 else (False,)):
                    jobs.append(("gemm.cu", cfg.defines(mode, aligned, out_f32)))
    for cfg in TUNE_CONFIGS.values():
        jobs.append(("gemm.cu", cfg.defines(1, True, False)))
    if hopper:
        jobs += [("gemm_sm90.cu", cfg.defines(mode)) for cfg in SM90_CONFIGS.values() for mode in (0, 1, 2)]
    return jobs


def _skinny_modules() -> list[tuple[str, dict]]:
    """gemm_skinny.cu: both W4 modes, both NJ, every --tune tile, aligned or not."""
    jobs = []
    for mode in (0, 1):
        for nj in (1, 2):
            for c in SKINNY_TUNE:
                for aligned in (0, 1):
                    defines = {"QS_MODE": mode, "QS_SK_NJ": nj, "QS_SK_CB": c[0], "QS_SK_KW": c[1],
                               "QS_SK_DEPTH": c[2], "QS_ALIGNED": aligned}
                    jobs.append(("gemm_skinny.cu", defines))
    return jobs


def _row_modules() -> list[tuple[str, dict]]:
    """rows.cu: the three row ops (fp32 input only for op 0) at every width and vectorisation."""
    jobs = []
    for op in range(3):
        for nc in (1, 2, 4, 8):
            for vec in (0, 1):
                for in_f32 in ((0, 1) if op == 0 else (0,)):
                    defines = {"QS_ROW_OP": op, "QS_NC": nc, "QS_VEC": vec, "QS_IN_F32": in_f32}
                    jobs.append(("rows.cu", defines))
    return jobs


def all_modules() -> list[tuple[str, dict]]:
    jobs = _gemm_modules(wgmma_available())
    jobs += _skinny_modules()
    jobs.append(("cublas.cu", {}))  # the cuBLAS route's helper kernels (w4_to_int8, epilogue)
    jobs += _row_modules()
    jobs.append(("arch_probe.cu", {}))
    return jobs


def precompile(workers: int) -> None:
    jobs = all_modules()
    t0 = time.perf_counter()
    # spawn, not fork: the parent may already hold a CUDA context, which forked children cannot use
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_job, jobs))
    failed = [(n, d, t) for n, d, t in results if isinstance(t, str)]
    for name, defines, msg in failed[:3]:
        print(f"{name} {defines}: {msg}", flush=True)
    times = [t for _, _, t in results if not isinstance(t, str)]
    print(f"precompiled {len(jobs) - len(failed)} of {len(jobs)} modules in {time.perf_counter() - t0:.1f} s "
          f"(longest {max(times, default=0):.1f} s) with {workers} processes", flush=True)


# ---- timing ----

SPIN_SRC = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


class Timer:
    def __init__(self, cp):
        self.cp = cp
        self.spin = cp.RawKernel(SPIN_SRC, "spin")

    def __call__(self, fn, rounds: int = 5, target_ms: float = 10.0) -> float:
        """Median GPU time (seconds) of fn(i) per call; NaN (and the error printed) if fn fails."""
        try:
            return self._time(fn, rounds, target_ms)
        except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
            print(f"  FAILED: {e}", flush=True)
            self.cp.cuda.Device().synchronize()
            return float("nan")

    def _time(self, fn, rounds: int, target_ms: float) -> float:
        cp = self.cp
        fn(0)  # warm-up (compilation, workspaces)
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        t0 = time.perf_counter()
        start.record()
        fn(1)
        end.record()
        host = time.perf_counter() - t0  # enqueue cost only: the GPU runs asynchronously
        end.synchronize()
        single = max(cp.cuda.get_elapsed_time(start, end) / 1e3, 1e-6)
        iters = int(min(200, max(3, target_ms / 1e3 / single)))
        spin_ns = int(min(5e8, (host * 1.3 * iters + 1e-4) * 1e9))
        times = []
        for _ in range(rounds):
            self.spin((1,), (1,), (np.uint64(spin_ns),))  # the GPU waits while the host queues the batch
            start.record()
            for i in range(iters):
                fn(i)
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / iters)
        return statistics.median(times)


def copies_for(nbytes: int, l2: int) -> int:
    return int(min(32, max(1, -(-2 * l2 // max(1, nbytes)))))


# ---- GEMM benchmark ----

def tune_candidates(m, n, k):
    """(label, config, splits) alternatives to the heuristic choice for the g128 GEMM at this M."""
    cands = {}
    out = []
    if m <= gemm_skinny.SKINNY_MAX_M:
        for cb, kw, depth in SKINNY_TUNE:
            c = gemm_skinny.SkinnyConfig(cb, kw, depth)
            base = gemm_skinny.skinny_splits(c, m, n, k)
            for sp in sorted({base, 2 * base}):
                out.append((f"tune:skinny{cb}x{kw}x{depth}:s{sp}", c, sp))
    if m <= 64:
        cands.update({f"decode{b}": c for b, c in DECODE_CONFIGS.items() if b >= m})
        cands.update({name: c for name, c in TUNE_CONFIGS.items() if c.bm >= m})
    elif m <= 256:
        cands["decode64"] = DECODE_CONFIGS[64]
    if m >= 64:
        cands.update(PREFILL_CONFIGS)
        if wgmma_available():
            cands.update(WGMMA_CONFIGS)
    if wgmma_available():
        out += _sm90_candidates(m, n, k)
    for name, c in cands.items():
        base = choose_splits(c, 1, m, n, k)
        for sp in (sorted({1, base, 2 * base}) if c.splitk else [1]):
            out.append((f"tune:{name}:s{sp}", c, sp))
    return out


def _sm90_candidates(m, n, k):
    """(label, config, splits) of the Hopper kernel: the tiles whose token height suits M, each with the
    heuristic split and, when the tiles leave SMs idle, the usual alternatives."""
    from qserve_lite.kernels.cuda.device import sm_count

    out = []
    for name, c in SM90_CONFIGS.items():
        if not (c.bm <= max(32, 2 * m) and (c.bm >= min(m, 64) or m <= 16)):
            continue
        tiles = -(-n // c.bn) * -(-m // c.bm)
        base = sm90_splits(c, m, n, k)
        cands = {1, base} | ({2, 3, 4, 6, 8} if tiles < sm_count() else set())
        out += [(f"tune:{name}:s{sp}", c, sp) for sp in sorted(cands)]
    return out


def make_group_params(rng, n, k):
    """Valid random g128 parameters in QServe's layout (s2 <= 16 keeps codes * s2 - z inside int8)."""
    from qserve_lite.core.pack import to_qserve_group_params

    groups = k // 128
    s2 = rng.integers(1, 17, (n, groups)).astype(np.uint8)
    lo = np.maximum(15 * s2.astype(np.int16) - 127, -128)
    zeros = (lo + (rng.random((n, groups)) * (127 - lo + 1)).astype(np.int16)).astype(np.int16)
    return to_qserve_group_params(s2, zeros)


class GemmWeights:
    """One Llama linear's weights in every format, each in enough copies to defeat the L2 cache."""

    def __init__(self, cp, rng, n: int, k: int, l2: int):
        s2s_np, s2z_np = make_group_params(rng, n, k)
        self.n, self.k = n, k
        self.c4, self.c8 = copies_for(n * k // 2, l2), copies_for(n * k, l2)
        self.c16 = copies_for(2 * n * k, l2)
        self.qw = [cp.random.randint(-128, 128, (n, k // 2), dtype=cp.int8) for _ in range(self.c4)]
        self.s2s, self.s2z = cp.asarray(s2s_np), cp.asarray(s2z_np)
        self.s1 = cp.asarray(rng.uniform(1e-3, 1e-2, n).astype(np.float16))
        self.sz = cp.asarray(rng.uniform(1e-3, 1e-2, n).astype(np.float16))
        self.w8 = [cp.random.randint(-128, 128, (n, k), dtype=cp.int8) for _ in range(self.c8)]
        self.w16 = [(cp.random.standard_normal((n, k), dtype=cp.float32) / 64).astype(cp.float16)
                    for _ in range(self.c16)]
        self.ws8 = cp.asarray(rng.uniform(1e-3, 1e-2, n).astype(np.float16))
        # "dequantize W4 to int8 once": the level-1 int8 weights, cached
        self.w8_from_w4 = [w4_to_int8(q, self.s2s, self.s2z) for q in self.qw[: self.c8]]


TUNE_ONLY: tuple[str, ...] = ()  # --tune-only: label prefixes of the candidates to time (empty: all)


def _time_tune_candidates(timer, g128, m: int, n: int, k: int, t: dict) -> None:
    """Time the g128 GEMM with each of tune_candidates(m, n, k) into t (keys "tune:...")."""
    for key, c, sp in tune_candidates(m, n, k):
        if TUNE_ONLY and not key[len("tune:"):].startswith(TUNE_ONLY):
            continue
        t[key] = timer(lambda i, c=c, sp=sp: g128(i, c, sp))


def _g128_heuristic_label(m: int, n: int, k: int) -> str:
    """The g128 GEMM's heuristic choice at (M, N, K): the skinny tile or the GemmConfig, and its splits."""
    if m <= gemm_skinny.SKINNY_MAX_M:
        c = gemm_skinny.choose_skinny(m, n, k)
        return f"skinny {c.cb}x{c.kw}x{c.depth} splits {gemm_skinny.skinny_splits(c, m, n, k)}"
    if wgmma_available():
        c = choose_sm90(1, m, n, k)
        return f"sm90 {c.bn}x{c.bm} stages {c.stages_for(1)} splits {sm90_splits(c, m, n, k)}"
    c = choose_config(1, m, n, k)
    kind = "wgmma" if c.wgmma else "mma.sync"
    return f"{kind} {c.bn}x{c.bm}x{c.bk} splits {choose_splits(c, 1, m, n, k)}"


def bench_point(cp, timer, w: GemmWeights, m: int, tune: bool, rng) -> tuple[dict, dict]:
    """Times of every GEMM variant at one (shape, M), in seconds, and the heuristic's g128 tile."""
    n, k = w.n, w.k
    qx = cp.random.randint(-127, 128, (m, k), dtype=cp.int8)
    sx = cp.asarray(rng.uniform(1e-3, 1e-2, m).astype(np.float16))
    xs = cp.asarray(rng.standard_normal(m).astype(np.float32))
    x16 = cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
    acc = cp.empty((m, n), dtype=cp.int32)
    nd = len(w.w8_from_w4)

    def g128(i, config=None, splits=None):
        return gemm("w4_g128", qx, w.qw[i % w.c4], n, k, x_scales=sx, w_scales=w.s1, s2_scales=w.s2s,
                    s2_zeros=w.s2z, config=config, splits=splits)

    def pc(i):
        return gemm("w4_per_channel", qx, w.qw[i % w.c4], n, k, x_scales=sx, x_sums=xs, w_scales=w.s1,
                    w_szeros=w.sz)

    def w8a8(i):
        return gemm("w8", qx, w.w8[i % w.c8], n, k, x_scales=sx, w_scales=w.ws8)

    def f16_ours(i):
        return gemm("f16", x16, w.w16[i % w.c16], n, k)

    def cublas_fp16(i):
        return cp.matmul(x16, w.w16[i % w.c16].T)

    def cublas_int8(i):
        return int8_matmul_cublas(qx, w.w8[i % w.c8], out=acc)

    def int8cached(i):
        acc32 = int8_matmul_cublas(qx, w.w8_from_w4[i % nd], out=acc)
        return epilogue_i32(acc32, "w4_g128", sx, w.s1)

    def dequant_cublas(i):
        w8 = w4_to_int8(w.qw[i % w.c4], w.s2s, w.s2z)
        return epilogue_i32(int8_matmul_cublas(qx, w8, out=acc), "w4_g128", sx, w.s1)

    t = {"w4a8_g128": timer(g128), "w4a8_pc": timer(pc), "w8a8": timer(w8a8), "fp16_ours": timer(f16_ours),
         "cublas_fp16": timer(cublas_fp16), "cublas_int8": timer(cublas_int8)}
    if wgmma_available() and m > gemm_skinny.SKINNY_MAX_M:  # the pre-sm90 kernel, for comparison
        t["w4a8_g128_mma_kernel"] = timer(lambda i: g128(i, choose_config(1, m, n, k)))
    if m >= 256:
        t["g128_int8cached_cublas"] = timer(int8cached)
        t["g128_dequant_cublas"] = timer(dequant_cublas)
    if tune:
        _time_tune_candidates(timer, g128, m, n, k, t)
    return t, {"w4a8_g128": _g128_heuristic_label(m, n, k)}


def bench_gemms(cp, timer, ms, shapes, tune: bool, l2: int, log):
    rng = np.random.default_rng(0)
    rows = []
    for sname, (n, k) in shapes.items():
        w = GemmWeights(cp, rng, n, k, l2)
        for m in ms:
            t, cfg = bench_point(cp, timer, w, m, tune, rng)
            flops = 2.0 * m * n * k
            row = {"shape": sname, "n": n, "k": k, "m": m, "times_us": {a: b * 1e6 for a, b in t.items()},
                   "tops": {a: flops / b / 1e12 for a, b in t.items()}, "g128_config": cfg["w4a8_g128"]}
            rows.append(row)
            log(dict(bench="gemm", **row))
            us = row["times_us"]
            tuned = [(v, kk) for kk, v in us.items() if kk.startswith("tune:") and v == v]
            best = min(tuned) if tuned else None
            print(f"{sname:8s} M={m:6d}  g128 {us['w4a8_g128']:9.1f}us {row['tops']['w4a8_g128']:7.1f}T"
                  f"  pc {us['w4a8_pc']:9.1f}  w8a8 {us['w8a8']:9.1f}  f16 {us['fp16_ours']:9.1f}"
                  f"  cuBLAS f16 {us['cublas_fp16']:9.1f} i8 {us['cublas_int8']:9.1f}"
                  f"  x{us['cublas_fp16'] / us['w4a8_g128']:5.2f}/x{us['cublas_int8'] / us['w4a8_g128']:5.2f}"
                  + (f"  best {best[1]} {best[0]:.1f}" if best else ""), flush=True)
        del w
        cp.get_default_memory_pool().free_all_blocks()
    return rows


# ---- norm / activation quantizers ----

def bench_rows(cp, timer, ms, log):
    from qserve_lite.kernels.act_quant import quantize_per_token, silu_mul_quant
    from qserve_lite.kernels.norm_quant import rms_norm_quant

    hidden, inter = 4096, 14336
    rows = []
    copy_cache = {}

    def copy_time(nbytes_total):
        half = max(16, nbytes_total // 2)
        if half not in copy_cache:
            src = cp.empty(half, dtype=cp.uint8)
            dst = cp.empty(half, dtype=cp.uint8)
            copy_cache[half] = timer(lambda i: dst.data.copy_from_device_async(src.data, half))
        return copy_cache[half]

    big = 1 << 30
    t_big = copy_time(2 * big)
    copy_gbps = 2 * big / t_big / 1e9
    log(dict(bench="copy", bytes=2 * big, time_us=t_big * 1e6, gbps=copy_gbps))
    print(f"device-to-device copy (cudaMemcpyAsync, 1 GiB): {copy_gbps:.0f} GB/s read+write", flush=True)
    gamma = (1 + 0.1 * cp.random.standard_normal(hidden, dtype=cp.float32)).astype(cp.float16)
    for m in ms:
        x = cp.random.standard_normal((m, hidden), dtype=cp.float32).astype(cp.float16)
        res = cp.random.standard_normal((m, hidden), dtype=cp.float32).astype(cp.float16)
        gu = cp.random.standard_normal((m, 2 * inter), dtype=cp.float32).astype(cp.float16)
        cases = {  # g128 consumers need no per-token sums; per-channel ones do ("+sum")
            "rmsnorm_quant": (lambda i, x=x, res=res: rms_norm_quant(x, gamma, 1e-5, res, cp, False),
                              m * hidden * 7 + 2 * hidden),
            "rmsnorm_quant+sum": (lambda i, x=x, res=res: rms_norm_quant(x, gamma, 1e-5, res, cp),
                                  m * hidden * 7 + 2 * hidden),
            "silu_mul_quant": (lambda i, gu=gu: silu_mul_quant(gu, cp, False), m * inter * 5),
            "silu_mul_quant+sum": (lambda i, gu=gu: silu_mul_quant(gu, cp), m * inter * 5),
            "quant+sum": (lambda i, x=x: quantize_per_token(x, cp), m * hidden * 3),
        }
        for name, (fn, nbytes) in cases.items():
            t = timer(fn)
            tc = copy_time(nbytes)
            gbps = nbytes / t / 1e9
            row = {"kernel": name, "m": m, "bytes": nbytes, "time_us": t * 1e6, "gbps": gbps,
                   "copy_same_bytes_us": tc * 1e6, "frac_of_copy_1GiB": gbps / copy_gbps,
                   "frac_of_copy_same_bytes": tc / t}
            rows.append(row)
            log(dict(bench="rows", **row))
            print(f"{name:18s} M={m:6d} {t * 1e6:9.1f} us {gbps:7.0f} GB/s  {gbps / copy_gbps:5.1%} of the "
                  f"1 GiB copy; a copy of the same bytes {tc * 1e6:8.1f} us ({tc / t:5.1%})", flush=True)
    return rows


def profile_one(spec: str) -> None:
    """One warm-up and one measured launch of a GEMM (for `ncu --launch-skip 1 --launch-count 1`)."""
    import cupy as cp

    parts = spec.split(":")
    sname, m, kernel = parts[0], int(parts[1]), parts[2]
    skinny = {f"skinny{a}x{b}x{c}": gemm_skinny.SkinnyConfig(a, b, c) for a, b, c in SKINNY_TUNE}
    named = NAMED_CONFIGS | TUNE_CONFIGS | SM90_CONFIGS | skinny
    cfg = named[parts[3]] if len(parts) > 3 and parts[3] else None
    splits = int(parts[4]) if len(parts) > 4 else None
    n, k = SHAPES[sname]
    rng = np.random.default_rng(0)
    qx = cp.random.randint(-127, 128, (m, k), dtype=cp.int8)
    sx = cp.asarray(rng.uniform(1e-3, 1e-2, m).astype(np.float16))
    xs = cp.asarray(rng.standard_normal(m).astype(np.float32))
    s1 = cp.asarray(rng.uniform(1e-3, 1e-2, n).astype(np.float16))
    s2s, s2z = (cp.asarray(a) for a in make_group_params(rng, n, k))
    qw = cp.random.randint(-128, 128, (n, k // 2), dtype=cp.int8)
    w8 = cp.random.randint(-128, 128, (n, k), dtype=cp.int8)
    for _ in range(2):
        if kernel == "g128":
            gemm("w4_g128", qx, qw, n, k, x_scales=sx, w_scales=s1, s2_scales=s2s, s2_zeros=s2z,
                 config=cfg, splits=splits)
        elif kernel == "pc":
            gemm("w4_per_channel", qx, qw, n, k, x_scales=sx, x_sums=xs, w_scales=s1, w_szeros=s1,
                 config=cfg, splits=splits)
        elif kernel == "w8":
            gemm("w8", qx, w8, n, k, x_scales=sx, w_scales=s1, config=cfg, splits=splits)
        cp.cuda.Device().synchronize()


def summary(gemm_rows, row_rows) -> None:
    print("\n=== W4A8 vs cuBLAS (speed-up = cuBLAS time / our time) ===")
    hdr = (f"{'shape':8s} {'M':>6s} | {'g128 us':>9s} {'pc us':>9s} {'f16 cuBLAS':>10s} {'i8 cuBLAS':>9s} "
           f"| {'g128/f16':>8s} {'g128/i8':>7s} {'pc/f16':>6s} {'pc/i8':>6s} | {'best big-M path':>16s} "
           f"{'/i8':>5s}")
    print(hdr)
    for r in gemm_rows:
        t = r["times_us"]
        big = ""
        if "g128_int8cached_cublas" in t:
            opts = {"ours": t["w4a8_g128"], "int8cached": t["g128_int8cached_cublas"],
                    "dequant+cublas": t["g128_dequant_cublas"]}
            bname = min(opts, key=opts.get)
            big = f"{bname:>16s} {t['cublas_int8'] / opts[bname]:5.2f}"
        print(f"{r['shape']:8s} {r['m']:6d} | {t['w4a8_g128']:9.1f} {t['w4a8_pc']:9.1f} "
              f"{t['cublas_fp16']:10.1f} {t['cublas_int8']:9.1f} | {t['cublas_fp16'] / t['w4a8_g128']:8.2f} "
              f"{t['cublas_int8'] / t['w4a8_g128']:7.2f} {t['cublas_fp16'] / t['w4a8_pc']:6.2f} "
              f"{t['cublas_int8'] / t['w4a8_pc']:6.2f} | {big}")
    if row_rows:
        print("\n=== norm / activation quantizers (fraction of a 1 GiB device copy's GB/s) ===")
        for r in row_rows:
            print(f"{r['kernel']:18s} M={r['m']:6d} {r['time_us']:9.1f} us {r['gbps']:7.0f} GB/s "
                  f"{r['frac_of_copy_1GiB']:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true", help="also time every tile configuration of the g128 GEMM")
    ap.add_argument("--quick", action="store_true", help="fewer M values")
    ap.add_argument("--precompile-only", action="store_true")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-rows", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--model", default=None,
                    help="time the linears of this shipped config (e.g. llama-2-70b) instead of Llama-3-8B's")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--tune-only", default=None, metavar="PREFIXES",
                    help="--tune: only the tiles whose names start with one of these (comma-separated, e.g. "
                         "e,h128x256,b128x128)")
    ap.add_argument("--out", default=None, help="also copy the JSON lines into this folder")
    ap.add_argument("--profile", default=None, metavar="SHAPE:M:KERNEL[:CONFIG:SPLITS]",
                    help="run one GEMM twice (warm-up + the launch to profile with ncu) and exit")
    args = ap.parse_args()
    global TUNE_ONLY
    TUNE_ONLY = tuple(p for p in (args.tune_only or "").split(",") if p)
    if args.profile:
        profile_one(args.profile)
        return

    precompile(args.workers)
    if args.precompile_only:
        return
    import cupy as cp

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2 = int(props.get("l2CacheSize", 50 << 20))
    sha = git_sha(ROOT)
    date = dt.date.today().isoformat()
    gpu_slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{date}-{gpu_slug}-kernels.jsonl"
    lines = []

    def log(obj):
        obj = dict(date=date, gpu=gpu, git_sha=sha, **obj)
        lines.append(json.dumps(obj))
        with open(path, "a") as f:
            f.write(lines[-1] + "\n")

    print(f"{gpu}, {props['multiProcessorCount']} SMs, L2 {l2 >> 20} MiB, CuPy {cp.__version__}, "
          f"git {sha}, {date}", flush=True)
    timer = Timer(cp)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else ([1, 64, 256, 4096] if args.quick else MS)
    shapes = model_shapes(args.model) if args.model else {s: SHAPES[s] for s in args.shapes.split(",")}
    gemm_rows = [] if args.skip_gemm else bench_gemms(cp, timer, ms, shapes, args.tune, l2, log)
    row_ms = [m for m in ROW_MS if m in ms or not args.ms]
    row_rows = [] if args.skip_rows else bench_rows(cp, timer, row_ms, log)
    summary(gemm_rows, row_rows)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / path.name).write_text("\n".join(lines) + "\n")
    print(f"\nappended {len(lines)} lines to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
