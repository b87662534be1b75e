"""The vision side of a VILA1.5 model on either backend: a SigLIP tower and the mlp_downsample projector, from
pixels to the LLM's input embeddings of each image (core/vision_config.py has the shapes and the order).

    encoder = VisionEncoder(weights, xp)   # weights: VisionWeights (from_tensors, or random_vision.py)
    embeds = encoder.encode(pixels)        # float [B, 3, S, S] -> fp16 [B, tokens_per_image, llm_hidden]

The forward, per chunk of images, fp16 activations:
    patches (c, kh, kw order, K zero-padded to a multiple of 8) -> patch GEMM + bias + position embeddings
    layers_run x [h += out(attn(LN1(h))); h += fc2(gelu_tanh(fc1(LN2(h))))]     (pre-LN, no mask)
    2x2 merge (odd grids zero-padded) -> LN(eps 1e-5) -> fc1 -> exact GELU -> fc2
Every GEMM is an fp16 GEMM of kernels/fp16_gemm.py (mode 'f16': fp32 accumulation, cuBLAS on the device
for batches of >= 256 tokens, else our kernel; its float64 twin on the host) or, with mode 'w8', a
per-token INT8 quantization and the W8A8 GEMM of kernels/linear.py over per-channel INT8 weights (quantized
here from the float weights). LayerNorm, GELU and attention are kernels/vision.py. numpy arrays run the
twins; CuPy arrays the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qserve_lite.core.vision_config import VLMConfig
from qserve_lite.errors import QServeLiteError
from qserve_lite.kernels.act_quant import quantize_per_token
from qserve_lite.kernels.fp16_gemm import fp16_gemm
from qserve_lite.kernels.linear import linear
from qserve_lite.kernels.vision import bidirectional_attention, gelu, layer_norm

VISION_MODES = ("f16", "w8")
DEFAULT_MAX_IMAGES = 32  # images per forward chunk (activations ~ 7 MB per SigLIP-384 image and layer)


@dataclass
class VisionLinear:
    """One linear of the vision side, as its GEMM takes it: fp16 [n, k] ('f16') or int8 [n, k] with fp16
    per-output-channel scales ('w8'); fp16 bias [n] or None."""

    mode: str
    weight: object
    bias: object = None
    scales: object = None

    @property
    def n(self) -> int:
        return int(self.weight.shape[0])

    @property
    def k(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, x, xp):
        """fp16 [M, k] -> fp16 [M, n]."""
        if self.mode == "f16":
            return fp16_gemm(x, self.weight, self.bias, xp=xp, cublas=True)  # never inside a CUDA graph
        qa = quantize_per_token(x, xp, with_sums=False)
        return linear("w8", qa, self.weight, self.n, self.k, scales=self.scales, bias=self.bias)

    @classmethod
    def from_float(cls, weight, bias, mode: str, xp, k_pad: int | None = None) -> VisionLinear:
        """From float weights [n, k] (numpy or xp) and bias [n] (or None); K zero-padded to k_pad."""
        if mode not in VISION_MODES:
            raise QServeLiteError(f"vision linear mode must be one of {', '.join(VISION_MODES)}, got "
                                  f"{mode!r}")
        w = xp.asarray(weight, dtype=xp.float32)
        if k_pad is not None and k_pad > w.shape[1]:
            w = xp.concatenate([w, xp.zeros((w.shape[0], k_pad - w.shape[1]), xp.float32)], axis=1)
        b = None if bias is None else xp.asarray(bias, dtype=xp.float16)
        if mode == "f16":
            return cls("f16", xp.ascontiguousarray(w.astype(xp.float16)), b)
        scales = (xp.abs(w).max(axis=1) / 127.0).astype(xp.float16)
        scales = xp.where(scales == 0, xp.float16(1), scales)
        codes = xp.clip(xp.rint(w / scales.astype(xp.float32)[:, None]), -127, 127).astype(xp.int8)
        return cls("w8", xp.ascontiguousarray(codes), b, scales)

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.weight, self.bias, self.scales) if a is not None))


@dataclass
class VisionLayer:
    ln1: tuple  # (weight, bias) fp16 [hidden]
    qkv: VisionLinear  # [q | k | v] fused
    out: VisionLinear
    ln2: tuple
    fc1: VisionLinear
    fc2: VisionLinear


@dataclass
class Projector:
    ln: tuple  # (weight, bias) fp16 [4 * vision hidden]
    fc1: VisionLinear
    fc2: VisionLinear


@dataclass
class VisionWeights:
    """The tower's layers the selected feature needs, the patch and position embeddings, the projector."""

    config: VLMConfig
    mode: str
    patch: VisionLinear  # [hidden, patch_features padded to a multiple of 8]
    position: object  # fp16 [num_patches, hidden]
    layers: list[VisionLayer]
    projector: Projector

    def nbytes(self) -> int:
        arrays = [self.position]
        for layer in self.layers:
            arrays += [*layer.ln1, *layer.ln2]
        arrays += list(self.projector.ln)
        linears = [self.patch, self.projector.fc1, self.projector.fc2]
        linears += [lin for ly in self.layers for lin in (ly.qkv, ly.out, ly.fc1, ly.fc2)]
        return int(sum(a.nbytes for a in arrays) + sum(lin.nbytes() for lin in linears))

    @classmethod
    def from_tensors(cls, config: VLMConfig, get: Callable, xp=np, mode: str = "f16") -> VisionWeights:
        """From Hugging Face SigLIP names (`vision_model.*`) and VILA's projector names (`layers.{1,2,4}.*`):
        get(name, shape) returns that float tensor (numpy)."""
        v = config.vision
        h, inter = v.hidden_size, v.intermediate_size
        f16 = xp.float16

        def vec(name, n):
            return xp.asarray(get(name, (n,)), dtype=f16)

        def lin(prefix, n, k, k_pad=None, shape=None):
            w = get(f"{prefix}.weight", shape or (n, k)).reshape(n, -1)
            return VisionLinear.from_float(w, get(f"{prefix}.bias", (n,)), mode, xp, k_pad)

        e = "vision_model.embeddings"
        patch = lin(f"{e}.patch_embedding", h, v.patch_features, k_pad=patch_k(config),
                    shape=(h, v.num_channels, v.patch_size, v.patch_size))
        position = xp.asarray(get(f"{e}.position_embedding.weight", (v.num_patches, h)), dtype=f16)
        layers = []
        for i in range(config.layers_run):
            p = f"vision_model.encoder.layers.{i}"
            qkv = [get(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkv"]
            qkv_b = [get(f"{p}.self_attn.{x}_proj.bias", (h,)) for x in "qkv"]
            layers.append(VisionLayer(
                ln1=(vec(f"{p}.layer_norm1.weight", h), vec(f"{p}.layer_norm1.bias", h)),
                qkv=VisionLinear.from_float(np.concatenate(qkv), np.concatenate(qkv_b), mode, xp),
                out=lin(f"{p}.self_attn.out_proj", h, h),
                ln2=(vec(f"{p}.layer_norm2.weight", h), vec(f"{p}.layer_norm2.bias", h)),
                fc1=lin(f"{p}.mlp.fc1", inter, h),
                fc2=lin(f"{p}.mlp.fc2", h, inter),
            ))
        m, H = config.mm_hidden, config.llm_hidden
        projector = Projector(
            ln=(vec("layers.1.weight", m), vec("layers.1.bias", m)),
            fc1=lin("layers.2", H, m),
            fc2=lin("layers.4", H, H),
        )
        return cls(config, mode, patch, position, layers, projector)


def patch_k(config: VLMConfig) -> int:
    """The patch GEMM's K: the patch features rounded up to a multiple of 8 (16-byte fp16 rows)."""
    return -(-config.vision.patch_features // 8) * 8


def patchify(pixels, patch: int, grid: int, k_pad: int, xp):
    """float [B, C, S, S] -> fp16 [B * grid * grid, k_pad]: row-major patches (p = row * grid + col), each
    flattened in (c, kh, kw) order (the conv weight's), zero-padded to k_pad features. Pixels past
    grid * patch are never seen (a 'valid' convolution)."""
    B, C = pixels.shape[:2]
    x = xp.asarray(pixels)[:, :, : grid * patch, : grid * patch].astype(xp.float16)
    x = x.reshape(B, C, grid, patch, grid, patch).transpose(0, 2, 4, 1, 3, 5).reshape(B * grid * grid, -1)
    if k_pad > x.shape[1]:
        x = xp.concatenate([x, xp.zeros((x.shape[0], k_pad - x.shape[1]), xp.float16)], axis=1)
    return xp.ascontiguousarray(x)


def merge_2x2(x, order: str, xp):
    """[B, g, g, C] -> [B, m * m, 4C], m = ceil(g / 2): the grid zero-padded to 2m x 2m, each 2x2 block's
    patches concatenated as [x(2i,2j) | x(2i,2j+1) | x(2i+1,2j) | x(2i+1,2j+1)]; block (i, j) is token
    j * m + i ('column', VILA1.5) or i * m + j ('row')."""
    B, g, _, C = x.shape
    m = -(-g // 2)
    if 2 * m != g:
        padded = xp.zeros((B, 2 * m, 2 * m, C), dtype=x.dtype)
        padded[:, :g, :g] = x
        x = padded
    blocks = x.reshape(B, m, 2, m, 2, C).transpose(0, 1, 3, 2, 4, 5)  # [B, i, j, a, b, C]
    if order == "column":
        blocks = blocks.transpose(0, 2, 1, 3, 4, 5)  # [B, j, i, a, b, C]
    elif order != "row":
        raise QServeLiteError(f"token order must be 'column' or 'row', got {order!r}")
    return xp.ascontiguousarray(blocks).reshape(B, m * m, 4 * C)


class VisionEncoder:
    """Pixels -> the LLM input embeddings of each image, on the weights' array module."""

    def __init__(self, weights: VisionWeights, xp=np, max_images: int = DEFAULT_MAX_IMAGES):
        self.weights = weights
        self.config = weights.config
        self.xp = xp
        self.max_images = max(1, int(max_images))

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    def encode(self, pixels):
        """float [B, C, S, S] (numpy or xp; S = image_size) -> fp16 xp [B, tokens_per_image, llm_hidden]."""
        v = self.config.vision
        shape = (v.num_channels, v.image_size, v.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != shape:
            raise QServeLiteError(f"pixels: expected [batch, {', '.join(map(str, shape))}], got "
                                  f"{list(pixels.shape)}")
        xp = self.xp
        out = xp.empty((pixels.shape[0], self.tokens_per_image, self.config.llm_hidden), dtype=xp.float16)
        for b0 in range(0, pixels.shape[0], self.max_images):
            chunk = pixels[b0 : b0 + self.max_images]
            out[b0 : b0 + len(chunk)] = self.project(self.tower(chunk))
        return out

    def tower(self, pixels):
        """The selected hidden state: fp16 [B, num_patches, hidden] after layers_run encoder layers."""
        xp, w, v = self.xp, self.weights, self.config.vision
        B, N, h = pixels.shape[0], v.num_patches, v.hidden_size
        x = w.patch(patchify(pixels, v.patch_size, v.grid, w.patch.k, xp), xp).reshape(B, N, h)
        x += w.position[None]
        x = x.reshape(B * N, h)
        approx = "tanh" if v.hidden_act == "gelu_pytorch_tanh" else "none"
        for layer in w.layers:
            y = layer_norm(x, *layer.ln1, v.layer_norm_eps, xp)
            qkv = layer.qkv(y, xp).reshape(B, N, 3 * h)
            attn = bidirectional_attention(qkv, v.num_heads, xp).reshape(B * N, h)
            x += layer.out(attn, xp)
            y = layer_norm(x, *layer.ln2, v.layer_norm_eps, xp)
            x += layer.fc2(gelu(layer.fc1(y, xp), approx, xp), xp)
        return x.reshape(B, N, h)

    def project(self, features):
        """fp16 [B, num_patches, hidden] -> fp16 [B, tokens_per_image, llm_hidden]."""
        xp, p, cfg = self.xp, self.weights.projector, self.config
        B, g = features.shape[0], cfg.vision.grid
        merged = merge_2x2(features.reshape(B, g, g, -1), cfg.token_order, xp).reshape(-1, cfg.mm_hidden)
        y = layer_norm(merged, *p.ln, cfg.projector_eps, xp)
        y = p.fc2(gelu(p.fc1(y, xp), "none", xp), xp)
        return y.reshape(B, cfg.tokens_per_image, cfg.llm_hidden)
