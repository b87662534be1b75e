"""qserve-lite bench --vlm: image-captioning throughput of a VILA1.5 shape on random weights, at QServe's
caption setting (one image per request, 300 new tokens, in-flight batching over a stream of images).

    qserve-lite bench --vlm                                   # vila1.5-13b, w4a8kv4, batch 64
    qserve-lite bench --vlm vila1.5-13b --precision w8a8kv8 --batch 128 --num-requests 512

The model: a shipped VILA1.5 shape (io/configs/vlm: vila1.5-3b, vila1.5-8b, vila1.5-13b) or a VILA
config.json; the LLM at --precision (random device weights, model/random_weights.py), the vision tower
and projector at --vision-precision (fp16 GEMMs or W8A8; model/random_vision.py).

Workload: --num-requests images (default 4 x batch) of synthetic pixels (no decoding: a pool of 16
random images, cycled); each request is --text-tokens random prompt ids around the image's
tokens_per_image (196) embeddings and generates exactly --gen tokens (default 300; EOS ignored; greedy).
The engine runs up to --batch requests at once and tops the batch up with newly encoded images as
requests finish (engine/vlm_engine.VLMEngine.generate, as `qserve-lite caption` does). A warm-up first
compiles the kernels and captures the decode graphs of every batch bucket up to --batch.

Reported: images/s and generated tok/s over the wall time from the first image to the last token (vision
encoding, prefill and decode included) and the vision encoder's share. One JSON line per batch size is
appended to benchmarks/results/<date>-<gpu>-vlm.jsonl (or --json-out); benchmarks/peer_hf_vlm.py appends
the Hugging Face peer's lines (peer_images_per_s) to the same file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from qserve_lite.bench.measure import memory_gib, release
from qserve_lite.bench.results import append_jsonl, device_name, format_table, git_sha, results_file, today
from qserve_lite.core.precision import Precision
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.vlm_engine import ImageItem, VLMEngine, build_random_vlm_engine
from qserve_lite.engine.vlm_prompt import synthetic_image_prompt
from qserve_lite.errors import QServeLiteError
from qserve_lite.sampling_params import SamplingParams

DEFAULT_SHAPE = "vila1.5-13b"
CAPTION_GEN = 300  # QServe's caption script: --max-new-tokens 300
TEXT_TOKENS = 48  # about the vicuna_v1 caption prompt's text tokens with a Llama tokenizer
IMAGE_POOL = 16
TABLE = [("model", "model"), ("precision", "precision"), ("vision", "vision_precision"), ("batch", "batch"),
         ("images", "num_images"), ("gen", "gen_len"), ("wall s", "wall_s"), ("vision s", "vision_s"),
         ("images/s", "images_per_s"), ("tok/s", "tok_s"), ("GiB used", "gpu_mem_used_gib")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags bench --vlm adds to `qserve-lite bench` (the others: --precision, --batch, --gen, ...)."""
    p.add_argument("--vlm", nargs="?", const=DEFAULT_SHAPE, default=None, metavar="SHAPE",
                   help=f"image captioning throughput of a VILA1.5 shape (vila1.5-3b, vila1.5-8b, "
                   f"vila1.5-13b, or a VILA config.json; default {DEFAULT_SHAPE}) instead of --model")
    p.add_argument("--vision-precision", choices=("w16a16", "w8a8"), default="w16a16",
                   help="--vlm: the vision tower and projector (fp16 GEMMs, default, or W8A8)")
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS,
                   help=f"--vlm: prompt tokens besides the image's (default {TEXT_TOKENS})")


def images(vlm: VLMEngine, n: int, seed: int):
    """n synthetic ImageItems cycling over IMAGE_POOL random preprocessed images."""
    v = vlm.config.vision
    rng = np.random.default_rng(seed)
    pool = [rng.uniform(-1, 1, (v.num_channels, v.image_size, v.image_size)).astype(np.float32)
            for _ in range(min(n, IMAGE_POOL))]
    return [ImageItem(str(i), pool[i % len(pool)]) for i in range(n)]


def measure_vlm(vlm: VLMEngine, *, batch: int, num_images: int, gen: int, text_tokens: int,
                seed: int) -> dict:
    """The warm-up, then the timed run -> the row's workload and timing fields."""
    prompt = synthetic_image_prompt(np.random.default_rng(seed), vlm.engine.vocab_size, text_tokens,
                                    vlm.config.tokens_per_image)
    runner = vlm.engine.runner
    t0 = time.perf_counter()
    vlm.generate(images(vlm, batch, seed), SamplingParams(max_tokens=2, ignore_eos=True), prompt,
                 lambda *a: None)
    if hasattr(runner, "capture_decode_graphs"):
        runner.capture_decode_graphs(batch)
    warmup_s = time.perf_counter() - t0
    done = []
    stats = vlm.generate(images(vlm, num_images, seed + 1), SamplingParams(max_tokens=gen, ignore_eos=True),
                         prompt, lambda key, out, err: done.append(key))
    if len(done) != num_images or stats.errors:
        raise QServeLiteError(f"bench --vlm: {len(done)} of {num_images} images finished")
    used, total = memory_gib(vlm.xp)
    wall = stats.wall_s
    return {
        "batch": batch, "num_images": num_images, "prompt_len": len(prompt[0]), "text_tokens": text_tokens,
        "image_tokens": vlm.config.tokens_per_image, "gen_len": gen,
        "generated_tokens": stats.generated_tokens,
        "wall_s": round(wall, 3), "vision_s": round(stats.vision_s, 3),
        "images_per_s": round(num_images / wall, 3), "tok_s": round(stats.generated_tokens / wall, 1),
        "warmup_s": round(warmup_s, 2), "num_preemptions": vlm.engine.scheduler.num_preemptions,
        "gpu_mem_used_gib": used, "gpu_mem_total_gib": total,
    }


def run(args: argparse.Namespace, batches: list[int]) -> int:
    """bench --vlm for each batch size; the JSON lines go to <date>-<gpu>-vlm.jsonl."""
    precision = Precision.parse(args.precision)
    gen = args.gen if args.gen is not None else CAPTION_GEN
    if min(gen, args.text_tokens) < 1:
        raise QServeLiteError("--gen and --text-tokens must be >= 1")
    vision_mode = "f16" if args.vision_precision == "w16a16" else "w8"
    rows = []
    for batch in batches:
        n = args.num_requests or 4 * batch
        config = EngineConfig(device=args.device, max_num_seqs=batch, seed=args.seed, watermark=0.0,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              cuda_graphs=not args.no_cuda_graphs)
        t0 = time.perf_counter()
        vlm = build_random_vlm_engine(args.vlm, precision, args.group_size, config=config,
                                      vision_mode=vision_mode, seed=args.seed)
        build_s = time.perf_counter() - t0
        gpu = device_name(vlm.xp)
        print(f"{args.vlm} {precision.name} (vision {args.vision_precision}): random weights built in "
              f"{build_s:.1f}s on {gpu}; batch {batch}, {n} images, gen {gen}", file=sys.stderr, flush=True)
        row = measure_vlm(vlm, batch=batch, num_images=n, gen=gen, text_tokens=args.text_tokens,
                          seed=args.seed)
        group = args.group_size if precision.w_bits == 4 else None
        rows.append({"date": today(), "gpu": gpu, "git_sha": git_sha(), "bench": "vlm", "model": args.vlm,
                     "precision": precision.name, "group_size": group,
                     "vision_precision": args.vision_precision, "build_s": round(build_s, 2), **row})
        print(f"  batch {batch}: {row['images_per_s']:.2f} images/s, {row['tok_s']:.0f} tok/s "
              f"(vision {row['vision_s']:.1f}s of {row['wall_s']:.1f}s)", file=sys.stderr, flush=True)
        xp = vlm.xp
        del vlm
        release(xp)
    out = Path(args.json_out) if args.json_out else results_file("vlm", rows[0]["gpu"])
    append_jsonl(out, rows)
    print(format_table(rows, TABLE))
    print(f"results appended to {out}", file=sys.stderr)
    return 0
