"""The Hugging Face transformers peer on the QServe throughput workload: bf16, sdpa attention, `generate`.

    python benchmarks/peer_hf.py --model llama-3-8b --batch 64 128 256
    python benchmarks/peer_hf.py --model path/to/config.json --batch 16 --prompt-len 1024 --gen 512

The model is built with random weights from a Hugging Face config.json (--model NAME reads our shipped
qserve_lite/io/configs/NAME.json; a path to a config.json or to a directory holding one also works)
directly on the GPU in bf16. Per batch size B: B random prompts of --prompt-len tokens, one batched
`generate(max_new_tokens=G, min_new_tokens=G, do_sample=False)` (so EOS never ends a sequence early);
throughput = B x G / wall time of the whole call (prefill included). One small warm-up call runs first.
A batch size that runs out of GPU memory is reported as "oom" and the next one is tried.
Results: a table on stdout and JSON lines appended to benchmarks/results/<date>-<gpu>-peer_hf.jsonl.

torch and transformers are imported only when the benchmark runs (the package itself never needs them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qserve_lite.bench.results import git_sha  # noqa: E402  (the checkout's commit, +dirty)


def resolve_config(model: str) -> Path:
    """--model -> a config.json: a shipped config name, a file path, or a directory holding config.json
    (io/shipped_configs.resolve_config_path, as the CLI resolves it)."""
    from qserve_lite.errors import QServeLiteError
    from qserve_lite.io.shipped_configs import resolve_config_path

    try:
        return resolve_config_path(model)
    except QServeLiteError as e:
        raise SystemExit(f"error: --model: {e}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="shipped config name, or a path to a config.json")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256], help="batch sizes to run")
    ap.add_argument("--prompt-len", type=int, default=1024, help="random prompt tokens per sequence")
    ap.add_argument("--gen", type=int, default=512, help="tokens generated per sequence")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or args.prompt_len < 1 or args.gen < 1:
        ap.error("--batch, --prompt-len and --gen must be >= 1")
    args.config = resolve_config(args.model)
    # the name in the table and the results: the shipped name, or the folder of a config.json
    args.name = args.config.parent.name if args.config.name == "config.json" else args.config.stem
    return args


def load_hf_config(path: Path):
    """The transformers config of a config.json, without any quantization (the peer runs bf16)."""
    from transformers import AutoConfig

    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    return AutoConfig.for_model(cfg.pop("model_type", "llama"), **cfg)


def run_generate(model, batch: int, prompt_len: int, gen: int, seed: int) -> dict:
    """One batched generate of `gen` tokens after `prompt_len` random ones; wall time and peak memory."""
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, prompt_len), device="cuda", generator=g)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) and eos else eos
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else eos if isinstance(eos, int) else 0  # only to silence a warning
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=gen,
                         min_new_tokens=gen, do_sample=False, pad_token_id=pad)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert out.shape == (batch, prompt_len + gen), out.shape
    return {"wall_s": round(wall, 3), "tok_s": round(batch * gen / wall, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
        import transformers
        from packaging.version import Version  # a transformers dependency
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        sys.exit(f"error: the transformers peer needs torch and transformers ({e})")
    if not torch.cuda.is_available():
        sys.exit("error: the transformers peer needs a CUDA GPU (torch.cuda.is_available() is False)")

    cfg = load_hf_config(args.config)
    new_api = Version(transformers.__version__) >= Version("4.56")  # `torch_dtype` is `dtype` from 4.56 on
    dtype = {"dtype" if new_api else "torch_dtype": torch.bfloat16}
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=args.attn, **dtype)
    model.eval()
    t_build = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(0)
    date, sha = dt.date.today().isoformat(), git_sha(ROOT)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.name} ({n_params / 1e9:.2f} B params, bf16, {args.attn}) built in {t_build:.1f} s "
          f"on {gpu}; prompt {args.prompt_len}, gen {args.gen}; transformers {transformers.__version__}, "
          f"torch {torch.__version__}, git {sha}", flush=True)

    run_generate(model, 2, min(args.prompt_len, 128), 8, args.seed)  # warm-up: kernels, allocator

    common = dict(date=date, gpu=gpu, git_sha=sha, bench="peer_hf", peer="transformers", model=args.name,
                  config=str(args.config), dtype="bf16", attn=args.attn, prompt_len=args.prompt_len,
                  gen=args.gen, transformers=transformers.__version__, torch=torch.__version__)
    rows = []
    for batch in args.batch:
        try:
            result = {"status": "ok", **run_generate(model, batch, args.prompt_len, args.gen, args.seed)}
        except torch.cuda.OutOfMemoryError:
            result = {"status": "oom", "wall_s": None, "tok_s": None,
                      "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        gc.collect()  # outside the except block: the traceback's tensors are gone by now
        torch.cuda.empty_cache()
        rows.append((batch, result))
        said = f"{result['tok_s']:.1f} tok/s" if result["status"] == "ok" else "out of GPU memory"
        print(f"  batch {batch}: {said}", flush=True)
        if not args.no_save:
            args.out.mkdir(parents=True, exist_ok=True)
            slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
            with (args.out / f"{date}-{slug}-peer_hf.jsonl").open("a") as f:
                f.write(json.dumps({**common, "batch": batch, **result}) + "\n")

    print(f"\n{'gpu':<26}{'model':<18}{'batch':>6}{'gen tok/s':>11}{'wall s':>9}{'peak GiB':>10}")
    for batch, r in rows:
        ok = r["status"] == "ok"
        print(f"{gpu:<26}{args.name:<18}{batch:>6}{r['tok_s'] if ok else 'oom':>11}"
              f"{r['wall_s'] if ok else '-':>9}{r['peak_mem_gib']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
