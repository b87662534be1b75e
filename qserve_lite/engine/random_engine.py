"""An LLMEngine over random weights of a real model's shape, with a real tokenizer: what
`qserve-lite serve --random-weights llama-3-8b --tokenizer DIR` serves, for load tests of a model size whose
weights are not at hand.

    engine = build_random_engine("llama-3-8b", "smollm2-135m", precision="w4a8kv4", group_size=128)

The decoder layers have the config's shape and are drawn on the device at `precision`
(model/random_weights.py,
as `qserve-lite bench` builds them); the vocabulary is the tokenizer's: vocab_size is overridden to the
tokenizer's size (embeddings and lm_head shrink or grow with it), so text prompts and chat templates work and
outputs are (random) text. EOS and the chat template are the tokenizer's.

Device: 'gpu' draws the weights with CuPy and runs GPUModelRunner; 'cpu' (or 'auto' without a usable GPU) runs
the runner's numpy twin, for tiny configs only (as `qserve-lite bench --device cpu`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qserve_lite.core.backend import device_array_module
from qserve_lite.core.kv_layout import KVPageLayout
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.precision import Precision
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.gpu_model_runner import env_num_pages
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.model_runner import pages_that_fit
from qserve_lite.engine.tensor_parallel import RandomSource, TPGroup, make_runner
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.loader import resolve_model
from qserve_lite.io.shipped_configs import load_config, shipped_config_names
from qserve_lite.model.random_weights import (
    CPU_MAX_PARAMETERS,
    build_random_weights,
    check_weights_fit,
    linear_mode,
)
from qserve_lite.model.tokenizer import Tokenizer
from qserve_lite.model.tp_split import check_splits


@dataclass
class RandomEngine:
    """The engine and what it serves: the shape, the precision, and the vocabulary override."""

    engine: LLMEngine
    label: str  # the shipped config name, or the config path given
    precision: Precision
    group_size: int | None  # W4 only
    tokenizer_ref: str | None  # None: no tokenizer (token-id prompts only, outputs without text)
    config_vocab_size: int  # the shape's own vocabulary
    weights_gib: float
    device: str  # 'gpu' or 'cpu'
    build_s: float

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    @property
    def default_name(self) -> str:
        """The served model name when none is given: says that the weights are random."""
        shape = self.label
        if "/" in shape or shape.endswith(".json"):  # a config path: its file (or directory) name
            path = Path(shape)
            shape = path.parent.name if path.stem == "config" else path.stem
        return f"random-{shape}-{self.precision.name}"

    def metadata(self) -> dict:
        """What /v1/models reports about the model besides its name."""
        cfg = self.engine.config
        return {
            "weights": "random",
            "shape": self.label,
            "precision": self.precision.name,
            "group_size": self.group_size,
            "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "vocab_size": self.vocab_size,
            "config_vocab_size": self.config_vocab_size,
            "tokenizer": self.tokenizer_ref,
            "weights_gib": self.weights_gib,
            "device": self.device,
        }

    def describe(self) -> str:
        """One line for the startup log."""
        g = f" g{self.group_size}" if self.group_size else ""
        vocab = (
            f"vocab_size {self.config_vocab_size} -> {self.vocab_size} (overridden to the tokenizer's)"
            if self.vocab_size != self.config_vocab_size
            else f"vocab_size {self.vocab_size}" + (" (the tokenizer's)" if self.tokenizer_ref else "")
        )
        tokenizer = f"tokenizer {self.tokenizer_ref}" if self.tokenizer_ref else "no tokenizer (token ids)"
        return (
            f"RANDOM weights of {self.label}'s shape at {self.precision.name}{g} "
            f"({self.weights_gib:.2f} GiB, built in {self.build_s:.1f}s on {self.device}), {tokenizer}, "
            f"{vocab}"
        )


def load_tokenizer(ref: str | Path) -> tuple[Tokenizer, str]:
    """A directory holding tokenizer.json (+ tokenizer_config.json for the chat template and special tokens),
    or any model reference the loader resolves (alias, model directory, .gguf, hub id) -> (tokenizer, where
    it came from)."""
    path = Path(str(ref)).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer(path), str(ref)
    return Tokenizer(resolve_model(ref)), str(ref)


def build_random_engine(
    shape: str | Path,
    tokenizer: str | Path | None,
    *,
    precision: str | Precision | None = None,
    group_size: int = 128,
    config: EngineConfig | None = None,
    **overrides,
) -> RandomEngine:
    """Random weights of `shape` (a shipped config name or a config.json) with `tokenizer`'s vocabulary,
    behind an LLMEngine (module docstring). precision: default w4a8kv4; group_size: W4 only (128 or -1).
    tokenizer None: none (the shape's own vocabulary; prompts are token ids, outputs carry no text).
    config (+ EngineConfig field overrides; default device 'auto'): num_pages is 64-token KV pages (default
    on the GPU: what gpu_memory_utilization leaves, or NUM_GPU_PAGE_BLOCKS; on the CPU: what 2 GiB holds)."""
    config = (config or EngineConfig(device="auto")).replace(**overrides)
    precision = Precision.parse(precision or "w4a8kv4") if not isinstance(precision, Precision) else precision
    linear_mode(precision, group_size)  # a bad group size fails before anything is loaded
    model_shape = load_config(shape)
    name = str(shape).lower().removesuffix(".json")
    label = name if name in shipped_config_names() else str(shape)
    tok, tokenizer_ref = load_tokenizer(tokenizer) if tokenizer is not None else (None, None)
    cfg = with_vocab_size(model_shape, tok.vocab_size) if tok is not None else model_shape
    xp = device_array_module(config.device)
    if xp is np and cfg.num_parameters() > CPU_MAX_PARAMETERS:
        raise QServeLiteError(
            f"{label} has {cfg.num_parameters() / 1e9:.1f}B parameters; the CPU (numpy twin) path is for "
            "tiny test configs. Use --device gpu"
        )
    g = f" g{group_size}" if precision.w_bits == 4 else ""
    tp = config.tensor_parallel_size
    check_splits(cfg, tp, precision.w_bits, group_size if precision.w_bits == 4 else None, name=label)
    if tp == 1:
        check_weights_fit(cfg, precision, group_size, xp, name=f"{label} {precision.name}{g}")
    t0 = time.perf_counter()
    print(f"qserve-lite: drawing random weights of {label} at {precision.name}{g}"
          f"{f' over {tp} GPUs' if tp > 1 else ''} ...", file=sys.stderr, flush=True)
    if tp > 1:  # each rank draws its shard's weights on its GPU
        source = RandomSource(cfg, precision.name, group_size, config.seed, same_model=False)
        weights = TPGroup(source, tp, "cpu" if xp is np else "gpu")
    else:
        weights = build_random_weights(cfg, precision, group_size, xp=xp, seed=config.seed)
        if xp is not np:
            xp.cuda.Device().synchronize()
    build_s = time.perf_counter() - t0

    limit = config.max_model_len or cfg.max_position_embeddings
    batched = config.batched_tokens_for(limit)
    runner_config = config.replace(max_model_len=limit, max_num_batched_tokens=batched)
    if config.num_pages is None and xp is np:
        num_pages = env_num_pages()
        if num_pages is None:
            layout = KVPageLayout(precision.kv_bits, cfg.num_kv_heads, cfg.head_dim)
            num_pages = pages_that_fit(cfg.num_layers * 2 * layout.page_bytes, config.max_num_seqs, limit)
        runner_config = runner_config.replace(num_pages=num_pages)
    runner = make_runner(weights, runner_config, xp)
    engine = LLMEngine(None, config.replace(num_pages=None), runner=runner, tokenizer=tok)
    return RandomEngine(
        engine=engine,
        label=label,
        precision=precision,
        group_size=group_size if precision.w_bits == 4 else None,
        tokenizer_ref=tokenizer_ref,
        config_vocab_size=model_shape.vocab_size,
        weights_gib=round(weights.nbytes() / 2**30, 3),
        device="cpu" if xp is np else "gpu",
        build_s=build_s,
    )


def with_vocab_size(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """cfg with another vocabulary (its config.json dict updated to match)."""
    if vocab_size == cfg.vocab_size:
        return cfg
    return dataclasses.replace(cfg, vocab_size=vocab_size, extra=dict(cfg.extra, vocab_size=vocab_size))
