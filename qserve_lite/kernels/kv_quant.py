"""KV4 / KV8 cache quantization: asymmetric, dynamic, per token per head (QServe's paged KV cache).

These numpy functions are the specification the CUDA cache writer and attention kernels must match bit
for bit. For every (batch, kv head, token), over that head's head_dim values, with fp32 operations
rounded to nearest even and no FMA contraction:

    x16      = fp16(x)                                    the GPU holds K/V in fp16
    mn, mx   = min(x16), max(x16)                         exact
    scale    = fp16((fp32(mx) - fp32(mn)) / (2^bits - 1))
               if scale == 0 (a constant head): scale = 1        (then code 0 reproduces the head exactly)
               else: scale = max(scale, fp16(|fp32(mn)| * 2^-15))   (keeps |zero| <= 2^15, see below)
    zero     = fp16(clip(-fp32(mn) / fp32(scale), +-65504))   a float zero in code units, as QServe stores
    code     = clip(rint(fp32(x16) / scale + zero), 0, 2^bits - 1)       uint8 (KV4 uses 0..15)
    x_hat    = (fp32(code) - fp32(zero)) * fp32(scale)    dequantized value attention reads (fp32)

QServe computes zero as -15*min/(max-min) from the unrounded range; we divide by the stored fp16 scale,
which keeps code/zero/scale mutually consistent. The scale floor only acts on degenerate KV8 heads
(range below |mn| * 255 / 2^15, i.e. a few fp16 ulps of the offset; KV4 heads never reach it) where
QServe's zero -mn/scale would overflow fp16 to inf and the head would dequantize to inf/NaN; the clip is
a backstop for the rounding of that floor. QServe's decode kernel dequantizes in fp16 (one half2 FMA);
we keep the dequantized value in fp32.

Error bound: |x_hat - x16| <= scale/2 + (fp16 rounding of zero) * scale, where the second term is at most
about 2^-11 * |mn| (tiny for heads that straddle 0, where |zero| <= 2^bits - 1 is rounded finely).
"""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import array_module

FP16_MAX = 65504.0


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"KV cache quantization supports 4 or 8 bits, not {bits}")
    return 2**bits - 1


def kv_quantize(x, bits: int, xp=np):
    """x [..., head_dim] -> (codes uint8 [..., head_dim], scales fp16 [...], zeros fp16 [...])."""
    qmax = _qmax(bits)
    x32 = xp.asarray(x).astype(xp.float16).astype(xp.float32)
    mn = x32.min(axis=-1)
    mx = x32.max(axis=-1)
    scales = ((mx - mn) / xp.float32(qmax)).astype(xp.float16)
    floor = (xp.abs(mn) * xp.float32(2.0**-15)).astype(xp.float16)
    scales = xp.where(scales == 0, xp.float16(1), xp.maximum(scales, floor))
    s32 = scales.astype(xp.float32)
    zeros = xp.clip(-mn / s32, -FP16_MAX, FP16_MAX).astype(xp.float16)
    codes = xp.rint(x32 / s32[..., None] + zeros.astype(xp.float32)[..., None])
    codes = xp.clip(codes, 0, qmax).astype(xp.uint8)
    return codes, scales, zeros


def kv_dequantize(codes, scales, zeros, xp=np):
    """(fp32(code) - zero) * scale -> float32 [..., head_dim]."""
    z = zeros.astype(xp.float32)[..., None]
    s = scales.astype(xp.float32)[..., None]
    return (codes.astype(xp.float32) - z) * s


def kv_fake_quant(x, bits: int, xp=None):
    """Quantize then dequantize K or V [B, KVH, T, D] (the KV cache hook); returns x's dtype."""
    if xp is None:
        xp = array_module(x)
    codes, scales, zeros = kv_quantize(x, bits, xp)
    return kv_dequantize(codes, scales, zeros, xp).astype(x.dtype, copy=False)


class KVFakeQuantizer:
    """Picklable, printable `kv_quantizer` for LlamaModel: x -> kv_fake_quant(x, bits)."""

    def __init__(self, bits: int):
        _qmax(bits)
        self.bits = bits

    def __call__(self, x):
        return kv_fake_quant(x, self.bits, array_module(x))

    def __repr__(self) -> str:
        return f"KVFakeQuantizer(bits={self.bits})"


