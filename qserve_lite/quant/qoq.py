"""The QoQ pipeline (W4A8KV4, and W8A8): float model -> QServe-format quantized checkpoint.

Order (deepcompressor's ptq.py): rotate -> reorder -> smooth (SmoothAttention, down_proj smoothing) ->
weights (clip search -> GPTQ with fixed parameters, or RTN). All transforms are exact in float64.

Calibration goes one decoder layer at a time (calibrate.LayerRunner): the float hidden states of every
sample enter layer i of the rotated model and the observer collects everything the layer needs in one
pass: post-RoPE q/k abs-max (SmoothAttention), down_proj input abs-max (reorder, smoothing), X^T X of every
linear's input (GPTQ), subsampled rows (clip search) and a few whole samples (q/k block-output search).
Reordering and smoothing only permute / rescale down_proj's input channels, so its statistics are
transformed with them (exactly what a second pass over the transformed layer would collect) instead of
being collected again. Inputs are the float model's activations (no error propagation, as
deepcompressor): the layer's float outputs feed layer i+1; `propagate=True` feeds the quantized layer's
outputs instead (GPTQ's sequential mode).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qserve_lite.core.backend import array_module, is_cupy, memory_pool_gb, to_host
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.precision import Precision
from qserve_lite.core.rope import rope_inv_freq
from qserve_lite.errors import QServeLiteError, WeightsError
from qserve_lite.io.atomic_dir import check_output_dir
from qserve_lite.io.checkpoint.write import CheckpointWriter
from qserve_lite.io.hf_weights import LayerReader, load_llama_weights
from qserve_lite.io.loader import resolve_model
from qserve_lite.model.linear import Linear
from qserve_lite.model.llama import LlamaModel
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.model.tokenizer import Tokenizer
from qserve_lite.model.weights import LayerWeights, LlamaWeights
from qserve_lite.quant import calib_source, calibrate
from qserve_lite.quant.calibrate import LayerRunner, PointSpec, PointStats
from qserve_lite.quant.clip import clip_ratios, search_group_clip, search_qk_clip, search_row_clip
from qserve_lite.quant.gptq import (
    gptq_w4_group,
    gptq_w4_per_channel,
    gptq_w8,
    progressive_params,
    rtn_w4_group,
)
from qserve_lite.quant.quantizers import quantize_w4_per_channel, quantize_w8_per_channel
from qserve_lite.quant.reorder import reorder_down
from qserve_lite.quant.rotate import prepare_ends, prepare_layer, rotation_matrices
from qserve_lite.quant.smooth_attention import search_smooth_attention, smooth_attention
from qserve_lite.quant.smooth_proj import DEFAULT_ALPHA_BETA, smooth_proj

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_POINT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


@dataclass
class QoQConfig:
    """Every QoQ step and its settings; each step can be switched off (`rtn()` switches off all)."""

    w_bit: int = 4  # 4 (W4A8) or 8 (W8A8, per-channel int8)
    group_size: int = 128  # W4: 128 (progressive group quantization) or -1 (per-channel)
    kv_bit: int = 4  # runtime KV cache bits recorded in the checkpoint (4 or 8)
    # runtime per-head Hadamard rotation of q and k after RoPE (quantization_config "k_hadamard"): a much more
    # accurate KV4 K cache; QServe's own runtime does not know it (False for strict QServe compatibility)
    k_hadamard: bool = True
    rotation: bool = True  # Hadamard on the residual stream + per-head Hadamard on v/o (norms always folded)
    rotation_seed: int | None = None  # None: plain Hadamard matrices; an int: H diag(random signs) from it
    smooth_attention: bool = True
    smooth_attention_alpha: float = 0.5  # used when the search is off
    smooth_attention_beta: float = 0.0
    smooth_attention_search: bool = False  # per-layer (alpha, beta) grid search with K KV-quantized
    smooth_attention_grid: int = 20
    smooth_attention_samples: int = 2  # whole calibration samples scored by the search
    smooth_proj: bool = True  # down_proj smoothing folded into up_proj
    smooth_proj_alpha: float | None = None  # None: (0.3, 0.7) for g128, (0.1, 0.9) per-channel
    smooth_proj_beta: float | None = None
    reorder: bool = True  # down_proj input channel reordering (g128 only)
    clip: bool = True  # W4 range-clipping search (per-channel: per row / q-k block; g128: per group, level 2)
    clip_grid: int = 80  # ratios 1 - i/grid * (1 - clip_min_ratio), i = 0..grid
    clip_min_ratio: float = 0.2
    clip_stride: int | None = None  # coarse-to-fine per-row search (None: 4 on CPU, 1 = exhaustive on a GPU)
    clip_rows: int = 512  # calibration rows per linear for the per-row search
    clip_qk_samples: int = 2  # whole samples for the q/k attention-block search
    group_clip_grid: int = 20  # g128 level-2 clipping: ratios down to group_clip_min_ratio, diag(H)-weighted
    group_clip_min_ratio: float = 0.6
    gptq: bool = True
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    n_samples: int | None = None  # None: 16 for CPU calibration, 128 on a GPU
    seq_len: int | None = None  # None: 512 for CPU calibration, 1024 on a GPU
    # where the calibration forwards run: "cpu" (numpy) or "gpu" (the same model code on CuPy; statistics
    # are reduced on the device; GPTQ's Hessian factorizations and the g128 group clip search run there too).
    # The transforms, the per-row clip searches and GPTQ's column loop run on the host either way.
    calib_device: str = "cpu"
    seed: int = 42
    # "auto" (the Pile set from huggingface_hub's cache or fetched once, else text the model generates
    # itself), "pile", "self", "python-doc" (held-out split), or text files: see calib_source.py
    calib_source: str | list = "auto"
    batch_size: int = 4  # calibration samples per layer forward
    propagate: bool = False  # calibrate layer i on the outputs of the quantized layers < i (GPTQ-style)

    def __post_init__(self):
        if self.w_bit not in (4, 8):
            raise QServeLiteError(f"w_bit must be 4 or 8, got {self.w_bit}")
        if self.group_size not in (-1, 128):
            raise QServeLiteError(f"group_size must be -1 (per-channel) or 128, got {self.group_size}")
        if self.w_bit == 8 and self.group_size != -1:
            raise QServeLiteError("W8A8 weights are per-channel: use group_size -1")
        if self.kv_bit not in (4, 8):
            raise QServeLiteError(f"kv_bit must be 4 or 8, got {self.kv_bit}")
        if self.calib_device not in ("cpu", "gpu"):
            raise QServeLiteError(f"calib_device must be 'cpu' or 'gpu', got {self.calib_device!r}")
        if self.smooth_proj_alpha is None or self.smooth_proj_beta is None:
            a, b = DEFAULT_ALPHA_BETA[self.group_size]
            self.smooth_proj_alpha = a if self.smooth_proj_alpha is None else self.smooth_proj_alpha
            self.smooth_proj_beta = b if self.smooth_proj_beta is None else self.smooth_proj_beta

    # steps that only exist for some formats
    @property
    def does_reorder(self) -> bool:
        return self.reorder and self.w_bit == 4 and self.group_size > 0

    @property
    def does_group_clip(self) -> bool:
        return self.clip and self.w_bit == 4 and self.group_size > 0

    @property
    def does_clip(self) -> bool:
        return self.clip and self.w_bit == 4 and self.group_size == -1

    @property
    def precision(self) -> str:
        return f"w{self.w_bit}a8kv{self.kv_bit}"

    def calibration_size(self) -> tuple[int, int]:
        n, t = calibrate.default_calibration_size(self.calib_device)
        return (self.n_samples or n, self.seq_len or t)

    def clip_search_stride(self) -> int:
        if self.clip_stride is not None:
            return self.clip_stride
        return 1 if self.calib_device == "gpu" else 4

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["calib_source"] = (self.calib_source if isinstance(self.calib_source, str)
                             else [str(p) for p in self.calib_source])
        return d


def k_hadamard_supported(head_dim: int) -> bool:
    """The runtime q / k Hadamard rotation (k_hadamard) needs a power-of-two head_dim (the GPU's FWHT)."""
    return head_dim > 0 and head_dim & (head_dim - 1) == 0


def qoq_g128(**overrides) -> QoQConfig:
    """deepcompressor's qoq-g128 (progressive g128, reorder, smooth (0.3, 0.7), GPTQ) plus level-2 group
    clipping, which deepcompressor does not do (measured on SmolLM2-135M: see docs/accuracy.md)."""
    return QoQConfig(**{"group_size": 128, **overrides})


def qoq_per_channel(**overrides) -> QoQConfig:
    """deepcompressor's qoq-gchn: per-channel W4, clip search, smooth (0.1, 0.9), GPTQ, no reordering.
    SmoothAttention stays at fixed (0.5, 0) (deepcompressor grid-searches it here: smooth_attention_search;
    on SmolLM2-135M the search did not lower perplexity, see docs/accuracy.md)."""
    return QoQConfig(**{"group_size": -1, "reorder": False, **overrides})


def qoq_w8a8(**overrides) -> QoQConfig:
    """W8A8 (per-channel int8 weights): rotation + SmoothAttention + GPTQ."""
    return QoQConfig(**{"w_bit": 8, "group_size": -1, "reorder": False, "clip": False, "smooth_proj": False,
                        **overrides})


def rtn(w_bit: int = 4, group_size: int = 128, kv_bit: int = 4, **overrides) -> QoQConfig:
    """Round-to-nearest baseline: every QoQ step off (norms are still folded, as QServe's layout needs)."""
    off = dict(rotation=False, smooth_attention=False, smooth_proj=False, reorder=False, clip=False,
               gptq=False)
    return QoQConfig(**{"w_bit": w_bit, "group_size": group_size, "kv_bit": kv_bit, **off, **overrides})


def config_for_precision(precision: str = "w4a8kv4", group_size: int = 128, **overrides) -> QoQConfig:
    """Preset for a QServe precision name (w4a8kv4, w4a8kv8, w8a8kv4, w8a8kv8)."""
    p = Precision.parse(precision)
    if (p.w_bits, p.a_bits) not in ((4, 8), (8, 8)) or p.kv_bits not in (4, 8):
        raise QServeLiteError(f"quantize supports w4a8kv4, w4a8kv8, w8a8kv4, w8a8kv8; got {p.name}")
    if p.w_bits == 8:
        return qoq_w8a8(kv_bit=p.kv_bits, **overrides)
    preset = qoq_g128 if group_size == 128 else qoq_per_channel
    return preset(kv_bit=p.kv_bits, **overrides)


# ------------------------------------------------------------------------------------------- pipeline


@dataclass
class QuantizeReport:
    out_dir: Path
    seconds: float
    peak_rss_mb: float
    calib_tokens: int
    layers: list[dict] = field(default_factory=list)  # per layer: what each step did (and its seconds)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage of the run
    calib_source: str | None = None  # the calibration source used (calib_source.calibration_samples)
    gpu_pool_peak_gb: float | None = None  # cupy memory pool's high-water mark, on a GPU


def _on(xp, a, dtype=None):
    """a as an xp array (numpy: copied back from the device if needed); None stays None."""
    if a is None:
        return None
    if xp is np:
        if dtype is not None and is_cupy(a):
            a = a.astype(dtype)  # narrow on the device before the copy
        return np.asarray(to_host(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def _layer_to(lw: LayerWeights, xp) -> LayerWeights:
    """The layer with its float arrays (norms, float weights, biases) on xp; quantized weights stay."""
    def lin(x):
        if isinstance(x, Linear):
            return Linear(_on(xp, x.weight), _on(xp, x.bias))
        x.bias = _on(xp, x.bias)
        return x

    return LayerWeights(input_norm=_on(xp, lw.input_norm), q_proj=lin(lw.q_proj), k_proj=lin(lw.k_proj),
                        v_proj=lin(lw.v_proj), o_proj=lin(lw.o_proj),
                        post_attn_norm=_on(xp, lw.post_attn_norm), gate_proj=lin(lw.gate_proj),
                        up_proj=lin(lw.up_proj), down_proj=lin(lw.down_proj))


def _ends_to(w: LlamaWeights, xp, dtype=np.float64) -> None:
    """Embeddings, final norm and lm_head onto xp as `dtype`, in place (a tied lm_head stays tied)."""
    tied = w.lm_head.weight is w.embed_tokens
    w.embed_tokens = _on(xp, w.embed_tokens, dtype)
    w.final_norm = _on(xp, w.final_norm, dtype)
    w.lm_head = Linear(w.embed_tokens if tied else _on(xp, w.lm_head.weight, dtype),
                       _on(xp, w.lm_head.bias, dtype))


def _float32_layer(lw: LayerWeights, xp=np) -> LayerWeights:
    """float32 copy of a layer as xp arrays; quantized linears become their dequantized weights."""
    def lin(x) -> Linear:
        w = x.weight if isinstance(x, Linear) else x.qweight.dequantize()
        return Linear(_on(xp, w, np.float32), _on(xp, x.bias, np.float32))

    return LayerWeights(input_norm=_on(xp, lw.input_norm, np.float32), q_proj=lin(lw.q_proj),
                        k_proj=lin(lw.k_proj), v_proj=lin(lw.v_proj), o_proj=lin(lw.o_proj),
                        post_attn_norm=_on(xp, lw.post_attn_norm, np.float32), gate_proj=lin(lw.gate_proj),
                        up_proj=lin(lw.up_proj), down_proj=lin(lw.down_proj))


def _calibration_xp(device: str):
    """numpy, or cupy for calib_device "gpu" (a clear error when there is no usable GPU)."""
    if device != "gpu":
        return np
    if not calibrate.gpu_available():
        raise QServeLiteError("calibration on the GPU needs cupy and a CUDA device; use --device cpu")
    import cupy

    return cupy


def _float32_model(cfg: ModelConfig, w: LlamaWeights, xp=np, layers: bool = True) -> LlamaModel:
    """A float32 copy of the decoder for the calibration forward, on xp (lm_head is never run).
    layers=False copies only the embeddings: the caller puts each layer in when its turn comes."""
    blocks = [_float32_layer(lw, xp) if layers else None for lw in w.layers]
    embed = _on(xp, w.embed_tokens, np.float32)
    f32 = LlamaWeights(embed_tokens=embed, layers=blocks, final_norm=_on(xp, w.final_norm, np.float32),
                       lm_head=Linear(embed))
    return LlamaModel(cfg, f32, xp)


def point_specs(config: QoQConfig) -> dict[str, PointSpec]:
    """What the calibration forward must keep for `config`."""
    rows = config.clip_rows if config.does_clip else 0
    h = config.gptq or config.does_group_clip
    specs = {
        # attn_in rows serve v_proj's per-row search; whole samples the q/k attention-block search
        "attn_in": PointSpec(hessian=h, rows=rows, keep_samples=config.clip_qk_samples if rows else 0),
        "o_in": PointSpec(hessian=h, rows=rows),
        "mlp_in": PointSpec(hessian=h, rows=rows),
        "down_in": PointSpec(absmax=config.does_reorder or config.smooth_proj, hessian=h, rows=rows),
    }
    if config.smooth_attention:
        keep = config.smooth_attention_samples if config.smooth_attention_search else 0
        specs["k"] = PointSpec(absmax=True, keep_samples=keep)
        if config.smooth_attention_search or config.smooth_attention_beta != 0:
            specs["q"] = PointSpec(absmax=True, keep_samples=keep)
        if keep:
            specs["v"] = PointSpec(keep_samples=keep)
    return {p: s for p, s in specs.items() if s != PointSpec()}


def needs_calibration(config: QoQConfig) -> bool:
    """False for plain RTN (no step reads calibration statistics)."""
    return bool(point_specs(config))


def _permute_scale_stats(st: PointStats, perm: np.ndarray | None = None,
                         scale: np.ndarray | None = None) -> None:
    """Statistics of x[:, perm] / scale from those of x (in place; the Hessian where it is)."""
    hx = array_module(st.hessian)
    if perm is not None:
        if st.absmax is not None:
            st.absmax = st.absmax[perm]
        if st.hessian is not None:
            p = hx.asarray(perm)
            st.hessian = st.hessian[p][:, p]
        if st.rows is not None:
            st.rows = st.rows[:, perm]
    if scale is not None:
        if st.absmax is not None:
            st.absmax = st.absmax / scale
        if st.hessian is not None:
            s = hx.asarray(scale)
            st.hessian = st.hessian / hx.outer(s, s)
        if st.rows is not None:
            st.rows = (st.rows / scale).astype(np.float32)


def transform_layer(cfg: ModelConfig, lw: LayerWeights, stats: dict[str, PointStats],
                    config: QoQConfig) -> dict:
    """SmoothAttention, reorder, down_proj smoothing of one float64 layer (in place), with the down_proj
    input statistics transformed to match. Returns a small record of what was done."""
    info: dict = {}
    if config.smooth_attention:
        q_abs = stats["q"].absmax if "q" in stats else None
        alpha, beta = config.smooth_attention_alpha, config.smooth_attention_beta
        if config.smooth_attention_search:
            q, k, v = (stats[p].samples for p in ("q", "k", "v"))
            k_abs = stats["k"].absmax
            alpha, beta, err, err0 = search_smooth_attention(q, k, v, to_host(lw.o_proj.weight), k_abs, q_abs,
                                                             config.kv_bit, config.smooth_attention_grid,
                                                             k_hadamard=config.k_hadamard
                                                             and k_hadamard_supported(cfg.head_dim))
            info["smooth_attention_error_ratio"] = round(err / err0, 4) if err0 > 0 else 1.0
        lam = smooth_attention(lw, stats["k"].absmax, q_abs, cfg.num_heads, alpha, beta)
        info["smooth_attention_alpha_beta"] = [alpha, beta]
    down = stats.get("down_in")
    if config.does_reorder:
        perm = reorder_down(lw, down.absmax)
        _permute_scale_stats(down, perm=perm)
        info["reorder"] = True
    if config.smooth_proj:
        lam = smooth_proj(lw, down.absmax, config.smooth_proj_alpha, config.smooth_proj_beta)
        _permute_scale_stats(down, scale=lam)
        info["smooth_proj_scale_range"] = [float(lam.min()), float(lam.max())]
    return info


class StageTimer:
    """Seconds per named stage, summed (the device synchronised at each mark, so GPU work is counted where
    it was queued)."""

    def __init__(self, xp=np):
        self.xp = xp
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, stage: str) -> None:
        if is_cupy(self.xp):
            self.xp.cuda.Device().synchronize()
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._t, 3)
        self._t = now


def quantize_layer(cfg: ModelConfig, lw: LayerWeights, stats: dict[str, PointStats], config: QoQConfig,
                   inv_freq: np.ndarray, xp=np, timer: StageTimer | None = None) -> dict:
    """Replace the 7 linears of a (transformed, float64) layer by W4A8Linear / W8A8Linear, in place. xp = cupy
    (GPU calibration) runs GPTQ's Hessian factorizations and the g128 group clip search on the GPU."""
    info: dict = {}
    timer = timer or StageTimer(xp)
    ratios = {name: 1.0 for name in LINEAR_NAMES}
    if config.does_clip:
        grid = clip_ratios(config.clip_grid, config.clip_min_ratio)
        stride = config.clip_search_stride()
        ratios["q_proj"], ratios["k_proj"] = search_qk_clip(
            lw, stats["attn_in"].samples, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, inv_freq, grid)
        for name in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            rows = stats[INPUT_POINT[name]].rows
            ratios[name] = search_row_clip(getattr(lw, name).weight, rows, grid, stride)[0]
        info["clip_ratio_mean"] = {n: round(float(np.mean(r)), 4) for n, r in ratios.items()}
        timer.mark("clip")
    gkw = dict(block_size=config.gptq_block_size, damp=config.gptq_damp, act_order=config.gptq_act_order,
               xp=xp)
    for name in LINEAR_NAMES:
        lin = getattr(lw, name)
        w = lin.weight
        h = stats[INPUT_POINT[name]].hessian_mean() if config.gptq else None
        if config.w_bit == 8:
            q = gptq_w8(w, h, **gkw) if config.gptq else quantize_w8_per_channel(w)
            new = W8A8Linear(q, lin.bias)
        elif config.group_size > 0:
            ratio = None
            if config.does_group_clip:
                u = progressive_params(w, config.group_size)[0]
                h_diag = to_host(xp.diag(stats[INPUT_POINT[name]].hessian))
                grid = clip_ratios(config.group_clip_grid, config.group_clip_min_ratio)
                ratio = search_group_clip(u, h_diag, config.group_size, grid, xp=xp)
                info.setdefault("group_clip_ratio_mean", {})[name] = round(float(ratio.mean()), 4)
                timer.mark("group_clip")
            if config.gptq:
                q = gptq_w4_group(w, h, config.group_size, group_ratio=ratio, **gkw)
            else:
                q = rtn_w4_group(w, config.group_size, group_ratio=ratio)
            new = W4A8Linear(q, lin.bias)
        else:
            r = ratios[name]
            q = gptq_w4_per_channel(w, h, r, **gkw) if config.gptq else quantize_w4_per_channel(w, r)
            new = W4A8Linear(q, lin.bias)
        setattr(lw, name, new)
        timer.mark("gptq" if config.gptq else "round")
    return info


def quantize_weights(cfg: ModelConfig, weights: LlamaWeights, samples: np.ndarray, config: QoQConfig,
                     progress: bool = True, read_layer: Callable[[int], LayerWeights] | None = None,
                     sink=None) -> list[dict]:
    """The QoQ pipeline on float64 weights, in place, one decoder layer at a time: rotate it (or only fold
    its norms), calibrate, transform and quantize its linears. A layer that is None in `weights.layers` is
    read with `read_layer(i)` (float64) when its turn comes, so memory holds one float layer (and the
    quantized ones) rather than the whole float model. With a `sink` (a CheckpointWriter), the prepared
    embeddings / lm_head and each quantized layer are handed to `sink.add_ends` / `sink.add_layer` when
    ready and dropped from `weights` (memory then holds one layer). Returns per-layer records."""
    from tqdm.auto import tqdm

    calibrated = needs_calibration(config)
    # RTN needs no statistics: then the calibration forward is skipped (samples may be None)
    xp = _calibration_xp(config.calib_device) if calibrated else np
    # QServe's W4A8 runtime ignores norm weights: they are always folded into the linears
    R, Rh = rotation_matrices(cfg, seed=config.rotation_seed) if config.rotation else (None, None)
    R, Rh = (None if m is None else xp.asarray(m) for m in (R, Rh))
    _ends_to(weights, xp)
    prepare_ends(weights, R)
    runner = (LayerRunner(_float32_model(cfg, weights, xp, layers=False), samples, config.batch_size)
              if calibrated else None)
    # the checkpoint stores them in fp16: a sink gets (and memory keeps) only that
    _ends_to(weights, np, np.float64 if sink is None else np.float16)
    if sink is not None:
        sink.add_ends(weights)
    specs = point_specs(config)
    inv_freq = rope_inv_freq(cfg)
    layer_info = []
    bar = tqdm(range(cfg.num_layers), desc=f"QoQ {config.precision} g{config.group_size}", unit="layer",
               disable=not progress)
    with _LayerIO(weights, read_layer, sink) as io:
        for i in bar:
            t0 = time.perf_counter()
            lw = io.take(i)  # read ahead while the previous layer was quantized
            waited = time.perf_counter() - t0
            t0 = time.perf_counter()
            lw = _layer_to(lw, xp)
            info = _quantize_one_layer(cfg, i, lw, (R, Rh), runner, specs, config, inv_freq, xp)
            layer_info.append(info)
            lw = _layer_to(lw, np)
            info["stage_seconds"]["read_wait"] = round(waited, 3)
            info["stage_seconds"]["write_wait"] = round(io.put(i, lw), 3)  # written while the next one runs
            info["seconds"] = round(time.perf_counter() - t0, 3)
            peak = memory_pool_gb(xp)
            if peak is not None:
                bar.set_postfix_str(f"GPU peak {peak:.1f} GB")
    return layer_info


class _LayerIO:
    """Float layers in, quantized layers out, overlapped with the quantization: layer i + 1 is read (from
    `read_layer`, when `weights` does not hold it) and layer i - 1 handed to `sink.add_layer` in a background
    thread while layer i is quantized. Host memory holds one more float layer than a sequential loop. Errors
    of either thread surface in the loop; on the way out every background task has finished (an
    interrupted run leaves no writer thread behind its checkpoint's cleanup)."""

    def __init__(self, weights: LlamaWeights, read_layer, sink):
        self.weights, self.read_layer, self.sink = weights, read_layer, sink
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qoq-io")
        self.reading: tuple[int, Future] | None = None
        self.writing: Future | None = None

    def _fetch(self, i: int) -> LayerWeights:
        lw = self.weights.layers[i]
        if lw is None:
            if self.read_layer is None:
                raise ValueError(f"layer {i} of the weights is None and no read_layer was given")
            lw = self.read_layer(i)
        return lw

    def take(self, i: int) -> LayerWeights:
        """Layer i (waiting for its read-ahead), after starting the read of layer i + 1."""
        if self.reading is not None and self.reading[0] == i:
            lw = self.reading[1].result()
        else:
            lw = self._fetch(i)
        self.reading = None
        if i + 1 < len(self.weights.layers) and self.weights.layers[i + 1] is None:
            self.reading = (i + 1, self.pool.submit(self._fetch, i + 1))
        return lw

    def put(self, i: int, lw: LayerWeights) -> float:
        """Hand quantized layer i to the sink (in the background), or keep it in `weights` without one;
        returns the seconds spent waiting for the previous layer's write (at most one is pending)."""
        t0 = time.perf_counter()
        if self.writing is not None:
            self.writing.result()
            self.writing = None
        waited = time.perf_counter() - t0
        if self.sink is None:
            self.weights.layers[i] = lw
        else:
            self.weights.layers[i] = None
            self.writing = self.pool.submit(self.sink.add_layer, i, lw)
        return waited

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self.writing is not None:
                self.writing.result()  # the last layer is written before the caller finishes the checkpoint
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return False


def _quantize_one_layer(cfg: ModelConfig, i: int, lw: LayerWeights, rotations: tuple,
                        runner: LayerRunner | None, specs: dict[str, PointSpec], config: QoQConfig,
                        inv_freq: np.ndarray, xp) -> dict:
    """Rotate (or only fold the norms of), calibrate, transform and quantize layer i in place (arrays on
    xp); returns the record of what was done, with the seconds of each stage ("stage_seconds")."""
    timer = StageTimer(xp)
    prepare_layer(cfg, lw, *rotations)
    timer.mark("prepare")
    stats = {}
    if runner is not None:
        runner.model.weights.layers[i] = _float32_layer(lw, xp)
        stats = runner.run(i, specs, advance=not config.propagate)
        timer.mark("calibrate")
    info = transform_layer(cfg, lw, stats, config)
    timer.mark("transform")
    info.update(quantize_layer(cfg, lw, stats, config, inv_freq, xp, timer))
    del stats
    if runner is not None:
        if config.propagate:  # the next layer sees this layer's quantized (dequantized-weight) outputs
            runner.model.weights.layers[i] = _float32_layer(lw, xp)
            runner.run(i)
            timer.mark("propagate")
        runner.model.weights.layers[i] = None  # the float32 copy of a done layer is no longer needed
    info["stage_seconds"] = timer.seconds
    return info


def _quant_config_record(config: QoQConfig, samples: np.ndarray, source_used: str | None) -> dict:
    n_samples = int(samples.shape[0]) if samples.size else 0
    return {
        "quant_method": "qoq", "w_bit": config.w_bit, "a_bit": 8, "group_size": config.group_size,
        "kv_bit": config.kv_bit, "k_hadamard": bool(config.k_hadamard), "qoq": config.to_dict(),
        "calibration": {"source": source_used if n_samples else None, "n_samples": n_samples,
                        "seq_len": int(samples.shape[1]) if n_samples else 0, "tokens": int(samples.size),
                        "seed": config.seed},
    }


def quantize_model(model_dir: str | Path, out_dir: str | Path, config: QoQConfig | None = None,
                   calib_files: list[str | Path] | None = None, progress: bool = True,
                   overwrite: bool = False, overwrite_flag: str = "overwrite=True",
                   out_flag: str = "output directory") -> QuantizeReport:
    """Quantize a float Llama-family model with QoQ and write a QServe-format checkpoint to out_dir.

    The output target is checked before any work (check_output_dir: no file there, empty unless
    `overwrite`, not the model's directory nor inside or around it, writable); each decoder layer is written
    to the checkpoint when it is done (CheckpointWriter), so memory holds one float layer.
    `overwrite_flag` / `out_flag` name the options in error messages (the CLI passes "--overwrite", "--out").
    """
    config = config or qoq_g128()
    t0 = time.perf_counter()
    flags = dict(overwrite=overwrite, overwrite_flag=overwrite_flag, out_flag=out_flag)
    check_output_dir(out_dir, WeightsError, **flags)  # before resolving (maybe downloading) the model
    path = resolve_model(model_dir)
    cfg = ModelConfig.from_file(path / "config.json")
    if "quantization_config" in cfg.extra:
        raise QServeLiteError(f"{path} is already quantized; quantize the float model it came from")
    tokenizer = Tokenizer(path)
    if needs_calibration(config):
        _calibration_xp(config.calib_device)  # no usable GPU for calib_device "gpu": fail before any work
    n_samples, seq_len = config.calibration_size()
    if seq_len > cfg.max_position_embeddings:
        raise QServeLiteError(f"calibration seq_len {seq_len} exceeds the model's context "
                              f"{cfg.max_position_embeddings}")
    source = list(calib_files) if calib_files else config.calib_source
    k_hadamard = config.k_hadamard and k_hadamard_supported(cfg.head_dim)
    if config.k_hadamard and not k_hadamard and progress:
        print(f"head_dim {cfg.head_dim} is not a power of two: no q / k Hadamard rotation (k_hadamard false)",
              file=sys.stderr)
    config = dataclasses.replace(config, calib_source=source, n_samples=n_samples, seq_len=seq_len,
                                 k_hadamard=k_hadamard)
    writer = CheckpointWriter(out_dir, dict(cfg.extra), _quant_config_record(config, np.zeros((0, 0)), None),
                              path, sources=(path,), **flags)
    samples, source_used = np.zeros((0, 0), np.int64), None
    stages = {"checks": time.perf_counter() - t0}
    if needs_calibration(config):
        samples, source_used = calib_source.calibration_samples(path, tokenizer, source, n_samples, seq_len,
                                                               config.seed, config.calib_device, progress)
    stages["calibration_tokens"] = time.perf_counter() - t0 - sum(stages.values())

    # embeddings and lm_head now, each decoder layer when the pipeline reaches it and written when done
    # (float32 for a GPU run, widened to float64 there: exact for fp16 / bf16 / fp32 checkpoints, half the
    # host memory)
    ends_dtype = np.float32 if config.calib_device == "gpu" else np.float64
    weights = load_llama_weights(cfg, path, dtype=ends_dtype, layers=False)
    with writer, LayerReader(cfg, path, dtype=np.float64) as read_layer:
        layer_info = quantize_weights(cfg, weights, samples, config, progress, read_layer, sink=writer)
        writer.qc.update(_quant_config_record(config, samples, source_used))
        stages["layers"] = time.perf_counter() - t0 - sum(stages.values())
    stages["finish_checkpoint"] = time.perf_counter() - t0 - sum(stages.values())
    out = writer.out_dir
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    report = QuantizeReport(Path(out), seconds, peak_mb, int(samples.size), layer_info,
                            {k: round(v, 2) for k, v in stages.items()}, source_used,
                            memory_pool_gb(_calibration_xp(config.calib_device)) if samples.size else None)
    if progress:
        print(f"quantized {path.name} -> {out}: {config.precision}, group size {config.group_size}, "
              f"{samples.shape[0]} x {samples.shape[1]} calibration tokens, {seconds:.0f}s, "
              f"peak memory {peak_mb:.0f} MB" + (f", GPU memory pool peak {report.gpu_pool_peak_gb:.1f} GB"
                                                 if report.gpu_pool_peak_gb is not None else ""),
              file=sys.stderr)
    return report
