"""VLMEngine: a VILA1.5 model on our engine: the vision encoder (model/vision.py) turns images into input
embeddings, which enter the LLM's prefill at the image placeholder positions (engine/sequence.PromptEmbeds);
the LLM is an ordinary LLMEngine at any precision it serves (W4A8KV4, W8A8KV8, W16A16, ...).

`generate(items, params, on_done)` is the continuous-batching driver of captioning and `bench --vlm`: images
are pulled from the iterator, encoded in chunks and queued whenever fewer than max_num_seqs requests are in
flight, so the decode batch stays full across the whole input (no drain between batches); each finished
request (or an item that carried an error instead of pixels) is reported through on_done.

Builders: `build_vlm_engine(loaded)` over a checkpoint (io/vila.load_vila); `build_random_vlm_engine(shape)`
over random weights of a VILA1.5 shape (io/configs/vlm), drawn on the device, for benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from qserve_lite.core.backend import device_array_module, resolve_device
from qserve_lite.core.kv_layout import KVPageLayout
from qserve_lite.core.precision import Precision
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.model_runner import pages_that_fit
from qserve_lite.engine.sequence import PromptEmbeds
from qserve_lite.engine.vlm_prompt import apply_template, image_prompt
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.vila import LoadedVLM, load_vlm_shape
from qserve_lite.model.random_vision import build_random_vision
from qserve_lite.model.random_weights import CPU_MAX_PARAMETERS, build_random_weights, check_weights_fit
from qserve_lite.model.vision import VisionEncoder, VisionWeights
from qserve_lite.outputs import RequestOutput
from qserve_lite.sampling_params import SamplingParams

OnDone = Callable[[str, "RequestOutput | None", "str | None"], None]  # (key, output, error)


@dataclass
class ImageItem:
    """One input: its key and either its preprocessed pixels (float32 [C, S, S]) or why there are none."""

    key: str
    pixels: np.ndarray | None = None
    error: str | None = None


@dataclass
class VLMStats:
    images: int = 0  # requests finished
    errors: int = 0  # items reported with an error
    generated_tokens: int = 0
    vision_s: float = 0.0  # time in the vision encoder (host clock, device synchronized)
    wall_s: float = 0.0


class VLMEngine:
    """An LLMEngine plus the vision encoder of the same model, on the same device."""

    def __init__(self, engine: LLMEngine, encoder: VisionEncoder, name: str):
        self.engine = engine
        self.encoder = encoder
        self.config = encoder.config
        self.name = name
        self.xp = encoder.xp
        if self.config.llm_hidden != engine.config.hidden_size:
            raise QServeLiteError(f"the projector outputs {self.config.llm_hidden} channels, the LLM takes "
                                  f"{engine.config.hidden_size}")

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_num_seqs(self) -> int:
        return self.engine.engine_config.max_num_seqs

    def prompt_ids(self, text: str, template: str | None = None) -> tuple[list[int], np.ndarray]:
        """(ids, image positions) of a user prompt with one `<image>`, in the model's template."""
        if self.tokenizer is None:
            raise QServeLiteError("this model has no tokenizer: give prompts as token ids")
        full = apply_template(template or self.config.conv_template, text)
        ids, positions = image_prompt(self.tokenizer, full, self.config.tokens_per_image)
        if len(positions) != self.config.tokens_per_image:
            raise QServeLiteError(f"the prompt must hold exactly one <image>, got {text!r}")
        return ids, positions

    def _sync(self) -> None:
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()

    def encode(self, pixels: np.ndarray, stats: VLMStats | None = None):
        """The projected embeddings [B, tokens_per_image, llm_hidden] of pixels [B, C, S, S]."""
        t0 = time.perf_counter()
        out = self.encoder.encode(pixels)
        if stats is not None:
            self._sync()
            stats.vision_s += time.perf_counter() - t0
        return out

    def generate(self, items: Iterable[ImageItem], params: SamplingParams,
                 prompt: tuple[list[int], np.ndarray], on_done: OnDone,
                 refill: int | None = None) -> VLMStats:
        """Caption every item with the same prompt (ids, image positions); on_done(key, output, error) as each
        finishes. Images are encoded and queued `refill` or more at a time (default max_num_seqs / 8) whenever
        that many slots are free, and whenever the engine would otherwise idle."""
        ids, positions = prompt
        refill = max(1, refill or self.max_num_seqs // 8)
        engine, stats, keys = self.engine, VLMStats(), {}
        source, exhausted = iter(items), False
        start = time.perf_counter()
        while True:
            free = self.max_num_seqs - len(engine.seqs)
            if not exhausted and free > 0 and (free >= refill or not engine.has_unfinished()):
                batch, exhausted = _take(source, free, on_done, stats)
                if batch:
                    embeds = self.encode(np.stack([it.pixels for it in batch]), stats)
                    for item, emb in zip(batch, embeds, strict=True):
                        rid = engine.add_request(ids, params, stream=False,
                                                 prompt_embeds=PromptEmbeds(positions, emb))
                        keys[rid] = item.key
            if engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        stats.images += 1
                        stats.generated_tokens += len(out.outputs[0].token_ids)
                        on_done(keys.pop(out.request_id), out, None)
            elif exhausted:
                break
        self._sync()
        stats.wall_s = time.perf_counter() - start
        return stats


def _take(source, n: int, on_done, stats: VLMStats) -> tuple[list[ImageItem], bool]:
    """Up to n items with pixels from source (items with an error are reported on the way); and whether the
    source is exhausted."""
    batch = []
    while len(batch) < n:
        item = next(source, None)
        if item is None:
            return batch, True
        if item.error is not None or item.pixels is None:
            stats.errors += 1
            on_done(item.key, None, item.error or "no image")
            continue
        batch.append(item)
    return batch, False


def build_vlm_engine(loaded: LoadedVLM, config: EngineConfig | None = None, vision_mode: str = "f16",
                     **overrides) -> VLMEngine:
    """The engine of a loaded VILA1.5 checkpoint on config.device (numpy on the CPU, CuPy on the GPU; the
    vision weights are uploaded before the runner sizes its KV pool from the memory left)."""
    config = (config or EngineConfig(device="auto")).replace(**overrides)
    config = config.replace(device=resolve_device(config.device))
    xp = device_array_module(config.device)
    weights = VisionWeights.from_tensors(loaded.config, loaded.tensor, xp, vision_mode)
    engine = LLMEngine(loaded.llm, config)
    return VLMEngine(engine, VisionEncoder(weights, xp), loaded.name)


def build_random_vlm_engine(shape: str, precision: str | Precision = "w4a8kv4", group_size: int = 128, *,
                            config: EngineConfig | None = None, vision_mode: str = "f16", tokenizer=None,
                            seed: int = 0) -> VLMEngine:
    """Random weights of a VILA1.5 shape (shipped name or VILA config.json) at `precision` for the LLM and
    vision_mode ('f16' / 'w8') for the vision side, on config.device (the CPU: tiny shapes only). Without a
    tokenizer, prompts are token ids (engine/vlm_prompt.synthetic_image_prompt)."""
    config = config or EngineConfig(device="auto")
    precision = precision if isinstance(precision, Precision) else Precision.parse(precision)
    vcfg, llm_cfg, label = load_vlm_shape(shape)
    xp = device_array_module(config.device)
    if xp is np and llm_cfg.num_parameters() > CPU_MAX_PARAMETERS:
        raise QServeLiteError(f"{label} has {llm_cfg.num_parameters() / 1e9:.1f}B LLM parameters; the CPU "
                              "path is for tiny test shapes. Use --device gpu")
    check_weights_fit(llm_cfg, precision, group_size, xp, name=f"{label} {precision.name}")
    weights = build_random_weights(llm_cfg, precision, group_size, xp=xp, seed=seed)
    vision = build_random_vision(vcfg, vision_mode, xp=xp, seed=seed + 1)
    limit = config.max_model_len or llm_cfg.max_position_embeddings
    runner_config = config.replace(max_model_len=limit,
                                   max_num_batched_tokens=config.batched_tokens_for(limit))
    if xp is np and config.num_pages is None:
        layout = KVPageLayout(precision.kv_bits, llm_cfg.num_kv_heads, llm_cfg.head_dim)
        runner_config = runner_config.replace(num_pages=pages_that_fit(
            llm_cfg.num_layers * 2 * layout.page_bytes, config.max_num_seqs, limit))
    runner = GPUModelRunner(weights, runner_config, xp=xp)
    engine = LLMEngine(None, config.replace(num_pages=None), runner=runner, tokenizer=tokenizer)
    return VLMEngine(engine, VisionEncoder(vision, xp), f"random-{label}")
