"""Quantize a Llama-3-8B-shaped model end to end with the defaults (issue 20, item 4).

1. Writes a model of random fp16 weights (std 0.02, norms ones) as sharded Hugging Face safetensors
   (config.json, model-*-of-*.safetensors + index, a byte-level tokenizer) under DIR/model (kept and
   reused by later runs; --rewrite makes it again).
2. Runs `qserve-lite quantize --model DIR/model --out DIR/q-g128` with the defaults, then with
   --group-size -1 (per-channel), each in its own process: the CLI's own code path, with the stage times,
   per-layer times, the cupy memory pool's peak and the process's peak RSS (os.wait4) recorded.
3. Loads each checkpoint with `qserve-lite generate` (16 tokens) on the same device.

Prints and appends one JSON line per precision to benchmarks/results/<date>-<machine>-quantize_scale.jsonl.

    PYTHONPATH=$PWD python benchmarks/quantize_scale.py --dir /tmp/scale            # 8B shape, GPU
    PYTHONPATH=$PWD python benchmarks/quantize_scale.py --dir /tmp/scale --tiny     # tiny, CPU test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 2048}
SHARD_BYTES = 4 * 1024**3


def _config(tiny: bool, layers: int | None = None) -> dict:
    cfg = json.loads((ROOT / "qserve_lite" / "io" / "configs" / "llama-3-8b.json").read_text())
    if tiny:
        cfg.update(TINY)
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg.update(bos_token_id=256, eos_token_id=257, torch_dtype="float16")
    return cfg


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE without merges: 256 byte tokens, <s> (256), </s> (257), and reserved tokens up to the
    model's vocabulary, so that every id the random model samples decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    vocab.update({f"<|reserved_{i}|>": i for i in range(258, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": True}))


def _tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                   (f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                   (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, q)),
                   (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                   (f"{p}.mlp.down_proj.weight", (h, inter))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _random_fp16(rng, shape, use_gpu: bool) -> np.ndarray:
    """N(0, 0.02^2) fp16 weights: drawn on the GPU when there is one (8B in seconds, not minutes)."""
    if use_gpu:
        from qserve_lite.core.backend import import_cupy

        cp = import_cupy()
        seed = int(rng.integers(0, 2**31))
        a = cp.random.RandomState(seed).standard_normal(shape, dtype=cp.float32)
        a *= 0.02
        return a.astype(cp.float16).get()
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def write_model(out: Path, tiny: bool, seed: int = 0, layers: int | None = None,
                use_gpu: bool = False) -> float:
    """Random fp16 weights as sharded safetensors; returns the seconds it took."""
    from safetensors.numpy import save_file

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(tiny, layers)
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    max_bytes = 64 * 1024**2 if tiny else SHARD_BYTES  # the tiny model is sharded too
    names = []
    for name, shape in _tensor_shapes(cfg):
        if len(shape) == 1:
            arr = np.ones(shape, np.float16)
        else:
            arr = _random_fp16(rng, shape, use_gpu)
        if shards[-1] and size + arr.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        names.append(name)
    if tiny and len(shards) == 1:  # split in two so that the sharded reader is exercised
        items = list(shards[0].items())
        shards = [dict(items[: len(items) // 2]), dict(items[len(items) // 2:])]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(a.nbytes for a in shard.values())
    shards.clear()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out, cfg["vocab_size"])
    return time.perf_counter() - t0


CHILD = """
import json, sys
from qserve_lite import cli
real = cli.quantize_model
def capture(*a, **k):
    report = real(*a, **k)
    rec = {"seconds": report.seconds, "stages": report.stages, "calib_source": report.calib_source,
           "calib_tokens": report.calib_tokens, "gpu_pool_peak_gb": report.gpu_pool_peak_gb,
           "layer_seconds": [info.get("seconds") for info in report.layers], "layer_stage_seconds": {}}
    for info in report.layers:
        for stage, sec in (info.get("stage_seconds") or {}).items():
            rec["layer_stage_seconds"][stage] = round(rec["layer_stage_seconds"].get(stage, 0) + sec, 2)
    open(sys.argv[1], "w").write(json.dumps(rec))
    return report
cli.quantize_model = capture
sys.exit(cli.main(sys.argv[2:]))
"""


def run_child(argv: list[str]) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in GB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024**2


def quantize(model: Path, out: Path, group_size: int, device: str, extra: list[str]) -> dict:
    report = out.parent / f"{out.name}.report.json"
    argv = [sys.executable, "-c", CHILD, str(report), "quantize", "--model", str(model), "--out", str(out),
            "--overwrite", "--group-size", str(group_size), "--device", device, *extra]
    rc, wall, rss = run_child(argv)
    rec = {"group_size": group_size, "quantize_rc": rc, "quantize_wall_s": round(wall, 1),
           "quantize_peak_rss_gb": round(rss, 2)}
    if rc == 0:
        rec.update(json.loads(report.read_text()))
    return rec


def generate(out: Path, device: str) -> dict:
    argv = [sys.executable, "-m", "qserve_lite.cli", "generate", "--model", str(out), "--prompt",
            "The capital of France is", "--max-tokens", "16", "--ignore-eos", "--device", device]
    rc, wall, rss = run_child(argv)
    return {"generate_rc": rc, "generate_wall_s": round(wall, 1)}


def _machine(device: str) -> str:
    if device != "cpu":
        try:
            from qserve_lite.core.backend import import_cupy

            cp = import_cupy()
            return cp.cuda.runtime.getDeviceProperties(0)["name"].decode().lower().replace(" ", "-")
        except Exception:  # noqa: BLE001 - no GPU: say cpu
            pass
    return "cpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the model and the checkpoints go")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (CPU test)")
    ap.add_argument("--rewrite", action="store_true", help="write the random model again")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the shape's own; fewer for a quick per-layer sizing run)")
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[128, -1])
    ap.add_argument("--quantize-args", nargs=argparse.REMAINDER, default=[],
                    help="more `quantize` arguments (e.g. --calib-tokens 4096 for a quick run)")
    args = ap.parse_args()
    suffix = f"-{args.layers}l" if args.layers else ""
    model = args.dir / (("model-tiny" if args.tiny else "model") + suffix)
    from qserve_lite.bench.results import git_sha
    from qserve_lite.core.backend import resolve_device
    from qserve_lite.kernels.gptq import gptq_kernel_enabled

    device = resolve_device(args.device)
    write_s = None
    if args.rewrite or not (model / "model.safetensors.index.json").is_file():
        write_s = round(write_model(model, args.tiny, layers=args.layers, use_gpu=device == "gpu"), 1)
    machine = _machine(device)
    results = []
    shape = ("tiny" if args.tiny else "llama-3-8b") + (f"-{args.layers}-layers" if args.layers else "")
    today = datetime.date.today().isoformat()
    path = ROOT / "benchmarks" / "results" / f"{today}-{machine}-quantize_scale.jsonl"

    def record(rec: dict) -> None:  # each line as soon as it is known: a run cut short keeps what it measured
        print(json.dumps(rec), flush=True)
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    for g in args.group_sizes:
        out = args.dir / f"q-{'tiny-' if args.tiny else ''}{'g128' if g == 128 else 'per-channel'}"
        base = {"date": today, "machine": machine, "host": platform.node(), "git_sha": git_sha(ROOT),
                "gptq_kernel": gptq_kernel_enabled(), "shape": shape, "device": device, "group_size": g}
        rec = base | {"write_model_s": write_s, **quantize(model, out, g, device, args.quantize_args)}
        record(rec)
        if rec["quantize_rc"] == 0:
            gen = base | {"stage": "generate", **generate(out, device)}
            record(gen)
            rec.update(gen)
        results.append(rec)
        write_s = None
    print(f"appended to {path}", file=sys.stderr)
    return 0 if all(r["quantize_rc"] == 0 and r.get("generate_rc") == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
