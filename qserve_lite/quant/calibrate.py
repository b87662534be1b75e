"""Calibration data and statistics for QoQ.

Samples follow deepcompressor's recipe: documents in a seeded random order, one random window of
`seq_len` tokens from every document longer than that, everything concatenated and cut into
`n_samples` x `seq_len`. Sources: any local text files, the `mit-han-lab/pile-val-backup` dataset
(deepcompressor's default) through huggingface_hub, or held-out python3.11-doc files; calib_source.py
picks among them (and text the model generates itself) for the quantizer.

Statistics are collected one decoder layer at a time (`LayerRunner`): the float hidden states of every
sample enter layer i, the observer reduces what that layer's quantization needs (per-channel abs-max,
float64 X^T X, a few subsampled rows, a few whole samples), and the layer's float outputs become layer
i+1's inputs. So every layer is calibrated on full-precision activations (no error propagation, as in
deepcompressor) and memory holds one layer's statistics at a time.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qserve_lite.core.backend import array_module, gpu_unavailable_reason
from qserve_lite.core.rope import rope_cos_sin
from qserve_lite.errors import QServeLiteError
from qserve_lite.eval.corpus import PYTHON_DOC_ROOT, python_doc_files
from qserve_lite.model.llama import OBSERVED_POINTS, LlamaModel

PILE_REPO = "mit-han-lab/pile-val-backup"
PILE_FILE = "val.jsonl.zst"
EVAL_EVERY = 10  # python-doc split: files whose sorted index % 10 == 0 are held out for evaluation


# ---------------------------------------------------------------- calibration text ----

def split_python_doc(root: str | Path = PYTHON_DOC_ROOT) -> tuple[list[Path], list[Path]]:
    """(calibration files, evaluation files) of python3.11-doc: sorted index % 10 != 0 vs == 0.

    Deterministic and disjoint, so perplexity measured on the evaluation part is held out from calibration.
    """
    files = python_doc_files(root)
    calib = [f for i, f in enumerate(files) if i % EVAL_EVERY != 0]
    evaluation = [f for i, f in enumerate(files) if i % EVAL_EVERY == 0]
    return calib, evaluation


def read_documents(files: Iterable[str | Path]) -> list[str]:
    """One document per file (UTF-8, undecodable bytes replaced); empty files are skipped."""
    docs = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise QServeLiteError(f"calibration text file not found: {p}")
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(text)
    if not docs:
        raise QServeLiteError("the calibration text files are all empty")
    return docs


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, no DNS, no route), or None. A quick probe,
    so that an offline machine does not wait through huggingface_hub's retries; behind a proxy it answers
    None and leaves the question to huggingface_hub."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def pile_val_file() -> str:
    """The local path of deepcompressor's calibration set: huggingface_hub's cached copy when there is one
    (no network needed), else fetched once into that cache. QServeLiteError when it cannot be had."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(PILE_REPO, PILE_FILE, repo_type="dataset")
    if isinstance(cached, str) and Path(cached).is_file():
        return cached
    unreachable = hub_unreachable()
    if unreachable:
        raise QServeLiteError(f"{PILE_REPO} is not in the Hugging Face cache and the hub is unreachable "
                              f"({unreachable})")
    try:
        return hf_hub_download(PILE_REPO, PILE_FILE, repo_type="dataset", etag_timeout=10)
    except Exception as e:  # offline, proxy, hub errors all look different
        raise QServeLiteError(
            f"could not fetch {PILE_REPO}/{PILE_FILE} from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from None


def pile_val_documents(max_docs: int = 20000) -> list[str]:
    """Documents of deepcompressor's calibration set `mit-han-lab/pile-val-backup` (validation split), from
    huggingface_hub's cache or fetched once into it (pile_val_file).

    Needs the `zstandard` package; raises QServeLiteError saying so, or that the file cannot be fetched.
    """
    path = pile_val_file()
    try:
        import zstandard
    except ImportError:
        raise QServeLiteError(
            f"{PILE_FILE} is zstd-compressed: pip install zstandard (or calibrate with --calib-text FILE...)"
        ) from None
    import io

    docs = []
    with open(path, "rb") as fh:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        for line in reader:
            text = json.loads(line).get("text", "").strip()
            if text:
                docs.append(text)
            if len(docs) >= max_docs:
                break
    return docs


def calibration_documents(source: str | Sequence[str | Path] = "python-doc") -> list[str]:
    """Documents for calibration: "python-doc" (the calibration part of split_python_doc), "pile"
    (pile-val-backup through the hub), or a list of text files."""
    if isinstance(source, str):
        if source == "python-doc":
            return read_documents(split_python_doc()[0])
        if source == "pile":
            return pile_val_documents()
        return read_documents([source])
    return read_documents(source)


def build_samples(tokenizer, documents: Sequence[str], n_samples: int, seq_len: int, seed: int = 42,
                  progress: bool = False) -> np.ndarray:
    """Token samples [n_samples, seq_len] (int64) by deepcompressor's recipe.

    Documents are visited in a seeded random order; a document longer than seq_len contributes one random
    window of seq_len tokens, a shorter one all its tokens; the pieces are concatenated and cut. When the
    documents run out first (few, short files), evenly spaced windows of the whole concatenated text are
    used instead; with less text than one sample, QServeLiteError.
    """
    if n_samples < 1 or seq_len < 2:
        raise QServeLiteError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    need = n_samples * seq_len
    order = list(range(len(documents)))
    rng = random.Random(seed)
    rng.shuffle(order)
    pieces: list[list[int]] = []
    total = 0
    encoded: dict[int, list[int]] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=need, desc="calibration tokens", unit="tok", disable=not progress, leave=False)
    for d in order:
        ids = tokenizer.encode(documents[d], add_special_tokens=False)
        encoded[d] = ids
        if not ids:
            continue
        if len(ids) > seq_len:
            s = rng.randint(0, len(ids) - seq_len)
            ids = ids[s:s + seq_len]
        pieces.append(ids)
        total += len(ids)
        bar.update(min(len(ids), need - bar.n))
        if total >= need:
            break
    bar.close()
    if total >= need:
        flat = np.fromiter((t for p in pieces for t in p), dtype=np.int64, count=total)
        return flat[:need].reshape(n_samples, seq_len)
    # Not enough documents for one window each: windows of the whole text, evenly spaced.
    stream = np.fromiter((t for d in order for t in encoded[d]), dtype=np.int64)
    if len(stream) < seq_len:
        raise QServeLiteError(
            f"the calibration text has {len(stream)} tokens, fewer than one sample of {seq_len}; "
            "give more text or a smaller --calib-seq-len"
        )
    n = min(n_samples, len(stream) // seq_len)
    if n < n_samples:
        print(f"qserve-lite: calibration text has {len(stream)} tokens: using {n} samples of {seq_len} "
              f"instead of {n_samples}", file=sys.stderr)
    starts = np.linspace(0, len(stream) - seq_len, n).round().astype(np.int64)
    return np.stack([stream[s:s + seq_len] for s in starts])


def load_calibration_samples(tokenizer, source: str | Sequence[str | Path] = "python-doc",
                             n_samples: int = 16, seq_len: int = 512, seed: int = 42,
                             progress: bool = False) -> np.ndarray:
    """calibration_documents + build_samples."""
    return build_samples(tokenizer, calibration_documents(source), n_samples, seq_len, seed, progress)


def gpu_available() -> bool:
    """cupy is importable and sees a CUDA device (the engine's own check)."""
    return gpu_unavailable_reason() is None


def default_calibration_size(device: str = "cpu") -> tuple[int, int]:
    """(n_samples, seq_len) for calibration forwards on `device`: deepcompressor's 128 x 1024 on a GPU,
    16 x 512 on the CPU (about two minutes of forwards for the default model on 2 cores)."""
    return (128, 1024) if device == "gpu" else (16, 512)


# ---------------------------------------------------------------- statistics ----

@dataclass(frozen=True)
class PointSpec:
    """What to keep of one observed point (see llama.OBSERVED_POINTS)."""

    absmax: bool = False  # max |x| per channel over all tokens (shape x.shape[2:])
    hessian: bool = False  # sum over tokens of x^T x (per batch in x's dtype, summed in float64), for GPTQ
    rows: int = 0  # keep up to this many token rows, evenly strided over all tokens (clip search)
    keep_samples: int = 0  # keep the whole activations of the first N samples (block-output searches)


@dataclass
class PointStats:
    absmax: np.ndarray | None = None  # float64 [*channels]
    hessian: np.ndarray | None = None  # float64 [c, c], sum of x^T x, on the activations' device
    tokens: int = 0  # tokens reduced into hessian / absmax
    rows: np.ndarray | None = None  # float32 [m, c]
    samples: np.ndarray | None = None  # float32 [S, T, *channels]

    def hessian_mean(self) -> np.ndarray:
        """GPTQ's H = 2/N sum x^T x."""
        assert self.hessian is not None and self.tokens > 0
        return self.hessian * (2.0 / self.tokens)


def _numpy(x) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


class _PointReducer:
    def __init__(self, spec: PointSpec, total_tokens: int):
        self.spec = spec
        self.stats = PointStats()
        self._row_index = (np.unique(np.linspace(0, total_tokens - 1, spec.rows).round().astype(np.int64))
                           if spec.rows else None)
        self._rows: list[np.ndarray] = []
        self._samples: list[np.ndarray] = []

    def update(self, x, first_sample: int) -> None:
        """Reduce one batch x [B, T, *channels] (numpy, or cupy: absmax and X^T X are reduced on the
        device, only their results and the kept rows / samples come to the host)."""
        xp = array_module(x)
        B, T = x.shape[:2]
        st, spec = self.stats, self.spec
        if spec.absmax:
            m = _numpy(xp.abs(x).max(axis=(0, 1))).astype(np.float64)
            st.absmax = m if st.absmax is None else np.maximum(st.absmax, m)
        flat = x.reshape(B * T, -1)
        if spec.hessian:
            # one batch's X^T X in the activations' precision (BLAS syrk / cuBLAS), accumulated in float64
            # where the activations are (on the GPU it stays there for GPTQ: no host copies)
            h = (flat.T @ flat).astype(np.float64)
            if st.hessian is None:
                st.hessian = h
            else:
                st.hessian += h
        st.tokens += B * T
        if self._row_index is not None:
            off = first_sample * T
            sel = self._row_index[(self._row_index >= off) & (self._row_index < off + B * T)] - off
            if len(sel):
                self._rows.append(_numpy(flat[xp.asarray(sel)]).astype(np.float32))
        if spec.keep_samples > first_sample:
            self._samples.append(_numpy(x[: spec.keep_samples - first_sample]).astype(np.float32))

    def finish(self) -> PointStats:
        if self._rows:
            self.stats.rows = np.concatenate(self._rows)
        if self._samples:
            self.stats.samples = np.concatenate(self._samples)
        return self.stats


class _LayerCache:
    """The KVCache interface for one layer and one prefill (calibration needs no cache across calls)."""

    def __init__(self):
        self.k = self.v = None

    def write(self, layer: int, k, v, start: int) -> None:
        self.k, self.v = k, v

    def read(self, layer: int, end: int):
        return self.k, self.v


class LayerRunner:
    """Steps every calibration sample through the decoder one layer at a time.

    `run(i, points)` runs layer i (which must be the next one) over all samples with the observer
    reducing `points`, returns {point: PointStats} and keeps the layer's outputs as the next inputs
    (the float model's, or, when the caller swaps in the quantized layer and runs it again, the quantized
    model's).
    """

    def __init__(self, model: LlamaModel, samples: np.ndarray, batch_size: int = 4, progress: bool = False):
        self.model = model
        samples = np.asarray(samples, dtype=np.int64)
        if samples.ndim != 2:
            raise ValueError(f"samples must be [n, seq_len], got shape {samples.shape}")
        self.n_samples, self.seq_len = samples.shape
        self.batch_size = max(1, batch_size)
        xp, w = model.xp, model.weights
        self.hidden = w.embed_tokens[xp.asarray(samples)]  # [n, T, hidden]
        self.cos, self.sin = rope_cos_sin(np.arange(self.seq_len), model.inv_freq, xp,
                                          dtype=w.embed_tokens.dtype)
        self.next_layer = 0
        self.progress = progress

    def run(self, i: int, points: dict[str, PointSpec] | None = None, advance: bool = True
            ) -> dict[str, PointStats]:
        """advance=False keeps the hidden states at layer i (run it again, e.g. once quantized)."""
        if i != self.next_layer:
            raise ValueError(f"layer {i} requested, but the hidden states are at layer {self.next_layer}")
        points = points or {}
        bad = set(points) - set(OBSERVED_POINTS)
        if bad:
            raise ValueError(f"unknown observed points {sorted(bad)}; known: {OBSERVED_POINTS}")
        total = self.n_samples * self.seq_len
        reducers = {p: _PointReducer(spec, total) for p, spec in points.items()}
        model, lw = self.model, self.model.weights.layers[i]
        state = {"first": 0}

        def observer(layer_idx: int, point: str, value) -> None:
            r = reducers.get(point)
            if r is not None:
                r.update(value, state["first"])

        saved, model.observer = model.observer, observer
        try:
            out = self.model.xp.empty_like(self.hidden)
            for s in range(0, self.n_samples, self.batch_size):
                e = min(s + self.batch_size, self.n_samples)
                state["first"] = s
                out[s:e] = model.layer(i, lw, self.hidden[s:e], self.cos, self.sin, _LayerCache(), 0)
        finally:
            model.observer = saved
        if advance:
            self.hidden = out
            self.next_layer += 1
        return {p: r.finish() for p, r in reducers.items()}


def collect(model: LlamaModel, samples: np.ndarray, points: dict[str, PointSpec],
            layers: Iterable[int] | None = None, batch_size: int = 4,
            progress: bool = True) -> dict[int, dict[str, PointStats]]:
    """Run the float forward over `samples` [n, T] and reduce `points` per layer.

    Returns {layer: {point: PointStats}} for `layers` (default all). Memory: the samples' hidden states
    plus the statistics of the requested layers.
    """
    from tqdm.auto import tqdm

    wanted = set(range(model.cfg.num_layers) if layers is None else layers)
    runner = LayerRunner(model, samples, batch_size)
    stats = {}
    last = max(wanted) if wanted else -1
    for i in tqdm(range(last + 1), desc="calibration", unit="layer", disable=not progress):
        result = runner.run(i, points if i in wanted else None)
        if i in wanted:
            stats[i] = result
    return stats
