"""DeviceWeights: a model's weights on the device, in the layouts the GPU runner's kernels take.

Two producers: `DeviceWeights.from_loaded` uploads a loaded model (model/loader.load_model: our
QServe-format checkpoints, QServe zoo ones, or float models at w16a16*) once, with q/k/v and gate/up
concatenated along the output channels (`fuse_linears`); model/random_weights.py draws random weights
directly on the device in the same layouts. GPUModelRunner runs either.

Per linear (`DeviceLinear`, one mode per model): packed W4 qweights (core/pack.py) with fp16 s1_scales and
either the g128 s2_scales / s2_zeros (int8 [k_pad / 128, n], group-major, 32-block permuted) or the
per-channel s1_szeros; int8 W8A8 weights with fp16 dequant scales; fp16 weights for float models.
Embeddings, lm_head, norms and biases are fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.model.linear import Linear
from qserve_lite.io.loader import LoadedModel
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.core.formats import W4Group
from qserve_lite.core.pack import pack_w4, to_qserve_group_params
from qserve_lite.engine.model_runner import kv_bits_of

SUPPORTED_HEAD_DIMS = (64, 128)


@dataclass
class DeviceLinear:
    """One (possibly fused) linear on the device, in its GEMM kernel's layout (kernels/cuda/_gpu.gemm modes)."""

    mode: str  # "w4_g128" | "w4_per_channel" | "w8" | "f16"
    weight: object  # packed int8 [n, k_pad / 2] | int8 [n, k] | fp16 [n, k]
    n: int
    k_w: int  # the weight's K (K_pad for packed W4)
    scales: object = None  # fp16 [n]: s1_scales (W4) or dequant_scale (W8)
    szeros: object = None  # fp16 [n]: s1_szeros (W4 per-channel)
    s2_scales: object = None  # int8 [k_pad / 128, n] (W4 g128)
    s2_zeros: object = None
    bias: object = None  # fp16 [n]

    def __call__(self, act, out):
        """act: QuantizedActivation (int8 modes) or fp16 [M, K] (f16); out: fp16 [M, n], contiguous rows."""
        if isinstance(self.weight, np.ndarray):  # numpy: the kernels' twins (kernels/*), for checks on the CPU
            return self._twin(act, out)
        from qserve_lite.kernels.cuda import _gpu

        if self.mode == "f16":
            return _gpu.gemm("f16", act, self.weight, self.n, self.k_w, bias=self.bias, out=out)
        return _gpu.gemm(
            self.mode,
            act.q,
            self.weight,
            self.n,
            self.k_w,
            x_scales=act.scales,
            x_sums=act.sums,
            w_scales=self.scales,
            w_szeros=self.szeros,
            s2_scales=self.s2_scales,
            s2_zeros=self.s2_zeros,
            bias=self.bias,
            out=out,
        )

    def _twin(self, act, out):
        from qserve_lite.kernels.fp16_gemm import fp16_gemm
        from qserve_lite.kernels.w4a8_gemm import w4a8_group_gemm_packed, w4a8_per_channel_gemm_packed
        from qserve_lite.kernels.w8a8_gemm import w8a8_gemm

        if self.mode == "f16":
            out[...] = fp16_gemm(act, self.weight, self.bias, xp=np)
        elif self.mode == "w8":
            out[...] = w8a8_gemm(act.q, act.scales, self.weight, self.scales, self.bias, np)
        elif self.mode == "w4_g128":
            out[...] = w4a8_group_gemm_packed(
                act.q, act.scales, self.weight, self.scales, self.s2_scales, self.s2_zeros, self.bias, xp=np
            )
        else:
            out[...] = w4a8_per_channel_gemm_packed(
                act.q, act.scales, act.sums, self.weight, self.scales, self.szeros, self.bias, xp=np
            )
        return out


def _concat(arrays, axis: int = 0) -> np.ndarray:
    return np.concatenate([np.asarray(a) for a in arrays], axis=axis)


def fuse_linears(linears: list, cp, name: str) -> DeviceLinear:
    """Concatenate linears sharing their input (q/k/v, gate/up) along the output channels; upload."""
    kinds = {type(lin) for lin in linears} | {type(getattr(lin, "qweight", None)) for lin in linears}
    if len(kinds) != 2:
        raise QServeLiteError(
            f"{name}: the fused linears mix weight formats ({sorted(k.__name__ for k in kinds)})"
        )
    f16 = cp.float16
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = cp.asarray(
            _concat(
                [
                    b if b is not None else np.zeros(lin.out_features, np.float32)
                    for b, lin in zip(biases, linears, strict=True)
                ]
            ),
            dtype=f16,
        )
    first = linears[0]
    if isinstance(first, W4A8Linear):
        qws = [lin.qweight for lin in linears]
        codes = _concat([q.codes for q in qws])
        n, k_pad = codes.shape
        if n % 32 or k_pad % 32:
            raise QServeLiteError(
                f"{name}: the GPU W4 GEMM needs output and input channels that are multiples "
                f"of 32, got {n} x {k_pad}"
            )
        qweight = cp.asarray(pack_w4(codes))
        scales = cp.asarray(_concat([q.s1 if isinstance(q, W4Group) else q.scales for q in qws]), dtype=f16)
        if isinstance(qws[0], W4Group):
            if any(q.group_size != 128 for q in qws):
                raise QServeLiteError(
                    f"{name}: the GPU W4A8 GEMM supports group size 128 or per-channel, got "
                    f"{qws[0].group_size}"
                )
            s2, zeros = to_qserve_group_params(_concat([q.s2 for q in qws]), _concat([q.zeros for q in qws]))
            return DeviceLinear(
                "w4_g128",
                qweight,
                n,
                k_pad,
                scales=scales,
                s2_scales=cp.asarray(s2),
                s2_zeros=cp.asarray(zeros),
                bias=bias,
            )
        szeros = cp.asarray(_concat([q.szeros for q in qws]), dtype=f16)
        return DeviceLinear("w4_per_channel", qweight, n, k_pad, scales=scales, szeros=szeros, bias=bias)
    if isinstance(first, W8A8Linear):
        codes = _concat([lin.qweight.codes for lin in linears]).astype(np.int8)
        scales = cp.asarray(_concat([lin.qweight.scales for lin in linears]), dtype=f16)
        return DeviceLinear("w8", cp.asarray(codes), codes.shape[0], codes.shape[1], scales=scales, bias=bias)
    if isinstance(first, Linear):
        w = _concat([lin.weight for lin in linears]).astype(np.float16)
        return DeviceLinear("f16", cp.asarray(w), w.shape[0], w.shape[1], bias=bias)
    raise QServeLiteError(f"{name}: unsupported linear type {type(first).__name__}")


@dataclass
class DeviceLayer:
    input_norm: object
    post_attn_norm: object
    qkv: DeviceLinear
    o_proj: DeviceLinear
    gate_up: DeviceLinear
    down: DeviceLinear


@dataclass
class DeviceWeights:
    """Everything GPUModelRunner needs of a model: its config, KV-cache bits and device weights."""

    config: ModelConfig
    kv_bits: int  # 4, 8 or 16 (fp16 KV cache)
    layers: list[DeviceLayer]
    embed: object  # fp16 [vocab, hidden]
    lm_head: object  # fp16 [vocab, hidden] (the embed array itself when tied)
    lm_head_bias: object | None
    final_norm: object  # fp16 [hidden]
    k_hadamard: bool = False  # q and k rotated per head by H_D after RoPE (the model's k_hadamard)

    @property
    def mode(self) -> str:
        """The GEMM mode of every linear (the runner needs a single one)."""
        modes = {
            m
            for layer in self.layers
            for m in (layer.qkv.mode, layer.o_proj.mode, layer.gate_up.mode, layer.down.mode)
        }
        if len(modes) != 1:
            raise QServeLiteError(f"the model mixes linear formats {sorted(modes)}; the GPU runner needs one")
        return next(iter(modes))

    def nbytes(self) -> int:
        """Device bytes held by the weights (a tied lm_head counted once)."""
        arrays = [self.embed, self.final_norm, self.lm_head_bias]
        if self.lm_head is not self.embed:
            arrays.append(self.lm_head)
        for layer in self.layers:
            arrays += [layer.input_norm, layer.post_attn_norm]
            for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                arrays += [lin.weight, lin.scales, lin.szeros, lin.s2_scales, lin.s2_zeros, lin.bias]
        return int(sum(a.nbytes for a in arrays if a is not None))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, xp) -> DeviceWeights:
        """Upload a loaded model's weights (numpy, on the host) to xp (cupy; numpy for the twin)."""
        cfg, model = loaded.config, loaded.model
        check_head_dim(cfg)
        w = model.weights
        f16 = xp.float16
        layers = []
        for i, lw in enumerate(w.layers):
            p = f"model.layers.{i}"
            layers.append(
                DeviceLayer(
                    input_norm=xp.asarray(lw.input_norm, dtype=f16),
                    post_attn_norm=xp.asarray(lw.post_attn_norm, dtype=f16),
                    qkv=fuse_linears([lw.q_proj, lw.k_proj, lw.v_proj], xp, f"{p}.self_attn.qkv_proj"),
                    o_proj=fuse_linears([lw.o_proj], xp, f"{p}.self_attn.o_proj"),
                    gate_up=fuse_linears([lw.gate_proj, lw.up_proj], xp, f"{p}.mlp.gate_up_proj"),
                    down=fuse_linears([lw.down_proj], xp, f"{p}.mlp.down_proj"),
                )
            )
        embed = xp.asarray(w.embed_tokens, dtype=f16)
        head = w.lm_head.weight
        return cls(
            config=cfg,
            kv_bits=kv_bits_of(model),
            layers=layers,
            embed=embed,
            lm_head=embed if head is w.embed_tokens else xp.asarray(head, dtype=f16),
            lm_head_bias=None if w.lm_head.bias is None else xp.asarray(w.lm_head.bias, dtype=f16),
            final_norm=xp.asarray(w.final_norm, dtype=f16),
            k_hadamard=bool(getattr(model, "k_hadamard", False)),
        )


def check_head_dim(cfg: ModelConfig) -> None:
    if cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        raise DeviceError(
            f"the GPU attention kernels support head_dim 64 and 128, this model has {cfg.head_dim}"
        )
