"""`qserve-lite batch`: JSONL prompts in, JSONL completions out, one result file per input shard; resumable,
on one process, one process per GPU, or a Ray cluster.

    qserve-lite batch --input prompts/ --out results/ --max-tokens 256                    # this process
    qserve-lite batch --input prompts/ --out results/ --launcher local --gpus 8           # one per GPU
    qserve-lite batch --input prompts/ --out results/ --launcher ray                      # Ray Data

Rows: batch/rows.py. The worker: batch/worker.py. Shards, resume, locks, manifest and the launch flags:
jobs/. The sampling and engine flags are generate's (the CLI adds them); the others are the job's own.
"""

from __future__ import annotations

import argparse
import sys

from qserve_lite.batch.rows import SAMPLING_KEYS
from qserve_lite.batch.worker import BatchSpec
from qserve_lite.engine.config import EngineConfig
from qserve_lite.errors import QServeLiteError
from qserve_lite.jobs import flags
from qserve_lite.jobs.shards import list_shards
from qserve_lite.sampling_params import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The job's own flags (the CLI adds --model, the sampling and the engine flags)."""
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                   help="input shards: JSONL files, or directories of *.jsonl files (one result per file)")
    p.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="output directory: NAME.jsonl per input shard, NAME.done.json markers, manifest.json")
    p.add_argument("--chat", action="store_true",
                   help="wrap text prompts in the model's chat template (rows with 'messages' always are)")
    flags.add_arguments(p)
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="requests in the engine at once per worker (default 2 x --max-num-seqs)")
    p.add_argument("--random-weights", default=None, metavar="SHAPE",
                   help="RANDOM weights of a shipped shape (llama-3-8b, ...) or a config.json, for "
                   "benchmarks; prompts are token ids unless --tokenizer is given")
    p.add_argument("--tokenizer", default=None, metavar="DIR_OR_MODEL",
                   help="with --random-weights: the tokenizer (default: none, token-id prompts only)")
    p.add_argument("--group-size", type=int, choices=(128, -1), default=128,
                   help="with --random-weights at W4: 128 (default) or -1 (per-channel)")


def sampling_defaults(params: SamplingParams) -> dict:
    """The run's default SamplingParams fields for every row. No seed: each row gets its own, derived from
    the run's --seed and its id (batch/rows.py)."""
    values = {k: getattr(params, k) for k in SAMPLING_KEYS}
    values["seed"] = None
    values["stop"], values["stop_token_ids"] = list(values["stop"]), list(values["stop_token_ids"])
    return values


def run(args: argparse.Namespace, params: SamplingParams) -> int:
    """Run the job of parsed flags; 0 when every shard is done (rows recorded as errors included)."""
    if args.window is not None and args.window < 1:
        raise QServeLiteError(f"--window must be >= 1, got {args.window}")
    if args.random_weights is None and args.tokenizer is not None:
        raise QServeLiteError("--tokenizer goes with --random-weights")
    spec = BatchSpec(model=args.model, precision=args.precision, engine=EngineConfig.from_cli(args),
                     random_weights=args.random_weights, tokenizer=args.tokenizer, group_size=args.group_size,
                     sampling=sampling_defaults(params), chat=args.chat, system=args.system,
                     window=args.window)
    shards = list_shards(args.input, args.out, ".jsonl")
    result = flags.run_from_args(spec, shards, args, cpu=spec.engine.device == "cpu")
    print(result.table, file=sys.stderr)
    return result.exit_code
