"""The Llama-family transformer forward (Llama 2/3, Mistral, Qwen2, SmolLM2), written against an
array module `xp` (numpy on CPU, cupy on GPU). fp32 math: this is the reference every kernel is
checked against, so it stays plain.
"""

from __future__ import annotations

import math

import numpy as np

from qserve_lite.core.hadamard import hadamard
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.rope import apply_rope, rope_cos_sin, rope_inv_freq
from qserve_lite.kernels.attention import head_hadamard
from qserve_lite.model.attention import AttentionBackend, ContiguousAttention, as_backend
from qserve_lite.model.kv_cache import KVCache
from qserve_lite.model.weights import LayerWeights, LlamaWeights


def rms_norm(x, weight, eps: float, xp):
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis (true RMSNorm, no mean subtraction)."""
    var = xp.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / xp.sqrt(var + eps)) * weight


def silu(x, xp):
    return x / (1.0 + xp.exp(-x))


def softmax_(x, xp):
    """Softmax over the last axis, in place (x is overwritten and returned)."""
    x -= xp.max(x, axis=-1, keepdims=True)
    xp.exp(x, out=x)
    x /= xp.sum(x, axis=-1, keepdims=True)
    return x


ATTN_QUERY_BLOCK = 256  # queries per attention block in prefill
# Where `LlamaModel.observer` is called, per layer: the residual entering the block, the normed inputs of
# q/k/v and gate/up, post-RoPE q [B,T,H,D] and k [B,T,KVH,D] (never Hadamard-rotated: see k_hadamard),
# v [B,T,KVH,D], o_proj's and down_proj's inputs.
OBSERVED_POINTS = ("layer_in", "attn_in", "q", "k", "v", "o_in", "mlp_in", "down_in")


def causal_attention(q, k_all, v_all, start: int, xp):
    """Causal GQA attention of queries q [B, T, H, D] at positions start..start+T-1 over the keys and
    values k_all, v_all [B, KVH, S, D] of positions 0..S-1 (S >= start + T). Returns [B, T, H * D]."""
    B, T, H, D = q.shape
    KVH = k_all.shape[1]
    group = H // KVH
    scale = 1.0 / math.sqrt(D)
    # Query head h uses kv head h // group. Each kv head's `group` query heads are stacked along the
    # token axis so every product is one (group*t, D) x (D, S) matrix multiply. Queries go in blocks
    # so the score matrix stays small and causality skips the keys a block cannot see.
    qg = q.reshape(B, T, KVH, group, D).transpose(0, 2, 3, 1, 4)  # [B, KVH, group, T, D]
    out = xp.empty((B, KVH, group, T, D), dtype=q.dtype)
    for s in range(0, T, ATTN_QUERY_BLOCK):
        e = min(s + ATTN_QUERY_BLOCK, T)
        n, visible = e - s, start + e
        qb = qg[:, :, :, s:e].reshape(B, KVH, group * n, D)
        scores = qb @ k_all[:, :, :visible].swapaxes(-1, -2)  # [B, KVH, group*n, visible]
        scores *= scale
        if n > 1:  # only the block's own n newest keys need the causal mask
            q_local = xp.tile(xp.arange(n), group)[:, None]
            scores[..., visible - n :] += xp.where(xp.arange(n)[None, :] > q_local, -xp.inf, 0.0).astype(
                scores.dtype
            )
        probs = softmax_(scores, xp)
        out[:, :, :, s:e] = (probs @ v_all[:, :, :visible]).reshape(B, KVH, group, n, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)


class LlamaModel:
    """Weights + config + array module. `forward` runs a batch of equal-length token chunks over a
    contiguous cache; `forward_packed` runs the engine's packed variable-length batches over pages."""

    def __init__(self, cfg: ModelConfig, weights: LlamaWeights, xp=np, kv_quantizer=None):
        self.cfg = cfg
        self.weights = weights
        self.xp = xp
        self.inv_freq = rope_inv_freq(cfg)
        # kv_quantizer(x [B, KVH, T, D]) -> x_hat: fake-quantizes K/V as they enter the cache (KV4/KV8).
        self.kv_quantizer = kv_quantizer
        # observer(layer_idx, point, array): calibration hook, called at the points listed in OBSERVED_POINTS.
        self.observer = None
        # k_hadamard: q and k are multiplied per head by the normalized Hadamard matrix H_D after RoPE (after
        # the observer sees them), before the KV cache write: q k^T is unchanged (H H^T = I), and the rotated
        # K quantizes much better to KV4. Set from a checkpoint's quantization_config (io/loader.py).
        self.k_hadamard = False
        # fp16_activations: round to fp16 where the GPU engine stores fp16 (the residual stream, post-RoPE /
        # Hadamard q and k, the final norm's output; quantized linears already return fp16 values and
        # quantize fp16-rounded inputs). Set for quantized models by the loader, so the CPU emulation follows
        # the GPU's numerics: KV4 / INT8 codes then flip only where the two truly differ.
        self.fp16_activations = False
        self._head_hadamard = None  # H_D in the model's dtype, built on first use

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(
            self.cfg,
            batch,
            max_len,
            self.xp,
            dtype=self.weights.embed_tokens.dtype,
            quantizer=self.kv_quantizer,
        )

    def _observe(self, layer_idx: int, point: str, value) -> None:
        if self.observer is not None:
            self.observer(layer_idx, point, value)

    def _fp16(self, x):
        """x rounded to fp16 (kept in its dtype) when fp16_activations is on."""
        return x.astype(self.xp.float16).astype(x.dtype) if self.fp16_activations else x

    def head_hadamard_matrix(self, dtype):
        """The normalized Hadamard matrix H_D [head_dim, head_dim] (core/hadamard.py) as an xp array."""
        h = self._head_hadamard
        if h is None or h.dtype != dtype:
            h = self._head_hadamard = self.xp.asarray(hadamard(self.cfg.head_dim), dtype=dtype)
        return h

    def attention(self, layer_idx: int, lw: LayerWeights, x, cos, sin, cache, start: int):
        """Self-attention of x [B, T, hidden]. `cache` is a KVCache-like cache (all sequences hold `start`
        tokens) or an attention backend (model/attention.py: the paged cache of the engine)."""
        cfg, xp = self.cfg, self.xp
        B, T, _ = x.shape
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = lw.q_proj(x).reshape(B, T, H, D)
        k = lw.k_proj(x).reshape(B, T, KVH, D)
        v = lw.v_proj(x).reshape(B, T, KVH, D)
        q = self._fp16(apply_rope(q, cos, sin))
        k = self._fp16(apply_rope(k, cos, sin))
        if self.observer is not None:
            self._observe(layer_idx, "q", q)
            self._observe(layer_idx, "k", k)
            self._observe(layer_idx, "v", v)
        if self.k_hadamard and self.fp16_activations and xp is np:
            # the KV writer's own fp32 FWHT (its numpy twin): the same roundings as the GPU
            q, k = head_hadamard(q).astype(q.dtype), head_hadamard(k).astype(k.dtype)
        elif self.k_hadamard:
            hd = self.head_hadamard_matrix(q.dtype)
            q, k = self._fp16(q @ hd), self._fp16(k @ hd)
        kv = as_backend(cache, start)
        kv.write(layer_idx, k, v)
        out = xp.empty((B, T, H * D), dtype=q.dtype)
        for index, k_ctx, v_ctx, ctx_start in kv.contexts(layer_idx):
            out[index] = causal_attention(q[index], k_ctx, v_ctx, ctx_start, xp)
        self._observe(layer_idx, "o_in", out)
        return lw.o_proj(out)

    def mlp(self, layer_idx: int, lw: LayerWeights, x):
        act = silu(lw.gate_proj(x), self.xp) * lw.up_proj(x)
        self._observe(layer_idx, "down_in", act)
        return lw.down_proj(act)

    def layer(self, i: int, lw: LayerWeights, h, cos, sin, cache: KVCache, start: int):
        """One decoder block: h -> h + attn(norm(h)) -> + mlp(norm(.))."""
        eps, xp = self.cfg.rms_norm_eps, self.xp
        self._observe(i, "layer_in", h)
        x = rms_norm(h, lw.input_norm, eps, xp)
        self._observe(i, "attn_in", x)
        h = self._fp16(h + self.attention(i, lw, x, cos, sin, cache, start))
        x = rms_norm(h, lw.post_attn_norm, eps, xp)
        self._observe(i, "mlp_in", x)
        return self._fp16(h + self.mlp(i, lw, x))

    def forward(self, token_ids, cache: KVCache, start: int | None = None, fresh_new_kv: bool = False):
        """Run token_ids [B, T] at positions start..start+T-1 (default: cache.length); update the cache.
        fresh_new_kv: these tokens attend to their own unquantized K/V (a prefill step; model/attention.py).

        Returns the final-normed hidden states [B, T, hidden]; `logits` turns them into scores.
        """
        cfg, xp, w = self.cfg, self.xp, self.weights
        token_ids = xp.asarray(token_ids)
        if token_ids.ndim == 1:
            token_ids = token_ids[None]
        B, T = token_ids.shape
        if start is None:
            start = cache.length
        if B != cache.batch:
            raise ValueError(f"batch {B} does not match the cache's batch {cache.batch}")
        if start + T > cache.max_len:
            raise ValueError(f"{start + T} tokens exceed the cache capacity {cache.max_len}")
        cos, sin = rope_cos_sin(np.arange(start, start + T), self.inv_freq, xp, dtype=w.embed_tokens.dtype)
        h = w.embed_tokens[token_ids]
        attn = ContiguousAttention(cache, start, fresh_new_kv)
        for i, lw in enumerate(w.layers):
            h = self.layer(i, lw, h, cos, sin, attn, start)
        cache.length = start + T
        return self._fp16(rms_norm(h, w.final_norm, cfg.rms_norm_eps, xp))

    def forward_packed(self, token_ids, positions, attn: AttentionBackend, input_embeds=None):
        """Run a packed variable-length batch: token_ids, positions [N] hold several sequences' new
        tokens back to back, and `attn` (a PagedAttention) says where each one's keys and values live.
        input_embeds: (rows [n], values [n, hidden]): these packed rows enter as the given embeddings
        instead of their tokens' (a VLM's image tokens).

        Returns the final-normed hidden states [N, hidden].
        """
        xp, w = self.xp, self.weights
        cos, sin = rope_cos_sin(positions, self.inv_freq, xp, dtype=w.embed_tokens.dtype)
        h = w.embed_tokens[xp.asarray(token_ids)][None]  # [1, N, hidden]
        if input_embeds is not None:
            rows, values = input_embeds
            h[0, xp.asarray(rows)] = xp.asarray(values).astype(h.dtype)
        for i, lw in enumerate(w.layers):
            h = self.layer(i, lw, h, cos, sin, attn, 0)
        return self._fp16(rms_norm(h[0], w.final_norm, self.cfg.rms_norm_eps, xp))

    def logits(self, hidden):
        """Vocabulary scores for hidden states [..., hidden] -> [..., vocab] (fp32)."""
        return self.weights.lm_head(hidden)
