"""qserve-lite command line: generate, ppl, import-gguf."""

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
    lm = load_model(args.model)
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
        f"load {t_load:.1f}s, generate {dt:.1f}s ({len(out.token_ids) / max(dt, 1e-9):.1f} tok/s), device cpu]",
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
        files += python_doc_files()
    if not files:
        raise QServeLiteError("give text files with --text FILE... or use --python-doc")
    lm = load_model(args.model)
    text = read_texts(files)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    print(f"{len(files)} files, {len(ids)} tokens", file=sys.stderr)
    t0 = time.perf_counter()
    res = perplexity(lm.model, ids, seq_len=args.seq_len, max_tokens=args.max_tokens)
    dt = time.perf_counter() - t0
    print(f"ppl {res.ppl:.4f}  ({res.chunks} chunks x {res.seq_len} tokens = {res.tokens} tokens, {dt:.0f}s)")
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
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity over text files (GPTQ/QServe protocol)")
    _add_model_arg(p)
    p.add_argument("--text", nargs="+", help="text files, concatenated into one token stream")
    p.add_argument("--python-doc", action="store_true",
                   help="use Debian python3.11-doc's .rst.txt sources (apt-get install python3.11-doc)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    p.set_defaults(func=cmd_ppl)

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
