"""cuBLAS through CuPy's bindings: the library handle on the current stream, and the fp16 GEMM (fp32
accumulation) that gemm.gemm("f16", cublas=True) uses for large products outside CUDA graphs (vision tower):
cuBLAS reaches ~2.3x our mma.sync fp16 kernel there (H200, 2026-12-02, benchmarks/kernels.py: ~700-780 vs
~310-335 TFLOP/s at 1024-4096 tokens). Not capturable in a CUDA graph (CuPy refuses cuBLAS during capture):
gemm.gemm keeps our kernel while the stream is capturing."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy

CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT = 2, 0, 68, -1
_F32_ONE = np.ones(1, dtype=np.float32)
_F32_ZERO = np.zeros(1, dtype=np.float32)
_bias_kernels: dict = {}


def cublas_lib():
    try:
        from cupy_backends.cuda.libs import cublas
    except ImportError:  # pragma: no cover - older CuPy
        from cupy.cuda import cublas
    return cublas


def handle_on_current_stream() -> int:
    """CuPy's cuBLAS handle of this device, bound to the current stream."""
    cupy = import_cupy()
    handle = cupy.cuda.device.get_cublas_handle()
    cublas_lib().setStream(handle, cupy.cuda.get_current_stream().ptr)
    return handle


def stream_is_capturing() -> bool:
    cupy = import_cupy()
    stream = cupy.cuda.get_current_stream()
    if hasattr(stream, "is_capturing"):
        return bool(stream.is_capturing())
    return bool(cupy.cuda.runtime.streamIsCapturing(stream.ptr))


def fp16_matmul_cublas(x, lda: int, w, ldw: int, k: int, out, bias=None):
    """out [M, N] (fp16 or fp32, rows out.strides[0]) = x [M, :k] . w [N, :k]^T, fp16 operands with row
    strides lda / ldw, fp32 accumulation; then + bias as fp16(fp32(out) + fp32(bias)) (fp16 out) or
    out + fp32(bias) (fp32 out): cuda/gemm.cu's f16 epilogue."""
    cupy = import_cupy()
    m, n = out.shape
    out_f32 = out.dtype == cupy.float32
    ldo = out.strides[0] // out.itemsize if m > 1 else n
    # Row-major Y[M, N] = X W^T is column-major Y^T[N, M] = op(W) X with op = T on W stored [N, ldw].
    cublas_lib().gemmEx(handle_on_current_stream(), 1, 0, n, m, k, _F32_ONE.ctypes.data, w.data.ptr,
                        CUDA_R_16F, ldw, x.data.ptr, CUDA_R_16F, lda, _F32_ZERO.ctypes.data, out.data.ptr,
                        CUDA_R_32F if out_f32 else CUDA_R_16F, ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    if bias is not None:
        key = bool(out_f32)
        kern = _bias_kernels.get(key)
        if kern is None:
            body = "y = y + (float)b" if out_f32 else "y = (half)((float)y + (float)b)"
            kern = _bias_kernels[key] = cupy.ElementwiseKernel("T b", "Y y", body, f"qs_bias_add_{int(key)}")
        kern(bias.astype(cupy.float16, copy=False), out)
    return out
