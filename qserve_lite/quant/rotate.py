"""QoQ block input module rotation: fold the RMSNorm gains, then rotate the residual stream with a
Hadamard matrix R (h' = h R) and the values / o_proj inputs of every head with a per-head Hadamard R_h.

The transformed model computes the same function (exactly, up to float64 round-off) but its residual
stream and V cache have their outlier channels spread over all channels, which is what makes W4A8KV4
quantization accurate. See /work/shared/research/qoq-algorithm.md section 3.

Every function here works in place on a LlamaWeights whose arrays are float64 numpy arrays (use
`weights_to_float64` first): attributes are replaced by new arrays, so arrays the caller still holds
elsewhere are never modified.

Config consequence: after `fold_norms` / `rotate_model` the model is untied (lm_head has its own matrix,
different from the embeddings), so whoever saves it must write `tie_word_embeddings: false` in
config.json and store `lm_head.weight`. The norm gains become all-ones vectors and are still stored.
"""

from __future__ import annotations

import copy

import numpy as np

from qserve_lite.core.backend import array_module, is_cupy
from qserve_lite.core.hadamard import hadamard
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.model.linear import Linear
from qserve_lite.model.weights import LayerWeights, LlamaWeights

__all__ = [
    "weights_to_float64",
    "is_tied",
    "untie_embeddings",
    "fold_norms",
    "norms_are_folded",
    "fold_layer_norms",
    "fold_final_norm",
    "rotate_residual",
    "rotate_residual_ends",
    "rotate_layer_residual",
    "rotate_heads_vo",
    "rotate_layer_heads_vo",
    "signed_hadamard",
    "rotation_matrices",
    "rotate_model",
    "prepare_ends",
    "prepare_layer",
]


def _to_f64(a) -> np.ndarray:
    if a is None:
        return None
    if not isinstance(a, np.ndarray) and hasattr(a, "get"):  # a cupy array
        a = a.get()
    return np.array(a, dtype=np.float64, copy=True)


def _layer_arrays(lw: LayerWeights) -> list:
    return [getattr(lw, name).weight for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                  "up_proj", "down_proj")]


def _check_f64(arrays: list, what: str) -> None:
    for a in arrays:
        if not (isinstance(a, np.ndarray) or is_cupy(a)) or a.dtype != np.float64:
            raise TypeError(f"{what} needs float64 numpy weights (use weights_to_float64 first), "
                            f"found {type(a).__name__} {getattr(a, 'dtype', '')}")


def _require_f64(weights: LlamaWeights, what: str) -> None:
    arrays = [weights.embed_tokens, weights.lm_head.weight]
    for lw in weights.layers:
        arrays += _layer_arrays(lw)
    _check_f64(arrays, what)


def weights_to_float64(weights: LlamaWeights) -> LlamaWeights:
    """A deep float64 numpy copy of `weights`. When lm_head is tied to the embeddings in `weights`, the
    copy's lm_head is tied to the copy's embeddings (one shared array)."""
    tied = is_tied(weights)
    embed = _to_f64(weights.embed_tokens)
    layers = []
    for lw in weights.layers:
        new = copy.copy(lw)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            lin = getattr(lw, name)
            setattr(new, name, Linear(_to_f64(lin.weight), _to_f64(lin.bias)))
        new.input_norm = _to_f64(lw.input_norm)
        new.post_attn_norm = _to_f64(lw.post_attn_norm)
        layers.append(new)
    if tied:
        lm_head = Linear(embed, _to_f64(weights.lm_head.bias))
    else:
        lm_head = Linear(_to_f64(weights.lm_head.weight), _to_f64(weights.lm_head.bias))
    return LlamaWeights(embed_tokens=embed, layers=layers, final_norm=_to_f64(weights.final_norm),
                        lm_head=lm_head, extra=dict(weights.extra))


def is_tied(weights: LlamaWeights) -> bool:
    """True when lm_head's weight is (or overlaps) the embedding matrix."""
    a, b = weights.lm_head.weight, weights.embed_tokens
    if a is b:
        return True
    return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.may_share_memory(a, b)


def untie_embeddings(weights: LlamaWeights) -> LlamaWeights:
    """Give lm_head its own copy of the embedding matrix (no-op when already untied). Returns `weights`."""
    if is_tied(weights):
        weights.lm_head = Linear(weights.embed_tokens.copy(), weights.lm_head.bias)
    return weights


def norms_are_folded(weights: LlamaWeights) -> bool:
    """True when every RMSNorm gain (input, post-attention, final) is exactly 1."""
    gains = [weights.final_norm] + [g for lw in weights.layers for g in (lw.input_norm, lw.post_attn_norm)]
    return all(bool(np.all(np.asarray(g) == 1)) for g in gains)


def fold_layer_norms(lw: LayerWeights) -> LayerWeights:
    """One decoder layer's part of fold_norms: input_norm -> q, k, v and post_attn_norm -> gate, up input
    columns (W <- W diag(g)); both gains become ones. Returns `lw`."""
    g = lw.input_norm
    for lin in (lw.q_proj, lw.k_proj, lw.v_proj):
        lin.weight = lin.weight * g[None, :]
    lw.input_norm = array_module(g).ones_like(g)
    g = lw.post_attn_norm
    for lin in (lw.gate_proj, lw.up_proj):
        lin.weight = lin.weight * g[None, :]
    lw.post_attn_norm = array_module(g).ones_like(g)
    return lw


def fold_final_norm(weights: LlamaWeights) -> LlamaWeights:
    """The non-layer part of fold_norms: untie the embeddings, fold final_norm into lm_head. Returns
    `weights`."""
    untie_embeddings(weights)
    g = weights.final_norm
    weights.lm_head.weight = weights.lm_head.weight * g[None, :]
    weights.final_norm = array_module(g).ones_like(g)
    return weights


def fold_norms(weights: LlamaWeights) -> LlamaWeights:
    """Multiply each RMSNorm gain g into the input columns of the linears reading that norm's output
    (input_norm -> q, k, v; post_attn_norm -> gate, up; final_norm -> lm_head: W <- W diag(g)) and set the
    gains to 1. Unties the embeddings first (the final norm must not reach the embedding rows), so the
    model must afterwards be saved with `tie_word_embeddings: false`. Returns `weights`."""
    fold_final_norm(weights)
    for lw in weights.layers:
        fold_layer_norms(lw)
    return weights


def rotate_residual(weights: LlamaWeights, R: np.ndarray) -> LlamaWeights:
    """Rotate the residual stream by the orthogonal R [hidden, hidden]: h' = h R.

    Embedding rows E <- E R; consumers of the residual (q, k, v, gate, up, lm_head): W <- W R;
    producers (o_proj, down_proj): W <- R^T W and b <- R^T b. Needs folded norms (RMSNorm(h R) equals
    RMSNorm(h) R only for unit gains) and float64 weights. Returns `weights`.
    """
    _require_f64(weights, "rotate_residual")
    if not norms_are_folded(weights):
        raise ValueError("rotate_residual needs folded RMSNorm gains (all ones): call fold_norms first")
    R = np.asarray(R, dtype=np.float64)
    hidden = weights.embed_tokens.shape[1]
    if R.shape != (hidden, hidden):
        raise ValueError(f"rotation has shape {R.shape}, expected ({hidden}, {hidden})")
    # New arrays everywhere: a still-tied lm_head keeps reading the old embeddings and is rotated once.
    rotate_residual_ends(weights, R)
    for lw in weights.layers:
        rotate_layer_residual(lw, R)
    return weights


def rotate_residual_ends(weights: LlamaWeights, R: np.ndarray) -> LlamaWeights:
    """The non-layer part of rotate_residual: embedding rows E <- E R and lm_head W <- W R."""
    weights.embed_tokens = weights.embed_tokens @ R
    weights.lm_head.weight = weights.lm_head.weight @ R
    return weights


def rotate_layer_residual(lw: LayerWeights, R: np.ndarray) -> LayerWeights:
    """One decoder layer's part of rotate_residual: q, k, v, gate, up W <- W R; o, down W <- R^T W."""
    for lin in (lw.q_proj, lw.k_proj, lw.v_proj, lw.gate_proj, lw.up_proj):
        lin.weight = lin.weight @ R
    for lin in (lw.o_proj, lw.down_proj):
        lin.weight = R.T @ lin.weight
        if lin.bias is not None:
            lin.bias = R.T @ lin.bias
    return lw


def rotate_heads_vo(cfg: ModelConfig, weights: LlamaWeights, Rh: np.ndarray) -> LlamaWeights:
    """Rotate every head's values by the orthogonal Rh [head_dim, head_dim]: v' = v Rh per kv head.

    v_proj rows of each kv head: W_v <- Rh^T W_v (bias b <- Rh^T b); o_proj input columns of each query
    head: W_o <- W_o blockdiag(Rh). A query head's attention output is a convex mix of its kv head's value
    rows, so it comes out as out Rh, also with GQA (all query heads of a group read the same rotated V),
    and o_proj's columns for that head undo it. q/k and RoPE are untouched. Returns `weights`.
    """
    _require_f64(weights, "rotate_heads_vo")
    Rh = np.asarray(Rh, dtype=np.float64)
    D = cfg.head_dim
    if Rh.shape != (D, D):
        raise ValueError(f"head rotation has shape {Rh.shape}, expected ({D}, {D})")
    for lw in weights.layers:
        rotate_layer_heads_vo(cfg, lw, Rh)
    return weights


def rotate_layer_heads_vo(cfg: ModelConfig, lw: LayerWeights, Rh: np.ndarray) -> LayerWeights:
    """One decoder layer's part of rotate_heads_vo."""
    KVH, D = cfg.num_kv_heads, cfg.head_dim
    v = lw.v_proj
    w = v.weight.reshape(KVH, D, -1)
    v.weight = (Rh.T @ w).reshape(KVH * D, -1)
    if v.bias is not None:
        v.bias = (v.bias.reshape(KVH, D) @ Rh).reshape(KVH * D)
    o = lw.o_proj
    w = o.weight.reshape(o.weight.shape[0], cfg.num_heads, D)
    o.weight = (w @ Rh).reshape(o.weight.shape[0], cfg.num_heads * D)
    return lw


def signed_hadamard(n: int, rng: np.random.Generator | None) -> np.ndarray:
    """hadamard(n), or with rng its rows times random signs (diag(s) H, still orthogonal)."""
    H = hadamard(n)
    return H if rng is None else rng.choice([-1.0, 1.0], size=n)[:, None] * H


def rotation_matrices(cfg: ModelConfig, residual: bool = True, heads_vo: bool = True,
                      seed: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(R [hidden, hidden] or None, Rh [head_dim, head_dim] or None): Hadamard matrices, with `seed` with
    random row signs (R's signs drawn first)."""
    rng = None if seed is None else np.random.default_rng(seed)
    R = signed_hadamard(cfg.hidden_size, rng) if residual else None
    Rh = signed_hadamard(cfg.head_dim, rng) if heads_vo else None
    return R, Rh


def rotate_model(cfg: ModelConfig, weights: LlamaWeights, residual: bool = True,
                 heads_vo: bool = True, seed: int | None = None) -> LlamaWeights:
    """QoQ rotation of a float64 LlamaWeights, in place: untie the embeddings, fold the norms, then
    (residual) rotate the residual stream by hadamard(hidden_size) and (heads_vo) every head's values by
    hadamard(head_dim); with `seed`, both with random row signs (diag(s) H). Untying and folding always
    happen, so the result is always untied: save it with `tie_word_embeddings: false`. Raises
    QServeLiteError when a size has no Hadamard matrix. Returns `weights`.

    It is `prepare_ends` once, then `prepare_layer` for every layer, with the matrices of
    `rotation_matrices`: the quantizer calls those one layer at a time (one float layer in memory)."""
    _require_f64(weights, "rotate_model")
    R, Rh = rotation_matrices(cfg, residual, heads_vo, seed)
    prepare_ends(weights, R)
    for lw in weights.layers:
        prepare_layer(cfg, lw, R, Rh)
    return weights


def prepare_ends(weights: LlamaWeights, R: np.ndarray | None) -> LlamaWeights:
    """rotate_model's non-layer part with R (None: only untie and fold the final norm)."""
    _check_f64([weights.embed_tokens, weights.lm_head.weight], "prepare_ends")
    fold_final_norm(weights)
    if R is not None:
        rotate_residual_ends(weights, R)
    return weights


def prepare_layer(cfg: ModelConfig, lw: LayerWeights, R: np.ndarray | None,
                  Rh: np.ndarray | None) -> LayerWeights:
    """rotate_model's part for one layer: fold its norms, rotate by R and Rh (each None: skipped)."""
    _check_f64(_layer_arrays(lw), "prepare_layer")
    fold_layer_norms(lw)
    if R is not None:
        rotate_layer_residual(lw, R)
    if Rh is not None:
        rotate_layer_heads_vo(cfg, lw, Rh)
    return lw
