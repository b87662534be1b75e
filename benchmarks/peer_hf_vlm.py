"""The Hugging Face transformers peer of `qserve-lite bench --vlm`: a LLaVA-style model with a SigLIP tower of
the same shapes, batched `generate`, the same images and lengths.

    python benchmarks/peer_hf_vlm.py --vlm vila1.5-13b --batch 32 64 128 --num-requests 512
    python benchmarks/peer_hf_vlm.py --vlm vila1.5-3b --batch 64 --gen 300 --text-tokens 48

The model: transformers' LlavaForConditionalGeneration built from our VILA1.5 shape
(qserve_lite/io/configs/vlm/<name>.json: the LLM's config, the SigLIP vision config) with random weights,
directly on the GPU in --dtype (fp16 by default, as QServe runs VILA), sdpa attention. Its projector is
replaced by VILA1.5's mlp_downsample (2x2 merge of the 27x27 grid, zero-padded, -> 196 tokens, LayerNorm,
Linear, GELU, Linear), the vision feature is hidden_states[-2] with every patch ("full"), so each image
enters the LLM as the same 196 tokens as in qserve-lite.

Workload (bench/vlm.py's): --num-requests images of random pixels, each prompt one random id, the 196
image tokens, then --text-tokens - 1 random ids; exactly --gen new tokens per image (min_new_tokens =
max_new_tokens, greedy). The batched pipeline QServe compares against: the images go in waves of B (one
`generate` per wave, each drained before the next). images/s = images / total wall time; tok/s likewise.
Results: a table, and JSON lines with peer_images_per_s / peer_tok_s appended to
benchmarks/results/<date>-<gpu>-vlm.jsonl (the file bench --vlm writes).

torch and transformers are imported only when the benchmark runs (the package itself never needs them).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qserve_lite.bench.results import append_jsonl, git_sha, results_file, today  # noqa: E402

VLM_CONFIGS = ROOT / "qserve_lite" / "io" / "configs" / "vlm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlm", default="vila1.5-13b", help="a shipped VILA1.5 shape or a VILA config.json")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128], help="images per generate call")
    ap.add_argument("--num-requests", type=int, default=None, help="images (default 4 x batch)")
    ap.add_argument("--gen", type=int, default=300, help="new tokens per image (default 300)")
    ap.add_argument("--text-tokens", type=int, default=48, help="prompt tokens besides the image's")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=None,
                    help="default: benchmarks/results/<date>-<gpu>-vlm.jsonl")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or args.gen < 1 or args.text_tokens < 1:
        ap.error("--batch, --gen and --text-tokens must be >= 1")
    path = Path(args.vlm).expanduser()
    if not path.is_file():
        path = VLM_CONFIGS / f"{args.vlm.lower().removesuffix('.json')}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in VLM_CONFIGS.glob("*.json")))
        ap.error(f"--vlm {args.vlm!r} is neither a VILA config.json nor a shipped shape ({names})")
    args.config = json.loads(path.read_text())
    args.name = path.stem
    return args


def build_model(cfg: dict, dtype, attn: str):
    """LlavaForConditionalGeneration of the VILA shape, random weights on the GPU, VILA1.5's projector."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    drop = ("architectures", "model_type", "torch_dtype")
    llm = {k: v for k, v in cfg["llm_cfg"].items() if not k.startswith("_") and k not in drop}
    vis = {k: v for k, v in cfg["vision_tower_cfg"].items() if not k.startswith("_") and k not in drop}
    text_config, vision_config = LlamaConfig(**llm), SiglipVisionConfig(**vis)
    vision_config.vision_use_head = False  # VILA uses hidden_states[-2]: the pooling head is never needed
    image_token = text_config.vocab_size - 1  # an ordinary id; prompts never use it otherwise
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu")

    class DownsampleProjector(nn.Module):
        """VILA1.5's mlp_downsample: 2x2 merge (VILA1.5's single-permute order), LayerNorm, MLP."""

        def __init__(self, c: int, h: int):
            super().__init__()
            self.ln, self.fc1 = nn.LayerNorm(4 * c), nn.Linear(4 * c, h)
            self.act, self.fc2 = nn.GELU(), nn.Linear(h, h)

        def forward(self, x):
            b, n, c = x.shape
            g = math.isqrt(n)
            x = x.reshape(b, g, g, c)
            if g % 2:
                x = nn.functional.pad(x, (0, 0, 0, 1, 0, 1))
                g += 1
            x = x.reshape(b, g, g // 2, 2 * c).permute(0, 2, 1, 3).reshape(b, g // 2, g // 2, 4 * c)
            return self.fc2(self.act(self.fc1(self.ln(x.reshape(b, -1, 4 * c)))))

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no fp32 copy of the model
    try:
        with torch.device("cuda"):
            model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn)
            projector = DownsampleProjector(vision_config.hidden_size, text_config.hidden_size)
    finally:
        torch.set_default_dtype(default)
    model.to(dtype)
    name = next(n for n, _ in model.named_modules() if n.endswith("multi_modal_projector"))
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], projector)
    model.eval()
    return model, image_token


def run_waves(model, image_token: int, batch: int, n: int, text_tokens: int, gen: int, seed: int,
              image_size: int, dtype) -> dict:
    """n images in waves of `batch` (one generate per wave); wall time, images/s, tok/s, peak memory."""
    import torch

    vocab = model.config.text_config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (min(n, 16), 3, image_size, image_size)
    pool = torch.rand(shape, device="cuda", generator=g, dtype=dtype) * 2 - 1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0, generated = time.perf_counter(), 0
    for first in range(0, n, batch):
        b = min(batch, n - first)
        text = torch.randint(1, vocab - 1, (b, text_tokens), device="cuda", generator=g)
        image = torch.full((b, 196), image_token, device="cuda", dtype=text.dtype)
        ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
        pixels = pool[torch.arange(first, first + b, device="cuda") % len(pool)]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                 max_new_tokens=gen, min_new_tokens=gen, do_sample=False, pad_token_id=0)
        generated += (out.shape[1] - ids.shape[1]) * b  # generate returns prompt + new tokens
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"wall_s": round(wall, 3), "peer_images_per_s": round(n / wall, 3),
            "generated_tokens": int(generated), "peer_tok_s": round(generated / wall, 1),
            "peak_mem_gib": round(peak, 2)}


def torch_on_cuda():
    """(torch, transformers), or exit with what is missing."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: the transformers peer needs {' and '.join(missing)}")
    import torch
    import transformers

    if not torch.cuda.is_available():
        sys.exit("error: the transformers peer needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch, transformers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch, transformers = torch_on_cuda()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, image_token = build_model(args.config, dtype, args.attn)
    gpu, sha = torch.cuda.get_device_name(0), git_sha(ROOT)
    size = args.config["vision_tower_cfg"]["image_size"]
    print(f"{args.name} LLaVA-style peer ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{args.dtype}, {args.attn}) built in {time.perf_counter() - t0:.1f} s on {gpu}; transformers "
          f"{transformers.__version__}, torch {torch.__version__}", flush=True)
    run_waves(model, image_token, 2, 2, args.text_tokens, 4, args.seed, size, dtype)  # warm-up
    out = args.json_out or results_file("vlm", gpu, results_dir=ROOT / "benchmarks" / "results")
    rows = []
    for batch in args.batch:
        n = args.num_requests or 4 * batch
        common = {"date": today(), "gpu": gpu, "git_sha": sha, "bench": "peer_hf_vlm", "peer": "transformers",
                  "model": args.name, "dtype": args.dtype, "attn": args.attn, "batch": batch, "num_images": n,
                  "text_tokens": args.text_tokens, "image_tokens": 196, "gen_len": args.gen,
                  "transformers": transformers.__version__, "torch": torch.__version__}
        try:
            timing = run_waves(model, image_token, batch, n, args.text_tokens, args.gen, args.seed, size,
                               dtype)
            row = {**common, "status": "ok", **timing}
        except torch.cuda.OutOfMemoryError:
            row = {**common, "status": "oom", "peer_images_per_s": None, "peer_tok_s": None}
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(row)
        said = (f"{row['peer_images_per_s']:.2f} images/s, {row['peer_tok_s']:.0f} tok/s"
                if row["status"] == "ok" else "out of GPU memory")
        print(f"  batch {batch}, {n} images: {said}", flush=True)
        if not args.no_save:
            append_jsonl(out, [row])
    print(f"\n{'model':<14}{'batch':>6}{'images':>8}{'images/s':>10}{'tok/s':>9}{'wall s':>9}")
    for r in rows:
        ok = r["status"] == "ok"
        ips = r["peer_images_per_s"] if ok else "oom"
        print(f"{args.name:<14}{r['batch']:>6}{r['num_images']:>8}{ips:>10}"
              f"{r['peer_tok_s'] if ok else '-':>9}{r.get('wall_s', '-'):>9}")
    if not args.no_save:
        print(f"results appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
