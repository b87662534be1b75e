"""qserve-lite caption: caption every image of WebDataset shards with a VILA1.5 model, resumably, in this
process, one process per GPU (QServe's data-parallel captioning) or on a Ray cluster.

    qserve-lite caption --model VILA1.5-13b --shards /data/cc12m --out /data/captions
    qserve-lite caption --model VILA1.5-13b --llm VILA1.5-13b-w4a8 --shards /data/cc12m --out OUT \\
        --launcher local --gpus 8

The shards (io/webdataset.py: a directory's wids metadata_info.json, else its .tar files) are the units of
work of a jobs/ job, exactly as `qserve-lite batch`'s JSONL files are: the worker (caption/worker.py, one
engine per process) captions one shard at a time and writes <shard>.json (QServe's {key: {model_name:
caption}}) and its done-marker atomically; the claims, launchers, progress, summary table and manifest are
jobs/'s, as are the launch flags (jobs/flags.py).

Resume: run the same command again. Done shards are skipped; an interrupted shard skips the keys it
finished before decoding their images. Greedy decoding (the default, --temperature 0) gives the same
captions either way. Captions made with other settings under the same model name are refused (--overwrite
redoes them); another --model-name adds its captions beside them.
"""

from __future__ import annotations

import argparse
import os
import sys

from qserve_lite.caption.worker import VISION_PRECISIONS, CaptionSpec
from qserve_lite.core.vision_config import TOKEN_ORDERS
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.vlm_prompt import DEFAULT_CAPTION_PROMPT, TEMPLATES
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.vila import vila_root
from qserve_lite.io.webdataset import list_shards
from qserve_lite.jobs import flags
from qserve_lite.jobs.shards import check_variant, make_shards


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
    p.add_argument("--out", "-o", required=True, help="output directory: <shard>.json, "
                   "<shard>.<model_name>.done.json, manifest.json")
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
    flags.add_arguments(p)
    EngineConfig.add_cli_arguments(p, device="auto", max_num_seqs=256)


def spec_from_args(args: argparse.Namespace, expected: dict[str, int]) -> CaptionSpec:
    """The job of parsed flags (checked; the checkpoint is only looked at, workers load it)."""
    if args.max_new_tokens < 1:
        raise QServeLiteError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.decode_threads < 1:
        raise QServeLiteError(f"--decode-threads must be >= 1, got {args.decode_threads}")
    root = vila_root(args.model)
    what = "--model-name" if args.model_name else "the model name (the directory's; set --model-name)"
    name = check_variant(args.model_name or os.path.basename(os.path.abspath(root)), what)
    return CaptionSpec(model=args.model, model_name=name, llm=args.llm, precision=args.precision,
                       vision_precision=args.vision_precision, token_order=args.token_order,
                       template=args.template, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p,
                       engine=EngineConfig.from_cli(args, seed=args.seed), decode_threads=args.decode_threads,
                       expected=expected)


def run(args: argparse.Namespace) -> int:
    """The command: caption every shard not yet done; prints the summary table. 0 when every shard is done
    (images recorded as errors included)."""
    infos = list_shards(args.shards, args.index)
    spec = spec_from_args(args, {s.name: s.nsamples for s in infos if s.nsamples is not None})
    shards = make_shards([(s.name, s.path) for s in infos], args.out, ".json", variant=spec.model_name)
    result = flags.run_from_args(spec, shards, args, cpu=spec.engine.device == "cpu")
    print(result.table, file=sys.stderr)
    return result.exit_code
