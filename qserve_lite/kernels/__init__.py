"""The kernel layer: every device op of qserve-lite as a numpy specification (its "twin") and a CUDA kernel.

One family per row: the spec module holds the public functions and their numpy twins (the twins are the
specification the kernels must match, bit for bit unless the module documents a tolerance); the launcher
(kernels/cuda/*.py) checks arguments, picks tiles / split-K and launches the .cu source (kernels/cuda/*.cu,
compiled at run time with NVRTC by kernels/cuda/jit.py).

    family                            spec module (public functions)  launcher             .cu source
    --------------------------------  ------------------------------  -------------------  -------------------
    per-token INT8 quantization;      act_quant.py                    cuda/rows.py         cuda/rows.cu
      SiLU(gate) * up (+ quant)
    residual-add + RMSNorm (+ quant)  norm_quant.py                   cuda/rows.py         cuda/rows.cu
    one device linear (every mode)    linear.py                       cuda/gemm.py         cuda/gemm.cu
    W4A8 GEMM (per-channel, g128)     w4a8_gemm.py                    cuda/gemm.py         cuda/gemm.cu
      decode, M <= 16 tokens          (through cuda/gemm.py)          cuda/gemm_skinny.py  cuda/gemm_skinny.cu
      Hopper (sm_90a), int8 modes     (through cuda/gemm.py)          cuda/gemm_sm90.py    cuda/gemm_sm90.cu
      dequantize + cuBLAS INT8        w4a8_gemm.py, method="cublas"   cuda/cublas.py       cuda/cublas.cu
    W8A8 GEMM                         w8a8_gemm.py                    cuda/gemm.py         cuda/gemm.cu
    fp16 GEMM (fp32 accumulation)     fp16_gemm.py                    cuda/gemm.py         cuda/gemm.cu
    RoPE + KV cache writer            attention.py (rope_write_kv)    cuda/kv_writer.py    cuda/kv_writer.cu
    decode / prefill attention        attention.py                    cuda/attention.py    cuda/attention.cu
    KV4 / KV8 quantization            kv_quant.py                     (fused into the writer and attention)
    paged KV pool (page layout)       paged_kv.py                     (a buffer: no kernel of its own)
    greedy choice: argmax per row     argmax.py                       cuda/argmax.py       cuda/argmax.cu
    vision tower: LayerNorm, GELU,    vision.py                       (CuPy ops, one ElementwiseKernel, cuBLAS
      unmasked attention                                                batched products; eager only)

The decode-step fusions (the embedding gather inside the first RMSNorm, the wide RoPE / KV writer block, the
early loads of the RMSNorm kernel, the argmax kernel, the o_proj input quantized inside the decode attention)
can be switched off for measurements: fusions.py.

Shared by the launchers: cuda/device.py (device properties, Hopper checks; cuda/arch_probe.cu),
cuda/workspace.py (split-K workspaces; `pin_workspaces` / `release_workspaces` for CUDA graphs),
cuda/args.py (argument checks), cuda/driver.py (TMA descriptors and raw launches through the CUDA driver),
cuda/common.cuh, cuda/w4.cuh and cuda/sm90.cuh (device helpers the .cu files include).

Dispatch rule: every public function takes numpy or CuPy arrays (or an `xp` module argument); numpy runs the
twin, CuPy runs the launcher. The launchers import CuPy only when called (core.backend.import_cupy), so the
whole package imports on a machine without CuPy.

Re-exported here: the public ops below. `fp16_gemm` and `linear` are also the names of their modules; the
package attribute is the function, so reach a module itself with `from qserve_lite.kernels.linear import ...`
or importlib.import_module("qserve_lite.kernels.linear").
"""

from qserve_lite.kernels.act_quant import (
    QuantizedActivation,
    dequantize_per_token,
    quantize_per_token,
    silu_mul,
    silu_mul_quant,
)
from qserve_lite.kernels.attention import (
    decode_attention,
    head_hadamard,
    prefill_attention,
    rope_write_kv,
)
from qserve_lite.kernels.fp16_gemm import fp16_gemm
from qserve_lite.kernels.kv_quant import kv_dequantize, kv_quantize
from qserve_lite.kernels.linear import LINEAR_MODES, linear
from qserve_lite.kernels.norm_quant import rms_norm, rms_norm_quant
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.kernels.w4a8_gemm import w4_to_int8, w4a8_group_gemm_packed, w4a8_per_channel_gemm_packed

__all__ = [
    "LINEAR_MODES",
    "PagedKVPool",
    "QuantizedActivation",
    "decode_attention",
    "dequantize_per_token",
    "fp16_gemm",
    "head_hadamard",
    "kv_dequantize",
    "kv_quantize",
    "linear",
    "prefill_attention",
    "quantize_per_token",
    "rms_norm",
    "rms_norm_quant",
    "rope_write_kv",
    "silu_mul",
    "silu_mul_quant",
    "w4_to_int8",
    "w4a8_group_gemm_packed",
    "w4a8_per_channel_gemm_packed",
]
