"""Random vision-side weights (SigLIP tower + mlp_downsample projector) of a VLMConfig, drawn on the device,
for benchmarks of real VILA1.5 shapes and for tiny CPU tests (xp=numpy).

Linear weights are N(0, 1 / k) (unit-RMS inputs give unit-RMS outputs), biases N(0, 0.02), LayerNorm weights
1 and biases 0, position embeddings N(0, 0.02): activations stay O(1) and finite in fp16 through every layer
(the pre-LN residual stream grows like sqrt(2 x layers)).
"""

from __future__ import annotations

import math

from qserve_lite.core.vision_config import VLMConfig
from qserve_lite.model.random_weights import DeviceRandom
from qserve_lite.model.vision import (
    Projector,
    VisionLayer,
    VisionLinear,
    VisionWeights,
    patch_k,
)


def _linear(rnd: DeviceRandom, n: int, k: int, mode: str, k_pad: int | None = None) -> VisionLinear:
    w = rnd.normal((n, k), 1.0 / math.sqrt(k))
    return VisionLinear.from_float(w, rnd.normal((n,), 0.02), mode, rnd.xp, k_pad)


def _norm(xp, n: int) -> tuple:
    return xp.ones(n, xp.float16), xp.zeros(n, xp.float16)


def vision_weight_bytes(config: VLMConfig, mode: str = "f16") -> int:
    """Device bytes of the weights build_random_vision / VisionWeights.from_tensors hold (checked before a
    benchmark draws them)."""
    v = config.vision
    h, i = v.hidden_size, v.intermediate_size
    per_weight = 2 if mode == "f16" else 1
    extra = 0 if mode == "f16" else 2  # W8's per-channel scales

    def lin(n, k):
        return n * k * per_weight + 2 * n + extra * n

    layer = 4 * 2 * h + lin(3 * h, h) + lin(h, h) + lin(i, h) + lin(h, i)
    m, H = config.mm_hidden, config.llm_hidden
    return (lin(h, patch_k(config)) + 2 * v.num_patches * h + config.layers_run * layer + 4 * m + lin(H, m)
            + lin(H, H))


def build_random_vision(config: VLMConfig, mode: str = "f16", *, xp=None, seed: int = 0) -> VisionWeights:
    """Random VisionWeights of `config` at `mode` ('f16' or 'w8') on xp (default cupy)."""
    if xp is None:
        import cupy as xp
    rnd = DeviceRandom(xp, seed)
    v = config.vision
    h, inter = v.hidden_size, v.intermediate_size
    patch = _linear(rnd, h, v.patch_features, mode, patch_k(config))
    position = rnd.normal((v.num_patches, h), 0.02).astype(xp.float16)
    layers = [
        VisionLayer(ln1=_norm(xp, h), qkv=_linear(rnd, 3 * h, h, mode), out=_linear(rnd, h, h, mode),
                    ln2=_norm(xp, h), fc1=_linear(rnd, inter, h, mode), fc2=_linear(rnd, h, inter, mode))
        for _ in range(config.layers_run)
    ]
    m, H = config.mm_hidden, config.llm_hidden
    projector = Projector(ln=_norm(xp, m), fc1=_linear(rnd, H, m, mode), fc2=_linear(rnd, H, H, mode))
    return VisionWeights(config, mode, patch, position, layers, projector)
