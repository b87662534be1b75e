"""Throughput of the CuPy engine (eager, or --graphs: decode as CUDA graphs) on a random W4A8 g128 KV4
model of a chosen shape.

Random integer weights are drawn directly in the kernels' range (no quantization pass), saved as a QServe
checkpoint with the tiny test tokenizer (vocab 320: the lm_head is small, the decoder layers are real-sized),
then `LLM(device="gpu").generate` runs N prompts of P tokens for G greedy tokens each, once to warm up
(kernel compilation) and once timed. Prints a table and appends a JSON line to benchmarks/results/.

    python benchmarks/gpu_engine_tok_s.py --layers 8 --prompts 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qserve_lite.bench.results import git_sha  # noqa: E402  (the checkout's commit, +dirty)

sys.path.insert(0, str(ROOT / "tests"))


def random_w4_group(rng, n: int, k: int):
    from qserve_lite.core.formats import W4Group

    groups = k // 128
    s2 = rng.integers(8, 16, size=(n, groups)).astype(np.uint8)  # codes * s2 <= 225, z = 8 s2 <= 120
    zeros = 8 * s2.astype(np.int16)  # u8 = (code - 8) * s2 in [-120, 105]
    codes = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    s1 = (rng.uniform(0.5, 1.5, size=n) / (16 * 8 * np.sqrt(k))).astype(np.float16)
    return W4Group(codes, s1, s2, zeros, 128, k)


def build(out: Path, hidden: int, inter: int, heads: int, kv_heads: int, layers: int, seed: int = 0) -> Path:
    from conftest import build_tokenizer, tiny_config

    from qserve_lite.io.checkpoint import save_quantized
    from qserve_lite.model.linear import Linear
    from qserve_lite.model.quant_linear import W4A8Linear
    from qserve_lite.model.weights import LayerWeights, LlamaWeights

    rng = np.random.default_rng(seed)
    cfg = tiny_config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=128, num_hidden_layers=layers, vocab_size=320,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    q, kv = heads * 128, kv_heads * 128
    ones = np.ones(hidden, np.float32)

    def lin(n, k):
        return W4A8Linear(random_w4_group(rng, n, k))

    lw = [LayerWeights(ones, lin(q, hidden), lin(kv, hidden), lin(kv, hidden), lin(hidden, q), ones,
                       lin(inter, hidden), lin(inter, hidden), lin(hidden, inter)) for _ in range(layers)]
    embed = (0.5 * rng.standard_normal((320, hidden))).astype(np.float32)
    head = Linear((4 * rng.standard_normal((320, hidden)) / np.sqrt(hidden)).astype(np.float32))
    weights = LlamaWeights(embed, lw, ones, head)
    tok_dir = out.parent / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(tok_dir)
    qc = {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": 128, "kv_bit": 4}
    return save_quantized(out, cfg, weights, qc, tok_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--graphs", action="store_true", help="decode steps as CUDA graphs")
    args = ap.parse_args()

    import os

    import cupy as cp

    from qserve_lite.llm import LLM
    from qserve_lite.sampling_params import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build(Path(tmp) / "ckpt", args.hidden, args.inter, args.heads, args.kv_heads, args.layers)
        t_build = time.perf_counter() - t0
        os.environ["QSERVE_LITE_CUDA_GRAPHS"] = "1" if args.graphs else "0"
        llm = LLM(str(path), device="gpu", max_num_seqs=max(args.prompts, 1))
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, 320, size=args.prompt_len).tolist() for _ in range(args.prompts)]
        params = SamplingParams(max_tokens=args.gen, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True),
                     use_tqdm=False)  # compile the kernels (and capture the batch's graph)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        cp.cuda.Device().synchronize()
        dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    gpu = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    row = {
        "date": datetime.date.today().isoformat(), "gpu": gpu,
        "git_sha": git_sha(ROOT),
        "workload": {"model": f"random w4a8kv4 g128 h{args.hidden} i{args.inter} {args.layers}L "
                              f"{args.heads}x128/{args.kv_heads}kv vocab320", "prompts": args.prompts,
                     "prompt_len": args.prompt_len, "gen": args.gen, "graphs": args.graphs},
        "seconds": round(dt, 3), "output_tok_s": round(n_out / dt, 1),
        "total_tok_s": round((n_out + args.prompts * args.prompt_len) / dt, 1),
        "build_s": round(t_build, 1), "kv_pages": llm.engine.runner.num_pages,
    }
    print(f"{'gpu':<24}{'prompts':>8}{'out tok':>9}{'s':>8}{'out tok/s':>11}{'all tok/s':>11}")
    label = gpu + (" graphs" if args.graphs else "")
    print(f"{label:<24}{args.prompts:>8}{n_out:>9}{dt:>8.2f}{row['output_tok_s']:>11}{row['total_tok_s']:>11}")
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    gpu_slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
    with open(res / f"{row['date']}-{gpu_slug}-gpu_engine_tok_s.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
