"""Every CUDA source compiles for sm_80 and sm_90a with the local nvcc (no GPU needed; skipped without nvcc).

The loader compiles the same text with NVRTC on the GPU machine; nvcc here catches syntax and PTX errors in
CI. Each source is compiled in the configurations the launchers use most (cubin only, no host code)."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qserve_lite.kernels.cuda.jit import CUDA_DIR, define_options, source_text

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)
ARCHS = {"sm_80": ["-arch=sm_80"], "sm_90a": ["-gencode=arch=compute_90a,code=sm_90a"]}

# (source, macros). A GEMM compile takes ~5 s, so two configurations cover its code paths: W4 g128 with the
# decode tile (packed-weight dequant, in-block and cross-block split-K) and fp16 with a prefill tile (ldmatrix
# weights, unaligned byte loads, fp32 output); the W4 per-channel and W8 modes differ only in the epilogue;
# the Hopper wgmma variant compiles for sm_90a only.
CONFIGS = [
    ("gemm.cu", {"QS_MODE": 1, "QS_BN": 128, "QS_BM": 16, "QS_BK": 256, "QS_WN": 4, "QS_WM": 1, "QS_WK": 2,
                 "QS_STAGES": 4, "QS_SPLITK": 1}),
    ("gemm.cu", {"QS_MODE": 3, "QS_BN": 128, "QS_BM": 128, "QS_BK": 128, "QS_WN": 2, "QS_WM": 4, "QS_WK": 1,
                 "QS_STAGES": 3, "QS_SPLITK": 0, "QS_ALIGNED": 0, "QS_OUT_F32": 1}),
    ("gemm.cu", {"QS_MODE": 0, "QS_BN": 256, "QS_BM": 128, "QS_BK": 128, "QS_WN": 8, "QS_WM": 1, "QS_WK": 1,
                 "QS_STAGES": 4, "QS_SPLITK": 1, "QS_WGMMA": 1}),  # Hopper only (see SM90_ONLY)
    ("gemm_sm90.cu", {"QS_MODE": 1, "QS_BM": 128, "QS_NWG": 2, "QS_STAGES": 4, "QS_SM90": 1}),  # Hopper only
    ("gemm_sm90.cu", {"QS_MODE": 2, "QS_BM": 64, "QS_NWG": 1, "QS_STAGES": 6, "QS_SM90": 1}),
    ("gemm_sm90.cu", {"QS_MODE": 0, "QS_BM": 64, "QS_NWG": 2, "QS_STAGES": 6, "QS_CLUSTER": 2, "QS_SM90": 1}),
    ("gemm_sm90.cu", {"QS_MODE": 1, "QS_BM": 128, "QS_NWG": 1, "QS_STAGES": 4, "QS_MINB": 2,
                      "QS_EPI_ROWS": 32, "QS_SM90": 1}),
    ("cublas.cu", {}),  # W4 -> int8 and the int32 epilogue of the cuBLAS route: no configuration macros
    ("gemm_skinny.cu", {"QS_MODE": 1, "QS_SK_NJ": 2, "QS_SK_CB": 2, "QS_SK_KW": 4, "QS_SK_DEPTH": 2}),
    ("gemm_skinny.cu", {"QS_MODE": 0, "QS_SK_NJ": 1, "QS_SK_CB": 1, "QS_SK_KW": 8, "QS_SK_DEPTH": 1,
                        "QS_ALIGNED": 0}),
    ("sample.cu", {}),
    ("gptq.cu", {"QS_GPTQ_KIND": 0}),
    ("gptq.cu", {"QS_GPTQ_KIND": 1}),
    ("gptq.cu", {"QS_GPTQ_KIND": 2}),
    ("rows.cu", {"QS_ROW_OP": 0, "QS_IN_F32": 1}),
    ("rows.cu", {"QS_ROW_OP": 1, "QS_NC": 4}),
    ("rows.cu", {"QS_ROW_OP": 1, "QS_NC": 2, "QS_PREFETCH": 1}),  # the decode norm (early residual / gamma)
    ("rows.cu", {"QS_ROW_OP": 2, "QS_NC": 2, "QS_VEC": 0}),
    ("arch_probe.cu", {}),
    ("argmax.cu", {"QS_AM_THREADS": 512, "QS_VEC": 1}),
    ("argmax.cu", {"QS_AM_THREADS": 512, "QS_VEC": 0}),
    ("attention.cu", {"QS_D": 128, "QS_BITS": 4, "QS_WARPS": 4, "QS_PF_WARPS": 4}),
    ("attention.cu", {"QS_D": 64, "QS_BITS": 8, "QS_WARPS": 4, "QS_PF_WARPS": 8}),
    ("attention.cu", {"QS_D": 128, "QS_BITS": 16, "QS_WARPS": 4, "QS_PF_WARPS": 4}),
    # decode tuning alternatives: persistent one-split blocks (+ deeper ring), faster combine (+ deeper ring)
    ("attention.cu", {"QS_D": 128, "QS_BITS": 4, "QS_WARPS": 4, "QS_PF_WARPS": 4, "QS_DEC_PERSIST": 1,
                      "QS_DEC_STAGES": 4}),
    ("attention.cu", {"QS_D": 64, "QS_BITS": 16, "QS_WARPS": 8, "QS_PF_WARPS": 4, "QS_DEC_PERSIST": 1}),
    ("attention.cu", {"QS_D": 128, "QS_BITS": 8, "QS_WARPS": 4, "QS_PF_WARPS": 4, "QS_DEC_COMBINE": 1,
                      "QS_DEC_STAGES": 8}),
    # decode writing the o_proj input (quant_out), with the default and the faster combine
    ("attention.cu", {"QS_D": 128, "QS_BITS": 4, "QS_WARPS": 4, "QS_PF_WARPS": 4, "QS_DEC_QUANT": 1}),
    ("attention.cu", {"QS_D": 64, "QS_BITS": 16, "QS_WARPS": 8, "QS_PF_WARPS": 4, "QS_DEC_QUANT": 1,
                      "QS_DEC_COMBINE": 1}),
    ("attention_sm90.cu", {"QS_D": 128, "QS_BITS": 4, "QS_STAGES": 2, "QS_SM90": 1}),  # Hopper only
    ("attention_sm90.cu", {"QS_D": 64, "QS_BITS": 8, "QS_STAGES": 4, "QS_SM90": 1}),
    ("attention_sm90.cu", {"QS_D": 128, "QS_BITS": 16, "QS_STAGES": 3, "QS_PV_SPLIT": 1, "QS_DEBUG": 2,
                           "QS_SM90": 1}),
    ("kv_writer.cu", {"QS_D": 128, "QS_BITS": 4, "QS_ROPE": 1}),
    ("kv_writer.cu", {"QS_D": 128, "QS_BITS": 4, "QS_ROPE": 1, "QS_PAIRS": 1}),
    ("kv_writer.cu", {"QS_D": 64, "QS_BITS": 8, "QS_ROPE": 1}),
    ("kv_writer.cu", {"QS_D": 128, "QS_BITS": 16, "QS_ROPE": 0}),
    ("kv_writer.cu", {"QS_D": 64, "QS_BITS": 4, "QS_ROPE": 1, "QS_KHAD": 1}),  # q / k Hadamard (k_hadamard)
    ("kv_writer.cu", {"QS_D": 128, "QS_BITS": 8, "QS_ROPE": 0, "QS_KHAD": 1}),
]


SM90_ONLY = {i for i, (_, d) in enumerate(CONFIGS) if d.get("QS_WGMMA") or d.get("QS_SM90")}


def test_every_source_is_covered():
    sources = {p.name for p in CUDA_DIR.glob("*.cu")}
    assert sources == {name for name, _ in CONFIGS}


def _compile(tmp: Path, name: str, defines: dict, arch: str) -> tuple[str, int, str]:
    # The loader's text (headers inlined) is what NVRTC sees; compile exactly that.
    src = tmp / f"{Path(name).stem}-{abs(hash((name, tuple(sorted(defines.items())), arch)))}.cu"
    src.write_text(source_text(name))
    cmd = [NVCC, "--cubin", "-std=c++17", *ARCHS[arch], *define_options(defines), str(src), "-o",
           str(src.with_suffix(".cubin"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return " ".join(cmd), proc.returncode, proc.stdout + proc.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_sources_compile_for_sm80_and_sm90a(tmp_path):
    jobs = [(name, defines, arch) for i, (name, defines) in enumerate(CONFIGS) for arch in ARCHS
            if arch == "sm_90a" or i not in SM90_ONLY]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda j: _compile(tmp_path, *j), jobs))
    failures = [f"{cmd}\n{log}" for cmd, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)
