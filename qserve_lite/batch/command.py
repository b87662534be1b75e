"""`qserve-lite batch`: JSONL prompts in, JSONL completions out, one result file per input shard; resumable,
on one process, one process per GPU, or a Ray cluster.

    qserve-lite batch --input prompts/ --out results/ --max-tokens 256                    # this process
    qserve-lite batch --input prompts/ --out results/ --launcher local --gpus 8           # one per GPU
    qserve-lite batch --input prompts/ --out results/ --launcher ray                      # Ray Data

Rows: batch/rows.py. The worker: batch/worker.py. Shards, resume, locks, manifest: jobs/. The sampling and
engine flags are generate's (the CLI adds them); these are the job's own.
"""

from __future__ import annotations

import argparse
import sys

from qserve_lite.batch.rows import SAMPLING_KEYS
from qserve_lite.batch.worker import BatchSpec
from qserve_lite.engine.config import EngineConfig
from qserve_lite.errors import QServeLiteError
from qserve_lite.jobs.job import LAUNCHERS, run_job
from qserve_lite.jobs.locks import DEFAULT_TTL_S
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
    p.add_argument("--launcher", choices=LAUNCHERS, default="inline",
                   help="inline: this process (default); local: one spawned process per GPU (--gpus); ray: "
                   "a Ray Data actor pool, one actor per GPU (pip install 'qserve-lite[ray]')")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="local: processes, one per GPU (default 1); ray: actors (default: every GPU of the "
                   "cluster)")
    p.add_argument("--lock-ttl", type=float, default=DEFAULT_TTL_S, metavar="S",
                   help=f"a shard claim whose worker stopped its heartbeat for S seconds is taken over "
                   f"(default {DEFAULT_TTL_S:.0f}; a dead process on the same host: at once)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts of a worker process (local) or actor (ray) that died (default 3)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo shards whose results in --out were made with other settings (default: refuse)")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="requests in the engine at once per worker (default 2 x --max-num-seqs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the summary is printed)")
    p.add_argument("--ray-address", default=None,
                   help="ray: the cluster to join (default: $RAY_ADDRESS, a local `ray start`, or a new one)")
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
    if args.gpus is not None and args.gpus < 1:
        raise QServeLiteError(f"--gpus must be >= 1, got {args.gpus}")
    if args.window is not None and args.window < 1:
        raise QServeLiteError(f"--window must be >= 1, got {args.window}")
    if args.random_weights is None and args.tokenizer is not None:
        raise QServeLiteError("--tokenizer goes with --random-weights")
    spec = BatchSpec(model=args.model, precision=args.precision, engine=EngineConfig.from_cli(args),
                     random_weights=args.random_weights, tokenizer=args.tokenizer, group_size=args.group_size,
                     sampling=sampling_defaults(params), chat=args.chat, system=args.system,
                     window=args.window)
    shards = list_shards(args.input, args.out, ".jsonl")
    result = run_job(spec, shards, launcher=args.launcher, gpus=args.gpus, lock_ttl=args.lock_ttl,
                     max_restarts=args.max_restarts, overwrite=args.overwrite, progress=not args.no_progress,
                     ray_gpus_per_worker=0.0 if spec.engine.device == "cpu" else 1.0,
                     ray_address=args.ray_address)
    print(result.table, file=sys.stderr)
    return result.exit_code
