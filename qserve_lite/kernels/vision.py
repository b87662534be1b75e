"""The vision tower's row and attention ops (SigLIP + the mlp_downsample projector): LayerNorm with bias, GELU
(tanh or exact erf), bidirectional multi-head attention. fp16 in, fp16 out, fp32 math in between.

One function per op, written against the array module: numpy is the twin, CuPy runs the same arithmetic on
the device (GELU as one fused cupy.ElementwiseKernel; the attention's two batched products through cuBLAS
(cupy.matmul, fp16 inputs, fp32 accumulation, fp16 out); LayerNorm and softmax as fp32 CuPy reductions). The
vision tower is eager (no CUDA graph), so cuBLAS is allowed here.

Numerics, per element (both backends):
    layer_norm  y = fp16((x32 - mean) * (1 / sqrt(var + eps)) * w32 + b32), mean and (biased) var in fp32
    gelu tanh   y = fp16(0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))))   (gelu_pytorch_tanh)
    gelu erf    y = fp16(0.5 x (1 + erf(x / sqrt(2))))                       (nn.GELU(), the projector's)
    attention   s = fp16(q' . k) with q' = fp16(q / sqrt(D)), p = fp16(softmax_fp32(s)), o = fp16(p . v)
The backends agree within the fp32 reduction order and the transcendental functions' last ulps before the
final fp16 rounding: their fp16 results are equal or one ulp apart (the products also differ by cuBLAS's
accumulation order; tests compare with a relative tolerance).
"""

from __future__ import annotations

import math

import numpy as np

from qserve_lite.core.backend import is_cupy

ATTENTION_TEMP_BYTES = 1 << 30  # fp32 score bytes one attention chunk may hold (images per chunk follow)

_gelu_kernels: dict[str, object] = {}

_GELU_SOURCE = {
    "tanh": "float v = (float)x; float t = tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v));"
            " y = (T)(0.5f * v * (1.0f + t));",
    "erf": "float v = (float)x; y = (T)(0.5f * v * (1.0f + erff(v * 0.7071067811865476f)));",
}


def _f32(x, xp):
    return x.astype(xp.float32)


def layer_norm(x, weight, bias, eps: float, xp=np):
    """LayerNorm over the last axis of x [..., k] (fp16 or float) with weight and bias [k] -> fp16."""
    x32 = _f32(x, xp)
    mean = x32.mean(axis=-1, keepdims=True)
    x32 -= mean
    var = (x32 * x32).mean(axis=-1, keepdims=True)
    x32 *= 1.0 / xp.sqrt(var + xp.float32(eps))
    x32 *= _f32(weight, xp)
    x32 += _f32(bias, xp)
    return x32.astype(xp.float16)


def _erf(x):
    """erf on a float32 numpy array (scipy when installed, else math.erf element by element)."""
    try:
        from scipy.special import erf
    except ImportError:  # scipy is optional: fine for the tiny configs the CPU path runs
        return np.vectorize(math.erf, otypes=[np.float64])(x).astype(np.float32)
    return erf(x).astype(np.float32)


def gelu(x, approximate: str = "tanh", xp=np):
    """GELU of fp16 x -> fp16; approximate 'tanh' (SigLIP's gelu_pytorch_tanh) or 'none' (exact erf)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
    kind = "tanh" if approximate == "tanh" else "erf"
    if is_cupy(xp):
        kern = _gelu_kernels.get(kind)
        if kern is None:
            kern = _gelu_kernels[kind] = xp.ElementwiseKernel("T x", "T y", _GELU_SOURCE[kind],
                                                              f"qs_vision_gelu_{kind}")
        return kern(x.astype(xp.float16, copy=False))
    v = np.asarray(x, dtype=np.float32)
    if kind == "tanh":
        inner = np.float32(math.sqrt(2 / math.pi)) * (v + np.float32(0.044715) * v * v * v)
        return (np.float32(0.5) * v * (np.float32(1) + np.tanh(inner))).astype(np.float16)
    return (np.float32(0.5) * v * (np.float32(1) + _erf(v * np.float32(1 / math.sqrt(2))))).astype(np.float16)


def _matmul16(a, b, xp):
    """fp16 [..., m, k] @ [..., k, n] -> fp16, fp32 accumulation (cuBLAS on the device)."""
    if is_cupy(xp):
        return xp.matmul(a, b)
    return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)


def _softmax16(s, xp):
    """fp16 softmax over the last axis, computed in fp32."""
    s32 = _f32(s, xp)
    s32 -= s32.max(axis=-1, keepdims=True)
    xp.exp(s32, out=s32)
    s32 /= s32.sum(axis=-1, keepdims=True)
    return s32.astype(xp.float16)


def bidirectional_attention(qkv, num_heads: int, xp=np, temp_bytes: int = ATTENTION_TEMP_BYTES):
    """Unmasked multi-head attention of qkv fp16 [B, N, 3 * H * D] ([q | k | v], heads contiguous) ->
    fp16 [B, N, H * D]. Images go in chunks whose fp32 scores fit temp_bytes."""
    B, N, width = qkv.shape
    hd = width // 3
    D = hd // num_heads
    out = xp.empty((B, N, hd), dtype=xp.float16)
    scale = xp.float32(1.0 / math.sqrt(D))
    per_image = 4 * num_heads * N * N
    chunk = max(1, min(B, temp_bytes // max(per_image, 1)))
    for b0 in range(0, B, chunk):
        part = qkv[b0 : b0 + chunk].reshape(-1, N, 3, num_heads, D)
        q = (_f32(part[:, :, 0], xp) * scale).astype(xp.float16).transpose(0, 2, 1, 3)  # [b, H, N, D]
        k = part[:, :, 1].transpose(0, 2, 3, 1)  # [b, H, D, N]
        v = part[:, :, 2].transpose(0, 2, 1, 3)  # [b, H, N, D]
        if is_cupy(xp):
            q, k, v = (xp.ascontiguousarray(t) for t in (q, k, v))
        p = _softmax16(_matmul16(q, k, xp), xp)
        o = _matmul16(p, v, xp)  # [b, H, N, D]
        out[b0 : b0 + chunk] = o.transpose(0, 2, 1, 3).reshape(-1, N, hd)
    return out
