"""Perplexity, GPTQ/QServe protocol: one token stream cut into non-overlapping seq_len chunks, each
evaluated from an empty cache; ppl = exp(mean over chunks of the mean next-token loss)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qserve_lite.errors import QServeLiteError
from qserve_lite.model.llama import LlamaModel


@dataclass
class PerplexityResult:
    ppl: float
    chunks: int
    seq_len: int
    tokens: int  # tokens evaluated (chunks * seq_len)


def chunk_loss(model: LlamaModel, chunk: np.ndarray, logits_block: int = 256) -> float:
    """Mean next-token negative log-likelihood of one chunk [T] (T-1 predictions)."""
    xp = model.xp
    cache = model.new_cache(batch=1, max_len=len(chunk))
    hidden = model.forward(chunk[None], cache)[0]  # [T, hidden]
    targets = xp.asarray(chunk[1:])
    total = 0.0
    for s in range(0, len(chunk) - 1, logits_block):
        e = min(s + logits_block, len(chunk) - 1)
        logits = model.logits(hidden[s:e]).astype(np.float64)
        m = logits.max(axis=-1, keepdims=True)
        lse = m[:, 0] + xp.log(xp.exp(logits - m).sum(axis=-1))
        picked = logits[xp.arange(e - s), targets[s:e]]
        total += float((lse - picked).sum())
    return total / (len(chunk) - 1)


def perplexity(
    model: LlamaModel, token_ids, seq_len: int = 2048, max_tokens: int | None = None, progress: bool = True
) -> PerplexityResult:
    tokens = np.asarray(token_ids, dtype=np.int64)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if seq_len < 2:
        raise QServeLiteError(f"seq_len must be >= 2, got {seq_len}")
    if seq_len > model.cfg.max_position_embeddings:
        raise QServeLiteError(
            f"seq_len {seq_len} exceeds the model's context {model.cfg.max_position_embeddings}"
        )
    n_chunks = len(tokens) // seq_len
    if n_chunks == 0:
        raise QServeLiteError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of seq_len={seq_len}; "
            "give more text or a smaller --seq-len"
        )
    from tqdm.auto import tqdm

    losses = []
    bar = tqdm(range(n_chunks), desc="perplexity", unit="chunk", disable=not progress)
    for i in bar:
        losses.append(chunk_loss(model, tokens[i * seq_len : (i + 1) * seq_len]))
        bar.set_postfix(ppl=f"{math.exp(float(np.mean(losses))):.3f}")
    return PerplexityResult(math.exp(float(np.mean(losses))), n_chunks, seq_len, n_chunks * seq_len)
