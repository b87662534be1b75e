"""qserve-lite command line: generate, ppl, quantize, import-gguf."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import DeviceError, QServeLiteError
from .model.default_models import DEFAULT_MODEL


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=DEFAULT_MODEL,
        help=f"built-in alias, model directory, .gguf file or hub id (default: {DEFAULT_MODEL})",
    )


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    from .quant.precision import PRECISION_NAMES

    p.add_argument(
        "--precision", default=None, metavar="NAME",
        help=f"run at this precision ({', '.join(PRECISION_NAMES)}); default: the model's own "
        "(w16a16 for a float model, the checkpoint's for a quantized one)",
    )


def _pick_device(requested: str) -> str:
    if requested == "gpu":
        raise DeviceError(
            "--device gpu is not available yet: the CuPy GPU engine is still being built. "
            "Use --device cpu (the numpy reference engine)."
        )
    return "cpu"  # auto -> cpu until the GPU engine lands


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.reference import generate
    from .model.loader import load_model
    from .sampling_params import SamplingParams

    _pick_device(args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, ignore_eos=args.ignore_eos,
    )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise QServeLiteError("the prompt is empty")
    t0 = time.perf_counter()
    lm = load_model(args.model, precision=args.precision)
    t_load = time.perf_counter() - t0
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt_ids = lm.tokenizer.encode_chat(messages)
    else:
        prompt_ids = lm.tokenizer.encode(prompt)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    t1 = time.perf_counter()
    out = generate(lm.model, lm.tokenizer, prompt_ids, params, on_text=None if args.no_stream else emit)
    dt = time.perf_counter() - t1
    if args.no_stream:
        sys.stdout.write(out.text)
    sys.stdout.write("\n")
    print(
        f"[{len(prompt_ids)} prompt + {len(out.token_ids)} generated tokens, finish={out.finish_reason}, "
        f"load {t_load:.1f}s, generate {dt:.1f}s ({len(out.token_ids) / max(dt, 1e-9):.1f} tok/s), "
        f"device cpu, {lm.precision}]",
        file=sys.stderr,
    )
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from .eval.corpus import python_doc_files, read_texts
    from .eval.perplexity import perplexity
    from .model.loader import load_model

    _pick_device(args.device)
    files = list(args.text or [])
    if args.python_doc:
        if args.python_doc_split == "all":
            files += python_doc_files()
        else:
            from .quant.calibrate import split_python_doc

            calib_files, eval_files = split_python_doc()
            files += eval_files if args.python_doc_split == "eval" else calib_files
    if not files:
        raise QServeLiteError("give text files with --text FILE... or use --python-doc")
    lm = load_model(args.model, precision=args.precision)
    text = read_texts(files)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    print(f"{len(files)} files, {len(ids)} tokens, precision {lm.precision}", file=sys.stderr)
    t0 = time.perf_counter()
    res = perplexity(lm.model, ids, seq_len=args.seq_len, max_tokens=args.max_tokens)
    dt = time.perf_counter() - t0
    print(f"ppl {res.ppl:.4f}  ({res.chunks} chunks x {res.seq_len} tokens = {res.tokens} tokens, {dt:.0f}s)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quant.qoq import config_for_precision, quantize_model

    _pick_device(args.device)
    calib = {"seed": args.seed}
    if args.calib_seq_len is not None:
        calib["seq_len"] = args.calib_seq_len
    if args.calib_source is not None:
        calib["calib_source"] = args.calib_source
    if args.rtn:
        steps = dict(rotation=False, smooth_attention=False, smooth_proj=False, reorder=False, clip=False,
                     gptq=False)
    else:
        steps = dict(rotation=not args.no_rotation, smooth_attention=not args.no_smooth_attn,
                     smooth_proj=not args.no_smooth_proj, reorder=not args.no_reorder, clip=not args.no_clip,
                     gptq=not args.no_gptq)
    config = config_for_precision(args.precision, args.group_size, **calib, **steps)
    if args.calib_tokens is not None:
        config.n_samples = max(1, args.calib_tokens // config.calibration_size()[1])
    report = quantize_model(args.model, args.out, config, calib_files=args.calib_text,
                            overwrite=args.overwrite)
    print(f"wrote {report.out_dir} ({config.precision}, group size {config.group_size}, "
          f"{report.calib_tokens} calibration tokens, {report.seconds:.0f}s, "
          f"peak memory {report.peak_rss_mb:.0f} MB)")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from .model.gguf_import import import_gguf
    from .model.loader import require_gguf

    require_gguf()
    t0 = time.perf_counter()
    out = import_gguf(args.file, args.out_dir, dtype=args.dtype)
    print(f"imported {args.file} -> {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qserve-lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_arg(g)
    g.add_argument("--prompt", "-p", required=True, help="prompt text ('-' reads stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    g.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    _add_precision_arg(g)
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity over text files (GPTQ/QServe protocol)")
    _add_model_arg(p)
    p.add_argument("--text", nargs="+", help="text files, concatenated into one token stream")
    p.add_argument("--python-doc", action="store_true",
                   help="use Debian python3.11-doc's .rst.txt sources (apt-get install python3.11-doc)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    _add_precision_arg(p)
    p.add_argument("--python-doc-split", choices=("all", "eval", "calib"), default="all",
                   help="with --python-doc: every file, or the held-out evaluation / calibration part of "
                   "quantize's deterministic split (files whose sorted index %% 10 == 0 are 'eval')")
    p.set_defaults(func=cmd_ppl)

    q = sub.add_parser("quantize", help="quantize a float model with QoQ into a QServe-format checkpoint")
    _add_model_arg(q)
    q.add_argument("--out", "-o", required=True, help="output directory")
    q.add_argument("--precision", default="w4a8kv4", choices=("w4a8kv4", "w4a8kv8", "w8a8kv4", "w8a8kv8"))
    q.add_argument("--group-size", type=int, choices=(-1, 128), default=128,
                   help="W4: 128 = progressive group quantization (default), -1 = per-channel")
    q.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (default: the calibration part of python3.11-doc)")
    q.add_argument("--calib-source", choices=("python-doc", "pile"), default=None,
                   help="calibration corpus when no --calib-text: held-out python3.11-doc (default) or "
                   "mit-han-lab/pile-val-backup from the Hugging Face hub (needs network and zstandard)")
    q.add_argument("--calib-tokens", type=int, default=None,
                   help="calibration tokens (default: 16 x 512 on CPU, 128 x 1024 with cupy)")
    q.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sample")
    q.add_argument("--no-rotation", action="store_true",
                   help="skip the Hadamard rotations (norms are still folded)")
    q.add_argument("--no-smooth-attn", action="store_true", help="skip SmoothAttention")
    q.add_argument("--no-smooth-proj", action="store_true", help="skip down_proj smoothing")
    q.add_argument("--no-reorder", action="store_true", help="skip down_proj channel reordering (g128)")
    q.add_argument("--no-clip", action="store_true", help="skip the clip-ratio search (per-channel W4)")
    q.add_argument("--no-gptq", action="store_true", help="round to nearest instead of GPTQ")
    q.add_argument("--rtn", action="store_true", help="plain RTN baseline: every QoQ step off")
    q.add_argument("--seed", type=int, default=42, help="calibration sampling seed")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    q.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("import-gguf", help="convert a llama-architecture GGUF into a Hugging Face model directory")
    i.add_argument("file")
    i.add_argument("out_dir")
    i.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    i.set_defaults(func=cmd_import_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QServeLiteError as e:
        print(f"qserve-lite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nqserve-lite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
