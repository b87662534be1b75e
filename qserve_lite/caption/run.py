"""qserve-lite caption: caption every image of WebDataset shards with a VILA1.5 model, resumably.

    qserve-lite caption --model VILA1.5-13b --shards /data/cc12m --out /data/captions
    qserve-lite caption --model VILA1.5-13b --llm VILA1.5-13b-w4a8 --shards /data/cc12m --out OUT

Per shard (io/webdataset.py reads it, stdlib tarfile, streamed): each sample's image member (jpg, jpeg or png,
in that order) is decoded and preprocessed in a thread pool ahead of the engine (io/images.py: Pillow, or the
stdlib PNG decoder without it); the engine keeps up to --max-num-seqs captions in flight and tops its batch up
with the next images as captions finish, across the whole shard (engine/vlm_engine.VLMEngine.generate).
Every finished key goes to the shard's partial log at once; at the end of the shard <shard>.json and the
done-marker are written atomically (caption/shards.py has the contract). A sample without an image, or
with one that cannot be decoded, is recorded as {"error": ...} and the run goes on; so is a truncated shard
(the samples before the damage are kept, the marker says what happened).

Resume: run the same command again. Done shards are skipped; an interrupted shard skips its finished keys
before decoding them. Greedy decoding (the default, --temperature 0) gives the same captions either way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from qserve_lite.caption.shards import ShardJob
from qserve_lite.core.vision_config import TOKEN_ORDERS, VLMConfig
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.vlm_engine import ImageItem, VLMEngine, build_vlm_engine
from qserve_lite.engine.vlm_prompt import DEFAULT_CAPTION_PROMPT, TEMPLATES
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.images import IMAGE_EXTENSIONS, ImageError, preprocess
from qserve_lite.io.vila import load_vila
from qserve_lite.io.webdataset import Sample, ShardInfo, ShardReadError, iter_samples, list_shards
from qserve_lite.sampling_params import SamplingParams

VISION_PRECISIONS = {"w16a16": "f16", "w8a8": "w8"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="a VILA1.5 checkpoint directory (config.json, llm/, "
                   "vision_tower/, mm_projector/)")
    p.add_argument("--llm", default=None,
                   help="take the LLM from this directory instead of <model>/llm (e.g. QServe's W8A8 "
                   "folder, or `qserve-lite quantize` output of <model>/llm)")
    p.add_argument("--precision", default=None,
                   help="the LLM's precision (default: its own; a float LLM runs at w16a16, w16a16kv8 or "
                   "w16a16kv4)")
    p.add_argument("--vision-precision", choices=tuple(VISION_PRECISIONS), default="w16a16",
                   help="the vision tower and projector: fp16 GEMMs (default) or W8A8")
    p.add_argument("--shards", nargs="+", required=True,
                   help="directories of .tar shards (with their metadata_info.json, if any) or .tar files")
    p.add_argument("--index", default=None, help="a wids metadata_info.json listing the shards (default: the "
                   "one in a --shards directory, if any)")
    p.add_argument("--out", "-o", required=True, help="output directory: <shard>.json, <shard>.done.json")
    p.add_argument("--prompt", default=DEFAULT_CAPTION_PROMPT, help=f"the caption prompt, with <image> "
                   f"(default: {DEFAULT_CAPTION_PROMPT!r}, QServe's)")
    p.add_argument("--template", choices=tuple(TEMPLATES), default=None,
                   help="conversation template (default: the model's: vicuna_v1, llama_3 or hermes-2)")
    p.add_argument("--model-name", default=None, help="the name captions are stored under (default: the "
                   "model directory's name, as QServe)")
    p.add_argument("--token-order", choices=TOKEN_ORDERS, default=None,
                   help="the projector's merged-token order: column (VILA1.5, default) or row (NVILA)")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens per caption (default 300)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; resumes identically)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling when --temperature > 0")
    p.add_argument("--decode-threads", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding and resizing images ahead of the engine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    EngineConfig.add_cli_arguments(p, device="auto", max_num_seqs=256)


def image_item(sample: Sample, vcfg: VLMConfig) -> ImageItem:
    """The sample's preprocessed image, or the reason it has none (ImageError / no image member)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    if ext is None:
        have = ", ".join(sorted(sample.members)) or "none"
        return ImageItem(sample.key, error=f"no image member (jpg, jpeg or png); members: {have}")
    try:
        pixels = preprocess(sample.members[ext], ext, vcfg.vision.image_size, vcfg.image_mean, vcfg.image_std)
    except ImageError as e:
        return ImageItem(sample.key, error=f"cannot decode {sample.key}.{ext}: {e}")
    return ImageItem(sample.key, pixels=pixels)


class ShardFeed:
    """The items of one shard for VLMEngine.generate: samples not yet done, decoded `ahead` at a time in the
    pool, in shard order. A read error ends the feed (after the samples before it) and is kept in `error`."""

    def __init__(self, shard: ShardInfo, skip: set[str], vcfg: VLMConfig, pool: ThreadPoolExecutor,
                 ahead: int):
        self.shard, self.skip, self.vcfg, self.pool, self.ahead = shard, set(skip), vcfg, pool, ahead
        self.error: str | None = None
        self.samples = 0  # samples read (done ones included)

    def _samples(self) -> Iterator[Sample]:
        try:
            for sample in iter_samples(self.shard.path):
                self.samples += 1
                if sample.key not in self.skip:  # finished before, or a duplicate key: never twice
                    self.skip.add(sample.key)
                    yield sample
        except ShardReadError as e:
            self.error = str(e)

    def __iter__(self) -> Iterator[ImageItem]:
        pending: deque = deque()
        for sample in self._samples():
            pending.append(self.pool.submit(image_item, sample, self.vcfg))
            if len(pending) > self.ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def caption_shard(vlm: VLMEngine, shard: ShardInfo, job: ShardJob, prompt, params: SamplingParams,
                  pool: ThreadPoolExecutor, progress=None) -> dict:
    """Caption the shard's unfinished keys, then write its outputs (caption/shards.py); returns its stats."""
    done = job.finished()
    feed = ShardFeed(shard, set(done), vlm.config, pool, ahead=2 * vlm.max_num_seqs)

    with job.log() as log:
        def on_done(key, output, error):
            log.append(key, {"error": error} if error is not None else {"text": output.outputs[0].text})
            if progress is not None:
                progress(1)

        stats = vlm.generate(feed, params, prompt, on_done)
    wall = max(stats.wall_s, 1e-9)
    result = {
        "model_name": vlm.name, "expected": shard.nsamples, "samples_read": feed.samples,
        "resumed_keys": len(done), "images": stats.images, "generated_tokens": stats.generated_tokens,
        "wall_s": round(stats.wall_s, 3), "vision_s": round(stats.vision_s, 3),
        "images_per_s": round(stats.images / wall, 3),
        "gen_tokens_per_s": round(stats.generated_tokens / wall, 2),
        "shard_error": feed.error, "max_new_tokens": params.max_tokens, "temperature": params.temperature,
    }
    if feed.error is None and shard.nsamples is not None and feed.samples != shard.nsamples:
        result["shard_error"] = f"the index says {shard.nsamples} samples, the shard holds {feed.samples}"
    job.finish(result)
    return result


class Progress:
    """A tqdm bar over images (rate in images/s, generated tok/s in the postfix), or nothing."""

    def __init__(self, total: int | None, enabled: bool):
        self.bar = None
        self.tokens = 0
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="caption", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def tokens_done(self, n: int) -> None:
        self.tokens += n
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    """The command: caption every shard not yet done; prints one summary line per shard."""
    if args.max_new_tokens < 1:
        raise QServeLiteError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.decode_threads < 1:
        raise QServeLiteError(f"--decode-threads must be >= 1, got {args.decode_threads}")
    shards = list_shards(args.shards, args.index)
    loaded = load_vila(args.model, precision=args.precision, llm=args.llm, token_order=args.token_order,
                       conv_template=args.template)
    if args.model_name:
        loaded.name = args.model_name
    todo = [s for s in shards if not ShardJob(args.out, s.name, loaded.name).is_done()]
    print(f"qserve-lite caption: {len(shards)} shard(s), {len(shards) - len(todo)} already done",
          file=sys.stderr)
    if not todo:
        return 0
    vlm = build_vlm_engine(loaded, EngineConfig.from_cli(args, seed=args.seed),
                           VISION_PRECISIONS[args.vision_precision])
    prompt = vlm.prompt_ids(args.prompt, args.template)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    known = [s.nsamples for s in todo]
    progress = Progress(sum(known) if None not in known else None, not args.no_progress)
    try:
        with ThreadPoolExecutor(args.decode_threads, thread_name_prefix="decode") as pool:
            for shard in todo:
                stats = caption_shard(vlm, shard, ShardJob(args.out, shard.name, loaded.name), prompt, params,
                                      pool, progress)
                progress.tokens_done(stats["generated_tokens"])
                note = f", {stats['shard_error']}" if stats["shard_error"] else ""
                print(f"{shard.name}: {stats['images']} captions in {stats['wall_s']:.1f}s "
                      f"({stats['images_per_s']:.2f} images/s, {stats['gen_tokens_per_s']:.0f} tok/s){note}",
                      file=sys.stderr)
    finally:
        progress.close()
    return 0
