"""End-to-end generation: many chat prompts through the in-flight batching engine, greedy, with throughput.

    python examples/e2e_generation.py                                  # examples/prompts.txt, default model
    python examples/e2e_generation.py --device gpu --num-prompts 1024 --out outputs.jsonl
    python examples/e2e_generation.py --dataset wildchat --num-prompts 500   # needs pyarrow and the hub

Each prompt becomes a one-turn conversation rendered with the model's chat template (LLM.chat); all of them
are queued at once and the engine batches them in flight (up to --max-num-seqs at a time). Decoding is
greedy and stops at the model's EOS / end-of-turn tokens or after --max-tokens. The timed run follows one
short warm-up request (GPU kernels compile on first use).
--dataset wildchat takes the first user turns of English conversations (at most 2000 characters, no
repeats) from one parquet shard of allenai/WildChat-1M on the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from qserve_lite import LLM, SamplingParams

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
WILDCHAT_REPO = "allenai/WildChat-1M"
# end-of-turn tokens of common chat templates: stop there even when a config names only <|end_of_text|>
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        sys.exit(f"error: cannot read prompts from {path}: {e.strerror}")
    if not prompts:
        sys.exit(f"error: {path} has no prompts (one per line)")
    return prompts


def wildchat_prompts(n: int, max_chars: int = 2000) -> list[str]:
    """First user turns of English WildChat-1M conversations, from the first parquet shard on the hub."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("error: --dataset wildchat needs pyarrow (pip install pyarrow)")
    try:
        from huggingface_hub import HfApi, hf_hub_download

        files = HfApi().list_repo_files(WILDCHAT_REPO, repo_type="dataset")
        shard = sorted(f for f in files if f.endswith(".parquet"))[0]
        path = hf_hub_download(WILDCHAT_REPO, shard, repo_type="dataset")
    except Exception as e:  # noqa: BLE001 - offline, gated, renamed: one clear line whatever the cause
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        sys.exit(f"error: cannot fetch {WILDCHAT_REPO} from the Hugging Face hub ({reason})")
    prompts: dict[str, None] = {}  # ordered, without repeats
    for batch in pq.ParquetFile(path).iter_batches(columns=["conversation", "language"], batch_size=1024):
        columns = batch.column("conversation").to_pylist(), batch.column("language").to_pylist()
        for conv, lang in zip(*columns, strict=True):
            first = conv[0] if conv else {}
            text = (first.get("content") or "").strip()
            if lang == "English" and first.get("role") == "user" and 0 < len(text) <= max_chars:
                prompts[text] = None
                if len(prompts) == n:
                    return list(prompts)
    return list(prompts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="alias, model directory, .gguf or hub id")
    ap.add_argument("--precision", default=None, help="e.g. w4a8kv4, w8a8kv8 (default: the model's own)")
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    ap.add_argument("--prompts", type=Path, default=PROMPTS_FILE, help="one prompt per line")
    ap.add_argument("--dataset", choices=("file", "wildchat"), default="file", help="where prompts come from")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="requests (prompts cycled or cut; default: the whole file, 1000 from WildChat)")
    ap.add_argument("--max-tokens", type=int, default=256, help="most tokens generated per request")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="sequences in flight at once")
    ap.add_argument("--show", type=int, default=3, help="sample outputs to print")
    ap.add_argument("--out", type=Path, default=None, help="write every output as JSON lines here")
    args = ap.parse_args(argv)

    if args.dataset == "wildchat":
        prompts = wildchat_prompts(args.num_prompts or 1000)
    else:
        prompts = read_prompts(args.prompts)
    if args.num_prompts is not None:
        prompts = list(itertools.islice(itertools.cycle(prompts), args.num_prompts))
    conversations = [[{"role": "user", "content": p}] for p in prompts]

    llm = LLM(args.model, precision=args.precision, device=args.device, max_num_seqs=args.max_num_seqs)
    stop_ids = tuple(t for t in map(llm.tokenizer.token_to_id, END_OF_TURN) if t is not None)
    params = SamplingParams(max_tokens=args.max_tokens, stop_token_ids=stop_ids)  # temperature 0: greedy
    print(f"{args.model} on {llm.device} ({llm.precision}): {len(prompts)} requests, "
          f"max_tokens {args.max_tokens}, max_num_seqs {args.max_num_seqs}", flush=True)

    llm.chat(conversations[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params)
    wall = time.perf_counter() - t0

    n_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    n_gen = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"requests {len(outputs)}, prompt tokens {n_prompt}, generated tokens {n_gen}, wall {wall:.2f} s, "
          f"generated {n_gen / wall:.1f} tok/s, total {(n_prompt + n_gen) / wall:.1f} tok/s")
    for prompt, out in list(zip(prompts, outputs, strict=True))[: args.show]:
        print(f"\n>>> {prompt}\n{out.text.strip()}")

    if args.out is not None:
        with args.out.open("w", encoding="utf-8") as f:
            for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
                c = out.outputs[0]
                f.write(json.dumps({"index": i, "prompt": prompt, "output": c.text,
                                    "prompt_tokens": len(out.prompt_token_ids),
                                    "generated_tokens": len(c.token_ids), "finish_reason": c.finish_reason},
                                   ensure_ascii=False) + "\n")
        print(f"\nwrote {len(outputs)} outputs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
