"""Where the calibration tokens come from, in this order:

1. text files the user gives (`--calib-text`);
2. a calibration set fetched once through huggingface_hub and kept in its cache: QoQ's (deepcompressor's)
   Pile validation text, `mit-han-lab/pile-val-backup` (a cached copy is used without the network);
3. when neither is there (no network, no text): text the float model generates itself, sampled from its own
   distribution (data-free calibration, as LLM-QAT): texts of SEGMENT_TOKENS tokens that each start from
   BOS and one uniformly random token and continue at temperature 1, joined into samples, on the engine we
   have (the numpy engine on the CPU, the GPU runner when calibrating on a GPU).

`calibration_samples` picks the source and prints one line saying which was used. The named sources
"python-doc" (held-out python3.11-doc files), "pile" and "self" can also be asked for explicitly.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.loader import load_model
from qserve_lite.quant import calibrate
from qserve_lite.sampling_params import SamplingParams

AUTO = "auto"  # the default: --calib-text, else the cached / fetched Pile set, else self-generated
SOURCES = (AUTO, "pile", "self", "python-doc")
PAGE_SIZE_TOKENS = 64


SEGMENT_TOKENS = 128  # tokens per generated text; a calibration sample joins seq_len / SEGMENT_TOKENS of them


def self_generated_samples(model_path: str | Path, n_samples: int, seq_len: int, seed: int = 42,
                           device: str = "cpu", progress: bool = False,
                           segment_tokens: int = SEGMENT_TOKENS) -> np.ndarray:
    """[n_samples, seq_len] tokens sampled from the float model itself (temperature 1, no top-k / top-p).

    The model writes n_samples x ceil(seq_len / segment_tokens) texts of `segment_tokens` tokens at once, and
    each sample joins that many of them (as text calibration joins documents). Each text starts with BOS
    (when the tokenizer has one) and a token drawn uniformly from the vocabulary (seeded), then continues with
    the model's own samples (EOS ignored), so the calibration activations follow the model's own distribution
    without any data. Short texts in a wide batch take seq_len / segment_tokens times fewer decode steps than
    whole-sample texts, each over a shorter context (on the CPU, 16 x 512 tokens of the default model: 233 s
    with 512-token texts). device "gpu" generates on the GPU runner (fp16 weights), "cpu" on the numpy
    engine.
    """
    if n_samples < 1 or seq_len < 3:
        raise QServeLiteError(f"need n_samples >= 1 and seq_len >= 3, got {n_samples} x {seq_len}")
    seg = max(3, min(int(segment_tokens), seq_len))
    per_sample = -(-seq_len // seg)
    loaded = load_model(model_path, dtype=np.float16 if device == "gpu" else np.float32)
    rng = np.random.default_rng(seed)
    bos = loaded.tokenizer.bos_token_id
    vocab = min(loaded.config.vocab_size, loaded.tokenizer.vocab_size)
    head = [int(bos)] if bos is not None else []
    n_texts = n_samples * per_sample
    prompts = [head + [int(rng.integers(0, vocab))] for _ in range(n_texts)]
    pages = n_texts * (math.ceil(seg / PAGE_SIZE_TOKENS) + 1)
    engine = LLMEngine(loaded, EngineConfig(device=device, max_num_seqs=n_texts, max_model_len=seg + 1,
                                            num_pages=pages, seed=seed))
    out: dict[str, list[int]] = {}
    prompt_of: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=seg - len(p), temperature=1.0, seed=seed + i, ignore_eos=True)
        prompt_of[engine.add_request(p, params, stream=False)] = p  # outputs only when finished
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(seg - len(p) for p in prompts), desc="self-generated calibration", unit="tok",
               disable=not progress, leave=False)
    while engine.has_unfinished():
        for r in engine.step():
            if r.finished:
                out[r.request_id] = prompt_of[r.request_id] + list(r.outputs[0].token_ids)
        bar.update(engine.num_generated_tokens - bar.n)
    bar.close()
    del engine, loaded
    texts = [out[rid] for rid in prompt_of]
    return np.array([sum(texts[i * per_sample:(i + 1) * per_sample], [])[:seq_len] for i in range(n_samples)],
                    dtype=np.int64)


def _pile_samples(tokenizer, n_samples: int, seq_len: int, seed: int, progress: bool) -> np.ndarray:
    return calibrate.build_samples(tokenizer, calibrate.pile_val_documents(), n_samples, seq_len, seed,
                                   progress)


def _describe(samples: np.ndarray, what: str) -> str:
    return f"{samples.shape[0]} x {samples.shape[1]} tokens of {what}"


def calibration_samples(model_path: str | Path, tokenizer, source: str | Sequence[str | Path],
                        n_samples: int, seq_len: int, seed: int = 42, device: str = "cpu",
                        progress: bool = True) -> tuple[np.ndarray, str]:
    """(samples [n, seq_len], the source used) for `source`: text files (a list), or one of SOURCES.
    "auto" takes the Pile set (cached, or fetched once) and falls back to self-generated text when it cannot
    be had; the line printed (stderr, with progress) says which source was used and why."""
    why = ""
    if not isinstance(source, str):
        samples = calibrate.build_samples(tokenizer, calibrate.read_documents(source), n_samples, seq_len,
                                          seed, progress)
        used = f"text files ({len(source)})"
    elif source in ("pile", AUTO):
        try:
            samples, used = _pile_samples(tokenizer, n_samples, seq_len, seed, progress), "pile"
        except QServeLiteError as e:
            if source == "pile":
                raise
            samples, used, why = None, "self", f" (the Pile calibration set is not available: {e})"
        if samples is None:
            samples = self_generated_samples(model_path, n_samples, seq_len, seed, device, progress)
    elif source == "self":
        samples, used = self_generated_samples(model_path, n_samples, seq_len, seed, device, progress), "self"
    elif source == "python-doc":
        samples, used = calibrate.load_calibration_samples(tokenizer, source, n_samples, seq_len, seed,
                                                           progress), "python-doc"
    else:  # one text file given as a string
        samples, used = calibrate.load_calibration_samples(tokenizer, [source], n_samples, seq_len, seed,
                                                           progress), "text files (1)"
    names = {"pile": f"{calibrate.PILE_REPO} (Pile validation text)", "self": "text generated by the model "
             "itself (data-free)", "python-doc": "held-out python3.11-doc text"}
    if progress:
        print(f"calibration: {_describe(samples, names.get(used, used))}{why}", file=sys.stderr)
    return samples, used
