"""The GPU model: a Llama-family model's weights on the device and its fused forward over the kernels.

Weights (`DeviceWeights`), in the layouts the kernels take, with the precision they run at as a value. Two
producers: `DeviceWeights.from_host` uploads host weights (io/loader.load_model: our QServe-format
checkpoints, QServe zoo ones, or float models at w16a16*) once, with q/k/v and gate/up concatenated along the
output channels (`fuse_linears`); model/random_weights.py draws random weights directly on the device in the
same layouts. Per linear (`DeviceLinear`, one mode per model): packed W4 qweights (core/pack.py) with fp16
s1_scales and either the g128 s2_scales / s2_zeros (int8 [k_pad / 128, n], group-major, 32-block permuted)
or the per-channel s1_szeros; int8 W8A8 weights with fp16 dequant scales; fp16 weights for float models.
Embeddings, lm_head, norms and biases are fp16.

The forward (`GPULlama`), one decoder layer on a packed batch of T tokens (kernels/*):
    rms_norm_quant(x + residual)  -> qkv GEMM (fp16 out) -> rope_write_kv (RoPE in place, then the per-head
    Hadamard on q and k when the model has k_hadamard; K/V into the pages)
    -> prefill_attention (varlen, cu_seqlens) | decode_attention (block tables) -> quantize_per_token
    (in decode fused into the attention kernel, `quant_out`, when kernels/fusions.py switches it on)
    -> o_proj GEMM -> rms_norm_quant(o + residual) -> gate_up GEMM -> silu_mul_quant -> down GEMM
(with tensor parallelism, the weights are one rank's shard and o_proj's and down's outputs are all-reduced
over the ranks: model/tp_split.py, engine/tensor_parallel.py). The first layer's norm reads the token
embeddings itself (rms_norm_quant's `gather`; kernels/fusions.py switches that off) unless a VLM's image
rows replace some of them.
Then the final RMSNorm and the fp16 lm_head GEMM run on each sequence's last token only. Float models
(w16a16, w16a16kv4/kv8) take the same path with fp16 GEMMs and no activation quantization. GEMM and
attention outputs go to buffers preallocated for `max_tokens` tokens; the row kernels (norm, quantization)
allocate from cupy's pool. With numpy arrays everything runs on the kernels' numpy twins (a CPU check of the
forward itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qserve_lite.core.formats import W4Group
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.pack import pack_w4, to_qserve_group_params
from qserve_lite.core.precision import Precision
from qserve_lite.core.rope import rope_inv_freq
from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.kernels.act_quant import QuantizedActivation, quantize_per_token, silu_mul, silu_mul_quant
from qserve_lite.kernels.attention import decode_attention, prefill_attention, rope_write_kv
from qserve_lite.kernels.fp16_gemm import fp16_gemm
from qserve_lite.kernels.fusions import attention_quant_fusion
from qserve_lite.kernels.linear import linear
from qserve_lite.kernels.norm_quant import rms_norm, rms_norm_quant
from qserve_lite.kernels.paged_kv import PagedKVPool
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.model.weights import LlamaWeights

SUPPORTED_HEAD_DIMS = (64, 128)


@dataclass
class DeviceLinear:
    """One (possibly fused) linear on the device, in its GEMM kernel's layout (kernels/linear.py modes)."""

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
        """act: QuantizedActivation (int8 modes) or fp16 [M, K] (f16); out: fp16 [M, n], contiguous rows.
        numpy weights run the kernels' twins (checks on the CPU), cupy ones the GEMM kernels."""
        return linear(self.mode, act, self.weight, self.n, self.k_w, scales=self.scales, szeros=self.szeros,
                      s2_scales=self.s2_scales, s2_zeros=self.s2_zeros, bias=self.bias, out=out)


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
    """Everything the GPU model needs: its config, its precision and its weights on the device."""

    config: ModelConfig
    precision: Precision
    layers: list[DeviceLayer]
    embed: object  # fp16 [vocab, hidden]
    lm_head: object  # fp16 [vocab, hidden] (the embed array itself when tied)
    lm_head_bias: object | None
    final_norm: object  # fp16 [hidden]
    k_hadamard: bool = False  # q and k rotated per head by H_D after RoPE (the model's k_hadamard)

    @property
    def kv_bits(self) -> int:
        """4, 8 or 16 (an fp16 KV cache)."""
        return self.precision.kv_bits

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
    def from_host(cls, config: ModelConfig, weights: LlamaWeights, precision: Precision, xp,
                  k_hadamard: bool = False) -> DeviceWeights:
        """Upload host weights (numpy: float or quantized linears) to xp (cupy; numpy for the twin)."""
        check_head_dim(config)
        f16 = xp.float16
        layers = []
        for i, lw in enumerate(weights.layers):
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
        embed = xp.asarray(weights.embed_tokens, dtype=f16)
        head, head_bias = weights.lm_head.weight, weights.lm_head.bias
        return cls(
            config=config,
            precision=precision,
            layers=layers,
            embed=embed,
            lm_head=embed if head is weights.embed_tokens else xp.asarray(head, dtype=f16),
            lm_head_bias=None if head_bias is None else xp.asarray(head_bias, dtype=f16),
            final_norm=xp.asarray(weights.final_norm, dtype=f16),
            k_hadamard=k_hadamard,
        )


def check_head_dim(cfg: ModelConfig) -> None:
    if cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        raise DeviceError(
            f"the GPU attention kernels support head_dim 64 and 128, this model has {cfg.head_dim}"
        )


def activation_buffer_bytes(cfg: ModelConfig, max_tokens: int) -> int:
    """GPULlama's preallocated fp16 GEMM / attention output buffers for max_tokens tokens."""
    qkv_n = cfg.q_size + 2 * cfg.kv_size
    return 2 * max_tokens * (qkv_n + cfg.q_size + 2 * cfg.hidden_size + 2 * cfg.intermediate_size)


@dataclass
class StepInputs:
    """One step's packed batch on the device (int32 arrays of xp): `num_tokens` new tokens of `num_seqs`
    sequences back to back. Prefill: cu_seqlens [num_seqs + 1] delimits each sequence's tokens; decode: one
    token per sequence and cu_seqlens None. context_lens: tokens each sequence attends to (cached + new);
    block_tables [num_seqs, max_pages]: its KV pages; slot_mapping: the page slot each new token's K/V goes to
    (-1: not written). max_seqlen_q and max_context are host-side bounds that size the attention grids.
    embed_rows / embed_values (prefill only, else None): these packed rows (int32 [n]) enter the model as the
    given fp16 embeddings [n, hidden] instead of their tokens' (a VLM's image tokens)."""

    token_ids: object
    positions: object
    slot_mapping: object
    context_lens: object
    block_tables: object
    cu_seqlens: object | None
    num_tokens: int
    is_prefill: bool
    max_seqlen_q: int
    max_context: int
    embed_rows: object | None = None
    embed_values: object | None = None


class GPULlama:
    """The fused forward of DeviceWeights over a PagedKVPool, with its activation buffers."""

    def __init__(self, weights: DeviceWeights, kv_pool: PagedKVPool, max_tokens: int, xp, comm=None,
                 with_logits: bool = True):
        """comm (core/comm.py; tensor parallelism): sums o_proj's and down_proj's outputs over the ranks,
        in place, on the current stream (so a captured decode graph holds the collectives); weights are
        then this rank's shard (model/tp_split.py). with_logits False (a rank other than 0): no lm_head,
        __call__ returns None."""
        cfg = self.cfg = weights.config
        self.comm = comm
        self.with_logits = with_logits
        check_head_dim(cfg)
        self.xp = xp
        self.weights = weights
        self.kv_pool = kv_pool
        self.H, self.KVH, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = float(cfg.rms_norm_eps)
        self.mode = weights.mode
        self.float_acts = self.mode == "f16"
        self.need_sums = self.mode == "w4_per_channel"
        self.inv_freq = xp.asarray(rope_inv_freq(cfg), dtype=xp.float64)
        self.max_tokens = max_tokens
        f16, T, h = xp.float16, max_tokens, cfg.hidden_size
        layer0 = weights.layers[0]
        self.qkv_buf = xp.empty((T, layer0.qkv.n), dtype=f16)
        self.attn_buf = xp.empty((T, self.H, self.D), dtype=f16)
        self.o_buf = xp.empty((T, h), dtype=f16)
        self.gate_up_buf = xp.empty((T, layer0.gate_up.n), dtype=f16)
        self.down_buf = xp.empty((T, h), dtype=f16)

    def __call__(self, inputs: StepInputs, last=None):
        """Next-token logits fp32 [rows, vocab] of the tokens `last` selects (default: every token)."""
        x, residual = self.forward(inputs)
        if not self.with_logits:
            return None
        if last is not None:
            x, residual = x[last], residual[last]
        return self.logits(x, residual)

    def _norm(self, x, residual, gamma, gather=None):
        """(the next linear's input, the new residual stream); with gather, of the rows x[gather]."""
        if self.float_acts:
            return rms_norm(x, gamma, self.eps, residual=residual, xp=self.xp, gather=gather)
        return rms_norm_quant(x, gamma, self.eps, residual=residual, xp=self.xp, with_sums=self.need_sums,
                              gather=gather)

    def _embed(self, inputs: StepInputs):
        """The input embeddings [T, hidden] (a VLM's image rows replaced)."""
        x = self.weights.embed[inputs.token_ids]
        if inputs.embed_rows is not None:
            x[inputs.embed_rows] = inputs.embed_values
        return x

    def _first_norm(self, inputs: StepInputs, gamma):
        """The first layer's input norm over the embeddings: the gather is fused into the norm's row kernel
        (norm_quant's `gather`) unless image rows replace some embeddings."""
        if inputs.embed_rows is not None:
            return self._norm(self._embed(inputs), None, gamma)
        return self._norm(self.weights.embed, None, gamma, gather=inputs.token_ids)

    def _quantize(self, x):
        return x if self.float_acts else quantize_per_token(x, self.xp, self.need_sums)

    def _silu_mul(self, gate_up):
        if self.float_acts:
            return silu_mul(gate_up, self.xp)
        return silu_mul_quant(gate_up, self.xp, self.need_sums)

    def forward(self, inputs: StepInputs):
        """The decoder layers on the packed tokens -> (last layer's output, residual stream), [T, hidden]."""
        T, H, KVH, D = inputs.num_tokens, self.H, self.KVH, self.D
        assert T <= self.max_tokens, (T, self.max_tokens)
        qs_n, kv_n = H * D, KVH * D
        if not self.weights.layers:
            return self._embed(inputs), None
        x = residual = None
        for i, layer in enumerate(self.weights.layers):
            if i == 0:
                act, residual = self._first_norm(inputs, layer.input_norm)
            else:
                act, residual = self._norm(x, residual, layer.input_norm)
            qkv = layer.qkv(act, self.qkv_buf[:T])
            q = qkv[:, :qs_n].reshape(T, H, D)
            k = qkv[:, qs_n : qs_n + kv_n].reshape(T, KVH, D)
            v = qkv[:, qs_n + kv_n :].reshape(T, KVH, D)
            rope_write_kv(q, k, v, inputs.positions, self.inv_freq, self.kv_pool, i, inputs.slot_mapping,
                          k_hadamard=self.weights.k_hadamard)
            attn, o_in = self._attention(i, q, k, v, inputs)
            if o_in is None:
                o_in = self._quantize(attn.reshape(T, qs_n))
            o = layer.o_proj(o_in, self.o_buf[:T])
            if self.comm is not None:
                self.comm.all_reduce(o)
            act, residual = self._norm(o, residual, layer.post_attn_norm)
            gate_up = layer.gate_up(act, self.gate_up_buf[:T])
            x = layer.down(self._silu_mul(gate_up), self.down_buf[:T])
            if self.comm is not None:
                self.comm.all_reduce(x)
        return x, residual

    def _attention(self, layer: int, q, k, v, inputs: StepInputs):
        """(fp16 output [T, H, D], o_proj's quantized input when the decode kernel wrote it, else None)."""
        T = inputs.num_tokens
        out = self.attn_buf[:T]
        if inputs.is_prefill:
            return prefill_attention(q, k, v, inputs.cu_seqlens, inputs.context_lens, self.kv_pool, layer,
                                     inputs.block_tables, max_seqlen_q=inputs.max_seqlen_q, out=out), None
        o_in = None
        if not self.float_acts and attention_quant_fusion():
            xp = self.xp
            o_in = QuantizedActivation(xp.empty((T, self.H * self.D), dtype=xp.int8),
                                       xp.empty((T,), dtype=xp.float16),
                                       xp.empty((T,), dtype=xp.float32) if self.need_sums else None)
        attn = decode_attention(q, self.kv_pool, layer, inputs.block_tables, inputs.context_lens,
                                max_context=inputs.max_context, out=out, quant_out=o_in)
        return attn, o_in

    def logits(self, x, residual):
        """fp32 [rows, vocab]: the final RMSNorm of x + residual, then lm_head."""
        w = self.weights
        y, _ = rms_norm(x, w.final_norm, self.eps, residual=residual, xp=self.xp)
        return fp16_gemm(y, w.lm_head, w.lm_head_bias, out_dtype=np.float32, xp=self.xp)
