"""qserve-lite command line: generate, chat, ppl, quantize, import-gguf, bench, batch, serve, caption."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from qserve_lite import server as server_pkg
from qserve_lite._version import __version__
from qserve_lite.batch import command as batch_command
from qserve_lite.bench import throughput
from qserve_lite.caption import run as caption_run
from qserve_lite.core.backend import resolve_device
from qserve_lite.core.precision import PRECISION_NAMES
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.llm_engine import check_max_tokens
from qserve_lite.errors import DeviceError, QServeLiteError, SamplingError
from qserve_lite.eval.corpus import python_doc_files, read_texts
from qserve_lite.eval.perplexity import perplexity
from qserve_lite.io.default_models import DEFAULT_MODEL
from qserve_lite.io.gguf import import_gguf
from qserve_lite.io.loader import load_model, require_gguf
from qserve_lite.llm import LLM
from qserve_lite.quant.calibrate import split_python_doc
from qserve_lite.quant.qoq import config_for_precision, quantize_model
from qserve_lite.sampling_params import SamplingParams


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=DEFAULT_MODEL,
        help=f"built-in alias, model directory, .gguf file or hub id (default: {DEFAULT_MODEL})",
    )


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision", default=None, metavar="NAME",
        help=f"run at this precision ({', '.join(PRECISION_NAMES)}); default: the model's own "
        "(w16a16 for a float model, the checkpoint's for a quantized one)",
    )


DEFAULT_MAX_TOKENS = 256
PREFILL_NOTICE_TOKENS = 512  # CPU prompts of at least this many tokens get a live prefill line on a terminal


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """Sampling, engine and device options shared by generate and chat."""
    p.add_argument("--system", default=None, help="system message (chat template)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help=f"most tokens to generate per answer (default {DEFAULT_MAX_TOKENS}); at most the max "
                   "model len (prompt + output, --max-model-len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely tokens only (0 = off, the default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the most likely tokens whose probabilities add up to P (1 = off, the "
                   "default)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P x the most likely one (0 = off, the default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="> 1 makes tokens of the prompt and the answer so far less likely (1 = off, the "
                   "default)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed, for repeatable answers with --temperature > 0 (default: random)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the end-of-sequence token; generate until --max-tokens")
    _add_precision_arg(p)
    EngineConfig.add_cli_arguments(p, device="auto", max_num_seqs=256)


def _pick_device(requested: str) -> str:
    """Check --device early (an unusable 'gpu' fails before loading anything); returns it unchanged, so
    'auto' reaches LLM, which also falls back to the CPU for models the GPU kernels cannot run."""
    resolve_device(requested)
    return requested


def _cpu_only(requested: str, command: str) -> None:
    """Commands that run the numpy reference only (ppl, quantize): --device gpu is an error."""
    if requested == "gpu":
        raise DeviceError(f"qserve-lite {command} runs on the CPU only; use --device cpu (or auto)")


def _sampling_params(args: argparse.Namespace):
    max_tokens = DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    return SamplingParams(
        max_tokens=max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, ignore_eos=args.ignore_eos, stop=tuple(args.stop or ()),
        repetition_penalty=args.repetition_penalty,
    )


def _load_llm(args: argparse.Namespace):
    """The engine on the chosen device; returns (llm, load seconds). An explicit --max-tokens must fit the
    engine's max_model_len: the server's rule (engine/llm_engine.py check_max_tokens)."""
    config = EngineConfig.from_cli(args, device=_pick_device(args.device))
    t0 = time.perf_counter()
    llm = LLM(args.model, precision=args.precision, config=config)
    limit = llm.engine.max_model_len
    try:
        check_max_tokens(args.max_tokens, limit)
    except SamplingError as e:
        more = " (or raise --max-model-len)" if limit < llm.engine.config.max_position_embeddings else ""
        raise SamplingError(f"{e}: give --max-tokens {limit} or less{more}") from None
    return llm, time.perf_counter() - t0


class PrefillNotice:
    """A live stderr line while the CPU prefills a long prompt, so a minute-long wait for the first token is
    not a silent one: 'qserve-lite: prefilling 8000 prompt tokens on the CPU ... 12s', ending as
    'qserve-lite: prefilled 8000 prompt tokens in 55.1s (145 tok/s)'. Only on device cpu, for prompts of at
    least PREFILL_NOTICE_TOKENS tokens, and when stderr is a terminal (logs and pipes get the summary line
    only). A thread watches the engine's prompt-token count; call close() before writing any output (it is
    also called on leaving the with-block)."""

    def __init__(self, llm: LLM, num_tokens: int):
        self.out = sys.stderr
        isatty = getattr(self.out, "isatty", None)
        self.active = (llm.device == "cpu" and num_tokens >= PREFILL_NOTICE_TOKENS
                       and isatty is not None and isatty())
        self.engine, self.num_tokens = llm.engine, num_tokens
        self._start_count = llm.engine.num_prompt_tokens
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()
        self._width = 0
        self._closed = False

    def __enter__(self) -> PrefillNotice:
        if self.active:
            self._write(f"prefilling {self.num_tokens} prompt tokens on the CPU ...")
            self._thread = threading.Thread(target=self._watch, name="prefill-notice", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prefilled(self) -> bool:
        return self.engine.num_prompt_tokens != self._start_count

    def _watch(self) -> None:
        shown = 0
        while not self._stop.wait(0.1):
            if self._prefilled():
                self._finish()
                return
            elapsed = int(time.perf_counter() - self._t0)
            if elapsed > shown:
                shown = elapsed
                self._write(f"prefilling {self.num_tokens} prompt tokens on the CPU ... {elapsed}s")

    def _write(self, text: str, end: str = "") -> None:
        line = f"qserve-lite: {text}"
        self.out.write("\r" + line + " " * max(0, self._width - len(line)) + end)
        self.out.flush()
        self._width = 0 if end else len(line)

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        dt = time.perf_counter() - self._t0
        if self._prefilled():
            self._write(f"prefilled {self.num_tokens} prompt tokens in {dt:.1f}s "
                        f"({self.num_tokens / max(dt, 1e-9):.0f} tok/s)", end="\n")
        else:  # interrupted or failed: end the line
            self._write(f"prefill of {self.num_tokens} prompt tokens stopped after {dt:.1f}s", end="\n")

    def close(self) -> None:
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._finish()


def cmd_generate(args: argparse.Namespace) -> int:
    _pick_device(args.device)
    params = _sampling_params(args)
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    if any(not p.strip() for p in prompts):
        raise QServeLiteError("the prompt is empty")
    llm, t_load = _load_llm(args)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        requests = [llm.tokenizer.encode_chat(system + [{"role": "user", "content": p}]) for p in prompts]
    else:
        requests = [llm.tokenizer.encode(p) for p in prompts]
    where = f"device {llm.device}, {llm.precision}"
    t1 = time.perf_counter()
    if len(requests) == 1:
        with PrefillNotice(llm, len(requests[0])) as notice:
            if args.no_stream:
                outputs = llm.generate(requests, params, use_tqdm=False)
            else:
                outputs = [_stream_to_stdout(llm, requests[0], params, notice, [])]
    else:
        outputs = llm.generate(requests, params, use_tqdm=True)
    dt = time.perf_counter() - t1
    n_gen = sum(len(o.outputs[0].token_ids) for o in outputs)
    if len(outputs) == 1:
        out = outputs[0]
        if args.no_stream:
            sys.stdout.write(out.text)
        sys.stdout.write("\n")
        print(
            f"[{len(out.prompt_token_ids)} prompt + {n_gen} generated tokens, "
            f"finish={out.outputs[0].finish_reason}, load {t_load:.1f}s, generate {dt:.1f}s "
            f"({n_gen / max(dt, 1e-9):.1f} tok/s), {where}]",
            file=sys.stderr,
        )
        return 0
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        print(f"=== [{i + 1}/{len(outputs)}] {prompt.strip()[:60]!r} (finish={out.outputs[0].finish_reason})")
        print(out.text)
    print(
        f"[{len(outputs)} prompts, {n_gen} generated tokens, load {t_load:.1f}s, generate {dt:.1f}s "
        f"({n_gen / max(dt, 1e-9):.1f} tok/s), {where}]",
        file=sys.stderr,
    )
    return 0


def _stream_to_stdout(llm: LLM, prompt: list[int], params: SamplingParams, notice: PrefillNotice,
                      shown: list[str]):
    """Stream the answer to stdout (each piece also appended to `shown`); its final RequestOutput."""
    stream = llm.stream(prompt, params)
    for piece in stream:
        notice.close()
        sys.stdout.write(piece)
        sys.stdout.flush()
        shown.append(piece)
    return stream.output


def _chat_reply(llm: LLM, messages: list[dict], params: SamplingParams) -> tuple[str, bool]:
    """Stream the reply to `messages`; (its text, whether Ctrl-C interrupted it). An interrupted reply's
    request is aborted (every request, the engine's pool reset: a step may have been cut halfway) and its
    text is what was shown."""
    ids = llm.tokenizer.encode_chat(messages)
    shown: list[str] = []
    try:
        with PrefillNotice(llm, len(ids)) as notice:
            text, interrupted = _stream_to_stdout(llm, ids, params, notice, shown).text, False
    except KeyboardInterrupt:
        llm.engine.abort_all()
        text, interrupted = "".join(shown), True
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text, interrupted


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat over stdin: each line is a user turn; the history is kept. /exit quits, /reset
    clears the history. Ctrl-C during a reply stops it (the part shown stays in the history; a reply stopped
    before its first word drops the turn) and the chat goes on; Ctrl-C or EOF at the prompt ends it."""
    params = _sampling_params(args)
    llm, t_load = _load_llm(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print(f"[{args.model} loaded in {t_load:.1f}s, {llm.precision}; /exit to quit, /reset to forget, Ctrl-C "
          "stops a reply]", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        user = line.strip()
        if not user:
            continue
        if user == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        text, interrupted = _chat_reply(llm, system + history + [{"role": "user", "content": user}], params)
        if interrupted and not text:
            print("[reply interrupted before it began; this turn is dropped]", file=sys.stderr)
            continue
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        if interrupted:
            print("[reply interrupted; the part shown is kept in the history (/reset to forget)]",
                  file=sys.stderr)


def cmd_ppl(args: argparse.Namespace) -> int:
    _cpu_only(args.device, "ppl")
    files = list(args.text or [])
    if args.python_doc:
        if args.python_doc_split == "all":
            files += python_doc_files()
        else:
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
    # calibration forwards run on the GPU when there is one ("auto"), or where --device says
    calib = {"seed": args.seed, "calib_device": resolve_device(args.device)}
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
    steps["k_hadamard"] = not args.no_k_hadamard
    steps["rotation_seed"] = args.rotation_seed
    config = config_for_precision(args.precision, args.group_size, **calib, **steps)
    if args.calib_tokens is not None:
        config.n_samples = max(1, args.calib_tokens // config.calibration_size()[1])
    report = quantize_model(args.model, args.out, config, calib_files=args.calib_text,
                            overwrite=args.overwrite, overwrite_flag="--overwrite", out_flag="--out")
    print(f"wrote {report.out_dir} ({config.precision}, group size {config.group_size}, "
          f"{report.calib_tokens} calibration tokens, {report.seconds:.0f}s, "
          f"peak memory {report.peak_rss_mb:.0f} MB)")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    require_gguf()
    t0 = time.perf_counter()
    out = import_gguf(args.file, args.out_dir, dtype=args.dtype)
    print(f"imported {args.file} -> {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Throughput with QServe's protocol on random weights of a shipped model shape (bench/throughput.py)."""
    return throughput.run(args)


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption WebDataset shards with a VILA1.5 model, resumably (caption/run.py)."""
    return caption_run.run(args)


def cmd_batch(args: argparse.Namespace) -> int:
    """JSONL prompts in, JSONL completions out, per shard, resumable (batch/command.py)."""
    return batch_command.run(args, _sampling_params(args))


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP server (needs the [server] extra)."""
    missing = server_pkg.missing_server_deps()
    if missing:
        raise QServeLiteError(
            f"qserve-lite serve needs {' and '.join(missing)}: pip install 'qserve-lite[server]'"
        )
    from qserve_lite.server.launch import serve  # imports fastapi and uvicorn: the optional [server] extra

    if args.random_weights is None and (args.tokenizer is not None or args.group_size is not None):
        raise QServeLiteError("--tokenizer and --group-size go with --random-weights")
    engine_config = EngineConfig.from_cli(args)
    _pick_device(engine_config.device)
    serve(
        args.model, engine_config=engine_config, precision=args.precision, host=args.host, port=args.port,
        random_weights=args.random_weights, tokenizer=args.tokenizer,
        group_size=128 if args.group_size is None else args.group_size,
        api_key=args.api_key or os.environ.get("QSERVE_LITE_API_KEY") or None,
        served_model_name=args.served_model_name,
        max_request_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout,
        access_log=not args.no_access_log, log_level=args.log_level,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qserve-lite", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from one or more prompts (batched)")
    _add_model_arg(g)
    g.add_argument("--prompt", "-p", required=True, action="append",
                   help="prompt text ('-' reads stdin); repeat for several prompts, batched by the engine")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--no-stream", action="store_true", help="print the answer at the end, not streamed")
    _add_generation_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat over stdin (history kept; /exit quits, /reset clears)")
    _add_model_arg(c)
    _add_generation_args(c)
    c.set_defaults(func=cmd_chat)

    p = sub.add_parser("ppl", help="perplexity over text files (GPTQ/QServe protocol)")
    _add_model_arg(p)
    p.add_argument("--text", nargs="+", help="text files, concatenated into one token stream")
    p.add_argument("--python-doc", action="store_true",
                   help="use Debian python3.11-doc's .rst.txt sources (apt-get install python3.11-doc)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per evaluation chunk (default 2048)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto",
                   help="ppl runs the numpy reference on the CPU: cpu or auto (default); gpu is refused")
    _add_precision_arg(p)
    p.add_argument("--python-doc-split", choices=("all", "eval", "calib"), default="all",
                   help="with --python-doc: every file, or the held-out evaluation / calibration part of "
                   "quantize's deterministic split (files whose sorted index %% 10 == 0 are 'eval')")
    p.set_defaults(func=cmd_ppl)

    q = sub.add_parser("quantize", help="quantize a float model with QoQ into a QServe-format checkpoint")
    _add_model_arg(q)
    q.add_argument("--out", "-o", required=True, help="output directory")
    q.add_argument("--precision", default="w4a8kv4", choices=("w4a8kv4", "w4a8kv8", "w8a8kv4", "w8a8kv8"),
                   help="the checkpoint's precision: weight, activation and KV cache bits (default w4a8kv4)")
    q.add_argument("--group-size", type=int, choices=(-1, 128), default=128,
                   help="W4: 128 = progressive group quantization (default), -1 = per-channel")
    q.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (default: --calib-source auto)")
    q.add_argument("--calib-source", choices=("auto", "pile", "self", "python-doc"), default=None,
                   help="calibration text when no --calib-text: auto (default) = the Pile validation set "
                   "QoQ uses (mit-han-lab/pile-val-backup, from the Hugging Face cache or fetched once; "
                   "needs zstandard), else text the model generates itself; pile, self (data-free) or the "
                   "held-out python3.11-doc files (apt-get install python3.11-doc) on their own")
    q.add_argument("--calib-tokens", type=int, default=None,
                   help="calibration tokens (default: 16 x 512 on the CPU, 128 x 1024 on a GPU)")
    q.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sample")
    q.add_argument("--no-rotation", action="store_true",
                   help="skip the Hadamard rotations (norms are still folded)")
    q.add_argument("--rotation-seed", type=int, default=None,
                   help="rotate by Hadamard matrices with random row signs from this seed (default: plain "
                   "Hadamard; on SmolLM2 three seeds gave no gain on average, docs/accuracy.md)")
    q.add_argument("--no-smooth-attn", action="store_true", help="skip SmoothAttention")
    q.add_argument("--no-smooth-proj", action="store_true", help="skip down_proj smoothing")
    q.add_argument("--no-reorder", action="store_true", help="skip down_proj channel reordering (g128)")
    q.add_argument("--no-clip", action="store_true",
                   help="skip the clip-ratio search (per-channel: per row; g128: per group)")
    q.add_argument("--no-gptq", action="store_true", help="round to nearest instead of GPTQ")
    q.add_argument("--rtn", action="store_true", help="plain RTN baseline: every QoQ step off")
    q.add_argument("--no-k-hadamard", action="store_true",
                   help="do not mark the checkpoint for the runtime per-head Hadamard rotation of q and k "
                   "(on by default: a much more accurate KV4 K cache; QServe's own runtime does not know it, "
                   "so use this flag for checkpoints meant for QServe's runtime)")
    q.add_argument("--seed", type=int, default=42, help="calibration sampling seed")
    q.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out directory, replacing the checkpoint's files there "
                   "(other files are kept)")
    q.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto",
                   help="where the calibration forwards run: gpu = the model code on CuPy, 128 x 1024 "
                   "calibration tokens by default; cpu = numpy, 16 x 512 tokens; auto (default) = gpu when "
                   "cupy sees a CUDA device, else cpu (with gpu, GPTQ's Hessian factorizations and the g128 "
                   "clip search also run on CuPy)")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("import-gguf",
                       help="convert a llama-architecture GGUF into a Hugging Face model directory")
    i.add_argument("file", help="the .gguf file")
    i.add_argument("out_dir", help="the Hugging Face model directory to write")
    i.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the written weights (default float32)")
    i.set_defaults(func=cmd_import_gguf)

    b = sub.add_parser("bench",
                       help="generation throughput (QServe's protocol) on random weights of a model shape")
    throughput.add_arguments(b)
    b.set_defaults(func=cmd_bench)

    bt = sub.add_parser("batch", help="JSONL prompts in, JSONL completions out: resumable shards on one "
                        "process, one process per GPU (--launcher local) or Ray (--launcher ray)")
    _add_model_arg(bt)
    batch_command.add_arguments(bt)
    _add_generation_args(bt)
    bt.set_defaults(func=cmd_batch)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_arg(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $QSERVE_LITE_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    s.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on Ctrl-C before they are aborted")
    s.add_argument("--seed", type=int, default=0, help="seeds requests that have no seed of their own")
    s.add_argument("--no-access-log", action="store_true", help="do not log every request")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (default: info)")
    EngineConfig.add_cli_arguments(s, device="auto", max_num_seqs=256)
    _add_precision_arg(s)
    s.add_argument(
        "--random-weights", default=None, metavar="SHAPE",
        help="serve RANDOM weights of a shipped model shape (llama-3-8b, llama-2-7b, ...) or a config.json, "
        "drawn on the GPU at --precision (default w4a8kv4), for load tests; the vocabulary is --tokenizer's",
    )
    s.add_argument(
        "--tokenizer", default=None, metavar="DIR_OR_MODEL",
        help="with --random-weights: a directory holding tokenizer.json (+ tokenizer_config.json) or a model "
        "reference (alias, model directory, hub id); default: --model",
    )
    s.add_argument("--group-size", type=int, choices=(128, -1), default=None,
                   help="with --random-weights at W4: 128 (default) or -1 (per-channel)")
    s.set_defaults(func=cmd_serve)

    cap = sub.add_parser("caption", help="caption the images of WebDataset shards with a VILA1.5 model "
                         "(resumable, one JSON per shard)")
    caption_run.add_arguments(cap)
    cap.set_defaults(func=cmd_caption)
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
