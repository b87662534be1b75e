"""Next-token choice. `sample_next`: one logits row (the reference loop). `Sampler`: a batch of rows with
per-request parameters, written against an array module so the same code runs on the device (only the
sampled ids, the uniforms and the requested top-N logprobs cross to or from the host).

Per row, in order: log-probabilities for `logprobs` (the model's own distribution); repetition, presence
and frequency penalties; then greedy rows take the argmax (exact), and sampled rows apply temperature,
top-k, top-p (over the top-k renormalized distribution), min-p, and draw by inverse CDF with one uniform
from the request's own generator: a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qserve_lite.core.backend import is_cupy, to_host
from qserve_lite.kernels.argmax import argmax_rows
from qserve_lite.kernels.sample import sample_rows, sampler_kernel_enabled
from qserve_lite.sampling_params import SamplingParams


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits [vocab] (any float dtype) -> token id (no penalties: they need the token history)."""
    logits = np.asarray(logits, dtype=np.float64)
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = cum - probs[order] < params.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def log_softmax(x, xp):
    x = x - xp.max(x, axis=-1, keepdims=True)
    return x - xp.log(xp.sum(xp.exp(x), axis=-1, keepdims=True))


def apply_penalties(logits, seqs, xp):
    """Penalize logits [R, V] in place for the token history of seqs (one per row).

    repetition_penalty over prompt + output tokens (positive logits divided, negative multiplied);
    presence_penalty once and frequency_penalty per occurrence, over output tokens."""
    R, V = logits.shape
    out_rows = np.concatenate([np.full(s.num_output_tokens, r) for r, s in enumerate(seqs)] + [[]])
    out_toks = np.concatenate([s.output_token_ids for s in seqs] + [[]])
    # occurrences per (row, token) by bincount over flat indices (cupy has no ufunc.at for every version)
    flat = xp.asarray(out_rows.astype(np.int64) * V + out_toks.astype(np.int64))
    counts = xp.bincount(flat, minlength=R * V).reshape(R, V).astype(xp.float32)
    prompt_rows = np.concatenate([np.full(s.num_prompt_tokens, r) for r, s in enumerate(seqs)])
    prompt_toks = np.concatenate([s.token_ids[: s.num_prompt_tokens] for s in seqs])
    seen = counts > 0
    seen[xp.asarray(prompt_rows, dtype=np.int64), xp.asarray(prompt_toks, dtype=np.int64)] = True
    rep = xp.asarray([s.params.repetition_penalty for s in seqs], dtype=xp.float32)[:, None]
    pres = xp.asarray([s.params.presence_penalty for s in seqs], dtype=xp.float32)[:, None]
    freq = xp.asarray([s.params.frequency_penalty for s in seqs], dtype=xp.float32)[:, None]
    penalized = xp.where(logits > 0, logits / rep, logits * rep)
    logits[...] = xp.where(seen, penalized, logits)
    logits -= freq * counts + pres * (counts > 0)
    return logits


def filter_logits(x, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray, xp):
    """Set to -inf, per row of temperature-scaled logits x [R, V], what top_k (0 = off), top_p (1 = off)
    and min_p (0 = off) exclude. Ties at a threshold are kept."""
    R, V = x.shape
    top_k = np.where((top_k <= 0) | (top_k >= V), V, top_k)
    rows = np.nonzero((top_k < V) | (top_p < 1.0))[0]
    if len(rows):
        xs = x[rows]
        k = xp.asarray(top_k[rows])[:, None]
        ordered = -xp.sort(-xs, axis=-1)  # descending
        ordered = xp.where(xp.arange(V)[None, :] < k, ordered, -xp.inf)
        probs = xp.exp(ordered - ordered[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        keep = xp.cumsum(probs, axis=-1) - probs < xp.asarray(top_p[rows], dtype=xp.float32)[:, None]
        last = xp.minimum(keep.sum(axis=-1) - 1, k[:, 0] - 1)  # the kept prefix, never past top_k
        threshold = xp.take_along_axis(ordered, last[:, None], axis=-1)
        x[rows] = xp.where(xs >= threshold, xs, -xp.inf)
    rows = np.nonzero(min_p > 0.0)[0]
    if len(rows):
        xs = x[rows]  # p >= min_p * p_max  <=>  x >= x_max + log(min_p)
        threshold = xs.max(axis=-1, keepdims=True) + xp.asarray(np.log(min_p[rows]), dtype=xs.dtype)[:, None]
        x[rows] = xp.where(xs >= threshold, xs, -xp.inf)
    return x


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: {token: logprob} (top-N and the sampled one)


class Sampler:
    """Batched sampling over logits [B, V] from the model (one row per sequence, in batch order)."""

    def __init__(self, xp=np):
        self.xp = xp

    def __call__(self, logits, seqs) -> SamplerOutput:
        xp = self.xp
        B, V = logits.shape
        params = [s.params for s in seqs]
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        logits = logits.astype(xp.float32, copy=bool(penalized))  # penalties write into it
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = log_softmax(logits[want_lp], xp) if want_lp else None
        if penalized:
            logits[penalized] = apply_penalties(logits[penalized], [seqs[i] for i in penalized], xp)

        tokens = to_host(self.choose(logits, seqs)).astype(np.int64)

        logprobs: list[dict[int, float] | None] = [None] * B
        if want_lp:
            lp_host = self._top_logprobs(raw_logprobs, [params[i].logprobs for i in want_lp], tokens[want_lp])
            for i, d in zip(want_lp, lp_host, strict=True):
                logprobs[i] = d
        return SamplerOutput(tokens.tolist(), logprobs)

    @staticmethod
    def on_device(seqs) -> bool:
        """choose() alone decides these rows: no penalties (they need the host's token history) and no
        logprobs (they go back to the host with the token)."""
        return not any(s.params.has_penalties or s.params.logprobs is not None for s in seqs)

    def choose(self, logits, seqs):
        """The next token of each row of logits [B, V] (penalties already applied), as an int32 array of the
        logits' module, computed without waiting for the device: greedy rows take the argmax, sampled rows
        draw with one uniform from their request's generator (module docstring)."""
        xp = self.xp
        B, V = logits.shape
        params = [s.params for s in seqs]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            return argmax_rows(logits, xp)
        tokens = xp.empty(B, dtype=xp.int32)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            tokens[greedy] = argmax_rows(logits[greedy], xp)
        if is_cupy(xp) and sampler_kernel_enabled():  # kernels/sample.py: the same filters on integer masses
            u = np.array([1.0 - seqs[i].generator.random() for i in sampled])
            tokens[sampled] = sample_rows(
                logits[sampled], np.array([params[i].temperature for i in sampled], dtype=np.float32),
                np.array([params[i].top_k for i in sampled]), np.array([params[i].top_p for i in sampled]),
                np.array([params[i].min_p for i in sampled]), u)
            return tokens
        temps = xp.asarray([params[i].temperature for i in sampled], dtype=xp.float32)[:, None]
        x = filter_logits(
            logits[sampled] / temps,
            np.array([params[i].top_k for i in sampled]),
            np.array([params[i].top_p for i in sampled]),
            np.array([params[i].min_p for i in sampled]),
            xp,
        )
        probs = xp.exp(x - x.max(axis=-1, keepdims=True))
        cdf = xp.cumsum(probs, axis=-1)
        # u in (0, 1]: the first token whose cdf reaches u * total has positive probability
        u = xp.asarray([1.0 - seqs[i].generator.random() for i in sampled], dtype=xp.float32)[:, None]
        tokens[sampled] = xp.minimum(xp.sum(cdf < u * cdf[:, -1:], axis=-1), V - 1)
        return tokens

    def _top_logprobs(self, logprobs, ns: list[int], chosen: np.ndarray) -> list[dict[int, float]]:
        """{token: logprob} per row: the top n (most likely first) plus the chosen token."""
        xp = self.xp
        V = logprobs.shape[1]
        n_max = min(max(ns), V)
        chosen_lp = to_host(xp.take_along_axis(logprobs, xp.asarray(chosen)[:, None], axis=-1))[:, 0]
        if n_max > 0:
            if n_max < V:
                top = xp.argpartition(-logprobs, n_max - 1, axis=-1)[:, :n_max]
            else:
                top = xp.broadcast_to(xp.arange(V), logprobs.shape)
            top_lp = xp.take_along_axis(logprobs, top, axis=-1)
            order = xp.argsort(-top_lp, axis=-1, kind="stable")
            top, top_lp = (
                to_host(xp.take_along_axis(top, order, axis=-1)),
                to_host(xp.take_along_axis(top_lp, order, axis=-1)),
            )
        out = []
        for r, n in enumerate(ns):
            d = {int(t): float(v) for t, v in zip(top[r, :n], top_lp[r, :n], strict=True)} if n else {}
            d.setdefault(int(chosen[r]), float(chosen_lp[r]))
            out.append(d)
        return out
