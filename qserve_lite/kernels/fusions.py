"""The switch between the fused decode-step kernels (issue 16) and the unfused path they replace.

QSERVE_LITE_STEP_FUSIONS=0 selects the unfused path, for before/after measurements in one process
(benchmarks/step_profile.py --fusions on,off): cupy's argmax instead of kernels/cuda/argmax.cu, the
embedding gather as its own pass before the first RMSNorm, the RoPE / KV writer with one 4-warp block per
token, the RMSNorm row kernel without the early load of its weight, and the o_proj input quantized by its own
row kernel after the decode attention instead of inside it (`decode_attention(quant_out=)`, read by
model/gpu_model.py). Both paths compute the same bits. The
variable is read at each call, so a CUDA graph holds the path that was selected when it was captured.

The last fusion (o_proj's input written by the decode attention) also needs QSERVE_LITE_ATTN_QUANT=1 until
it has run on a GPU: it is written and tested bit-exact against its spec, but was never executed (2026-12-02).
"""

from __future__ import annotations

import os

FUSIONS_ENV = "QSERVE_LITE_STEP_FUSIONS"
ATTN_QUANT_ENV = "QSERVE_LITE_ATTN_QUANT"


def step_fusions() -> bool:
    """True unless $QSERVE_LITE_STEP_FUSIONS is "0"."""
    return os.environ.get(FUSIONS_ENV, "1") != "0"


def attention_quant_fusion() -> bool:
    """The decode attention writes o_proj's int8 input: step fusions on and $QSERVE_LITE_ATTN_QUANT is "1"."""
    return step_fusions() and os.environ.get(ATTN_QUANT_ENV, "0") == "1"
