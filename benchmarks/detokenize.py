"""Host cost of incremental detokenization: the engine gives every running sequence its new text each step.

Decodes --batch sequences of --tokens ids (slices of real text, tokenized by the model's tokenizer) token by
token with IncrementalDetokenizer, checks that the pieces join to the full decode, and prints tokens/s and the
host milliseconds one decode step of that batch spends on it. Appends a JSON line to
benchmarks/results/<date>-cpu-detokenize.jsonl.

    python benchmarks/detokenize.py                       # the default model's tokenizer (fetched once)
    python benchmarks/detokenize.py --model DIR --batch 64 --tokens 2048
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qserve_lite.bench.results import append_jsonl, git_sha, results_file, today  # noqa: E402
from qserve_lite.model.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory (default: the embedded default model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--text", default=str(ROOT / "tests" / "data" / "python_doc_sample.rst.txt"))
    args = ap.parse_args()
    if args.model is None:
        from qserve_lite.io.default_models import DEFAULT_MODEL, ensure_default_model

        model = ensure_default_model(DEFAULT_MODEL)
    else:
        model = Path(args.model)
    tok = Tokenizer(model)
    ids = tok.encode(Path(args.text).read_text())
    while len(ids) < 2 * args.tokens:
        ids = ids + ids
    rng = np.random.default_rng(0)
    seqs = [ids[s:s + args.tokens] for s in rng.integers(0, len(ids) - args.tokens, args.batch)]
    t0 = time.perf_counter()
    joined = []
    for s in seqs:
        d = IncrementalDetokenizer(tok)
        joined.append("".join(d.add(t) for t in s))
    seconds = time.perf_counter() - t0
    exact = all(j == tok.decode(s) for j, s in zip(joined, seqs, strict=True))
    row = {"date": today(), "machine": "cpu", "host_cpu": platform.processor() or platform.machine(),
           "git_sha": git_sha(ROOT), "model": model.name, "batch": args.batch, "tokens": args.tokens,
           "seconds": round(seconds, 3), "tok_s": round(args.batch * args.tokens / seconds),
           "ms_per_batch_step": round(seconds / args.tokens * 1e3, 3), "joined_equals_full_decode": exact}
    print(f"{args.batch} sequences x {args.tokens} tokens: {row['tok_s']:,} tokens/s, "
          f"{row['ms_per_batch_step']} ms of host time per decode step of the batch; pieces join to the full "
          f"decode: {exact}")
    append_jsonl(results_file("detokenize", "cpu", results_dir=ROOT / "benchmarks" / "results"), [row])
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
