"""Megatron splits of a Llama-family model's host weights for tensor parallelism over `tp` ranks.

Rank r of tp holds, per decoder layer:

- q_proj, k_proj, v_proj and gate_proj, up_proj: **column** splits (output channels). q gets query heads
  [r H/tp, (r+1) H/tp); k and v their KV heads: [r KVH/tp, (r+1) KVH/tp) when tp divides KVH, else (KVH < tp,
  tp a multiple of KVH) the one KV head of its query heads, replicated on tp/KVH ranks. gate and up get
  intermediate channels [r I/tp, (r+1) I/tp). Per-output-channel parameters go with their rows: W4 s1
  scales, g128 s2 scales / zeros, per-channel szeros, W8 scales, biases (Qwen2's q/k/v).
- o_proj and down_proj: **row** splits (input channels), the same ranges as the heads / intermediate channels
  above; the per-output-channel parameters (s1, szeros, W8 scales) are replicated, g128 s2 scales / zeros
  are split by group (so K/tp must be a multiple of the group size), and a bias stays on rank 0 only. The
  ranks' outputs are then summed (one all-reduce after each).
- norms, embeddings and lm_head: replicated (rank 0 samples; no vocabulary collectives).

Each rank runs the model of `rank_config(cfg, tp)`: num_heads / tp query heads, its KV heads (the pages of its
KV cache), intermediate_size / tp. `check_splits` raises one ConfigError line for shapes that cannot split
(call it before loading anything).

Numerics (what changes against tp = 1): column-split outputs are bit-identical to the tp = 1 columns (same
input, same rows). A row-split linear's integer accumulators sum exactly to the tp = 1 accumulator *when the
input codes are the same*, but its input is quantized per token on the rank's own K slice (its own scale, no
extra collective), and each rank rounds its partial output to fp16 before the fp16 all-reduce. So a
quantized model at tp > 1 differs from tp = 1 by about one int8 re-quantization per row-split linear (~1% of
its output's RMS): on a small random model, 3-8% of the largest logit and 94-98% argmax agreement; a float
model only by fp16 roundings. Measured in tests/model/test_tp_split.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.errors import ConfigError
from qserve_lite.model.linear import Linear
from qserve_lite.model.weights import LayerWeights, LlamaWeights

W4_PER_CHANNEL_K_MULTIPLE = 32  # the packed W4 layout's tile


def row_split_multiple(w_bits: int, group_size: int | None) -> int:
    """What a row-split linear's K per rank must be a multiple of: the W4 group (g128) or packing tile."""
    if w_bits != 4:
        return 1
    return group_size if group_size and group_size > 0 else W4_PER_CHANNEL_K_MULTIPLE


def check_splits(cfg: ModelConfig, tp: int, w_bits: int = 16, group_size: int | None = None,
                 name: str = "the model") -> None:
    """ConfigError (one line) unless `cfg` splits over tp ranks at w_bits (W4: group_size 128 or -1)."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return
    H, KVH, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    prefix = f"{name} cannot run with tensor_parallel_size {tp}:"
    if H % tp:
        raise ConfigError(f"{prefix} its {H} attention heads do not divide by {tp}")
    if KVH % tp and tp % KVH:
        raise ConfigError(f"{prefix} its {KVH} KV heads neither divide by {tp} nor divide {tp} (replicas)")
    if inter % tp:
        raise ConfigError(f"{prefix} intermediate_size {inter} does not divide by {tp}")
    multiple = row_split_multiple(w_bits, group_size)
    what = f"the W4 group size {group_size}" if multiple == group_size else f"{multiple} (W4 packing)"
    for label, k in (("o_proj", cfg.q_size // tp), ("down_proj", inter // tp)):
        if k % multiple:
            raise ConfigError(f"{prefix} {label} gets {k} input channels per rank, not a multiple of {what}")
    if w_bits == 4 and (inter // tp) % 16:
        raise ConfigError(f"{prefix} gate_up gets {2 * inter // tp} output channels per rank, not a multiple "
                          "of 32 (W4 packing)")


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    return cfg.num_kv_heads // tp if cfg.num_kv_heads >= tp else 1


def kv_head_start(cfg: ModelConfig, tp: int, rank: int) -> int:
    """The first KV head of rank's slice (KVH < tp: the KV head its query heads read, replicated)."""
    if cfg.num_kv_heads >= tp:
        return rank * (cfg.num_kv_heads // tp)
    return rank // (tp // cfg.num_kv_heads)


def rank_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The model one rank runs: its heads, its KV heads and its share of the intermediate channels."""
    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=kv_heads_per_rank(cfg, tp),
                               intermediate_size=cfg.intermediate_size // tp)


# ---- one linear ----

def _rows(a, sl: slice):
    return None if a is None else np.ascontiguousarray(np.asarray(a)[sl])


def split_columns(lin, sl: slice):
    """The output channels `sl` of a linear, with their per-channel parameters and bias."""
    bias = _rows(lin.bias, sl)
    if isinstance(lin, Linear):
        return Linear(_rows(lin.weight, sl), bias)
    q = lin.qweight
    if isinstance(q, W4Group):
        part = W4Group(_rows(q.codes, sl), _rows(q.s1, sl), _rows(q.s2, sl), _rows(q.zeros, sl), q.group_size,
                       q.in_features)
    elif isinstance(q, W4PerChannel):
        part = W4PerChannel(_rows(q.codes, sl), _rows(q.scales, sl), _rows(q.szeros, sl), q.in_features)
    elif isinstance(q, W8PerChannel):
        part = W8PerChannel(_rows(q.codes, sl), _rows(q.scales, sl), q.in_features)
    else:
        raise ConfigError(f"cannot split a {type(q).__name__} weight")
    return type(lin)(part, bias)


def _cols(a, sl: slice):
    return np.ascontiguousarray(np.asarray(a)[:, sl])


def split_rows(lin, sl: slice, keep_bias: bool):
    """The input channels `sl` of a linear (the other ranks hold the rest; outputs are summed): per-output
    parameters replicated, g128 group parameters split by group, the bias on one rank only."""
    bias = lin.bias if keep_bias else None
    k = sl.stop - sl.start
    if isinstance(lin, Linear):
        return Linear(_cols(lin.weight, sl), bias)
    q = lin.qweight
    if isinstance(q, W4Group):
        g = q.group_size
        if sl.start % g or k % g:
            raise ConfigError(f"a row split of {k} channels is not a multiple of the group size {g}")
        gs = slice(sl.start // g, sl.stop // g)
        part = W4Group(_cols(q.codes, sl), q.s1, _cols(q.s2, gs), _cols(q.zeros, gs), g, k)
    elif isinstance(q, W4PerChannel):
        part = W4PerChannel(_cols(q.codes, sl), q.scales, q.szeros, k)
    elif isinstance(q, W8PerChannel):
        part = W8PerChannel(_cols(q.codes, sl), q.scales, k)
    else:
        raise ConfigError(f"cannot split a {type(q).__name__} weight")
    return type(lin)(part, bias)


# ---- a model ----

def _span(start: int, count: int, width: int) -> slice:
    return slice(start * width, (start + count) * width)


def shard_layer(lw: LayerWeights, cfg: ModelConfig, tp: int, rank: int) -> LayerWeights:
    D = cfg.head_dim
    heads = cfg.num_heads // tp
    q_sl = _span(rank * heads, heads, D)
    kv_sl = _span(kv_head_start(cfg, tp, rank), kv_heads_per_rank(cfg, tp), D)
    inter = cfg.intermediate_size // tp
    i_sl = slice(rank * inter, (rank + 1) * inter)
    return LayerWeights(
        input_norm=lw.input_norm,
        q_proj=split_columns(lw.q_proj, q_sl),
        k_proj=split_columns(lw.k_proj, kv_sl),
        v_proj=split_columns(lw.v_proj, kv_sl),
        o_proj=split_rows(lw.o_proj, q_sl, keep_bias=rank == 0),
        post_attn_norm=lw.post_attn_norm,
        gate_proj=split_columns(lw.gate_proj, i_sl),
        up_proj=split_columns(lw.up_proj, i_sl),
        down_proj=split_rows(lw.down_proj, i_sl, keep_bias=rank == 0),
    )


def shard_weights(weights: LlamaWeights, cfg: ModelConfig, tp: int, rank: int) -> LlamaWeights:
    """Rank's share of the host weights (module docstring); tp = 1 returns `weights` itself. Replicated
    arrays (norms, embeddings, lm_head) are shared with `weights`, not copied."""
    if tp == 1:
        return weights
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside 0..{tp - 1}")
    layers = [shard_layer(lw, cfg, tp, rank) for lw in weights.layers]
    w = weights
    return LlamaWeights(w.embed_tokens, layers, w.final_norm, w.lm_head, dict(w.extra))


def quantized_kind(weights: LlamaWeights) -> tuple[int, int | None]:
    """(weight bits, W4 group size or None) of loaded host weights (for check_splits)."""
    q = getattr(weights.layers[0].q_proj, "qweight", None)
    if isinstance(q, W4Group):
        return 4, q.group_size
    if isinstance(q, W4PerChannel):
        return 4, -1
    return (8, None) if isinstance(q, W8PerChannel) else (16, None)
